"""``python -m kvref.bench.split_k``: issue #15's CPU cases, one decode attend on 1 and on 2 threads.

The two thread counts alternate in one process (``numba.set_num_threads``), so both see the machine in the same
state; each time is the best of ``REPEATS`` x ``CALLS`` calls. The schedule each case gets is
:func:`kvref.cpu.choose_parts`'s (Gemma-2B's single KV head: the key split; the others: the head split).

These cases read more K/V than any cache holds, so a second thread can speed them up only as far as a second
thread raises the read bandwidth of the machine. The first line therefore measures that, in the same run: the
STREAM-like compiled read (``kvref.bench.measure.measure_bandwidth``) on 1 and on 2 threads, best of
``BANDWIDTH_ROUNDS`` alternating rounds, and their ratio, the ceiling of a memory-bound 2-thread speedup. Each
case's line gives its achieved read bandwidth (K/V bytes / time) on each thread count.
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
#: alternating 1- and 2-thread rounds of the read-bandwidth measurement (0.5 GiB each)
BANDWIDTH_ROUNDS = 3


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


def read_bandwidth(rounds=BANDWIDTH_ROUNDS, gib=0.5):
    """{threads: best GB/s} of the compiled STREAM-like read on 1 and (where the machine has them) 2 threads, the
    thread counts alternating."""
    import numba

    from .measure import measure_bandwidth

    threads = [t for t in (1, 2) if t <= numba.config.NUMBA_NUM_THREADS]
    best = {t: 0.0 for t in threads}
    for _ in range(rounds):
        for t in threads:
            best[t] = max(best[t], measure_bandwidth(t, gib, copy=False)["read_GBps"])
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    return best


def kv_bytes(case):
    """The K and V bytes one decode attend of ``case`` reads: 2 x n x kv_heads x head_dim x the element size."""
    _, _, kv_heads, head_dim, n, dtype = case
    return 2 * n * kv_heads * head_dim * np.dtype(dtype).itemsize


def main():
    """Print the read bandwidth on 1 and 2 threads, then one line per case of :data:`CASES`: both times, the
    2-thread speedup and the achieved read bandwidth. Returns 0."""
    read = read_bandwidth()
    line = f"compiled read: 1 thread {read[1]:.1f} GB/s"
    if 2 in read:
        line += f", 2 threads {read[2]:.1f} GB/s, ratio {read[2] / read[1]:.2f}x (the memory-bound speedup ceiling)"
    print(line, flush=True)
    for case in CASES:
        best = one_vs_two_threads(case)
        variant, q_heads, kv_heads, head_dim, n, dtype = case
        gbps = {t: kv_bytes(case) / seconds / 1e9 for t, seconds in best.items()}
        line = f"{variant} {q_heads}/{kv_heads} D{head_dim} n={n} {dtype}: 1 thread {best[1] * 1e3:.2f} ms " \
               f"({gbps[1]:.1f} GB/s)"
        if 2 in best:
            line += f", 2 threads {best[2] * 1e3:.2f} ms ({gbps[2]:.1f} GB/s), speedup {best[1] / best[2]:.2f}x"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
