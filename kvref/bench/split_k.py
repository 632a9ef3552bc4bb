"""``python -m kvref.bench.split_k``: issue #15's CPU cases, one decode attend on 1 and on 2 threads.

The two thread counts alternate in one process (``numba.set_num_threads``), so both see the machine in the same
state; each time is the best of ``REPEATS`` x ``CALLS`` calls. The schedule each case gets is
:func:`kvref.cpu.choose_parts`'s (Gemma-2B's single KV head: the key split; the others: the head split).
"""

import sys
import time

import numpy as np

#: (variant, q_heads, kv_heads, head_dim, n, dtype): the issue's cases
CASES = (("flat", 8, 1, 256, 65536, "float32"),    # Gemma-2B: target >= 1.6x on 2 threads
         ("flat", 32, 32, 128, 16384, "float32"),  # MHA: target >= 1.6x on 2 threads
         ("flat", 32, 8, 128, 16384, "float16"),   # paged / flat at 2 threads <= 1.15: this row and the next
         ("pooled", 32, 8, 128, 16384, "float16"))
REPEATS, CALLS = 15, 5


def filled_step(variant, q_heads, kv_heads, head_dim, n, dtype, seed=0):
    """A one-layer cache of ``variant`` holding n random tokens, a planned and written decode step, and its q."""
    import kvref

    shape = kvref.CacheShape(layers=1, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    rng = np.random.default_rng(seed)
    if variant == "flat":
        cache = kvref.FlatCache(shape, batch=1, max_tokens=n + 1)
    else:
        cache = kvref.PooledCache(shape, num_blocks=(n + 16) // 16 + 1, block_size=16, batch=1)
    for start in range(0, n, 8192):
        rows = (1, 1, min(8192, n - start), kv_heads, head_dim)
        cache.append(rng.standard_normal(rows).astype(dtype), rng.standard_normal(rows).astype(dtype))
    step = cache.plan(1)
    one = (1, 1, kv_heads, head_dim)
    cache.write(step, 0, rng.standard_normal(one).astype(dtype), rng.standard_normal(one).astype(dtype))
    q = rng.standard_normal((1, 1, q_heads, head_dim)).astype(np.float32)
    return cache, step, q


def one_vs_two_threads(case, repeats=REPEATS, calls=CALLS):
    """{1: seconds, 2: seconds} of one decode attend of ``case``, the thread counts alternating."""
    import numba

    cache, step, q = filled_step(*case)
    out = np.empty_like(q)
    threads = [t for t in (1, 2) if t <= numba.config.NUMBA_NUM_THREADS]
    best = {t: float("inf") for t in threads}
    for t in threads:  # compile each schedule before timing
        numba.set_num_threads(t)
        cache.attend(step, 0, q, out=out)
    for _ in range(repeats):
        for t in threads:
            numba.set_num_threads(t)
            start = time.perf_counter()
            for _ in range(calls):
                cache.attend(step, 0, q, out=out)
            best[t] = min(best[t], (time.perf_counter() - start) / calls)
    return best


def main():
    """Print one line per case of :data:`CASES`: both times and the 2-thread speedup. Returns 0."""
    for case in CASES:
        best = one_vs_two_threads(case)
        variant, q_heads, kv_heads, head_dim, n, dtype = case
        line = f"{variant} {q_heads}/{kv_heads} D{head_dim} n={n} {dtype}: 1 thread {best[1] * 1e3:.2f} ms"
        if 2 in best:
            line += f", 2 threads {best[2] * 1e3:.2f} ms, speedup {best[1] / best[2]:.2f}x"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
