"""The benchmark cases: what ``python -m kvref.bench`` measures, one function per comparison.

* decode attention over n cached tokens: kvref-cpu vs NumPy, torch SDPA and torch matmul+softmax;
* appending one token at context n: a FlatCache vs ``torch.cat`` growth;
* ring vs flat and pooled vs flat decode attention over the same keys, and the measured bytes of each;
* ggml quantization vs the ``gguf`` package, and two-tier vs flat fp16 attention.

:func:`run_threads` runs them all for one thread count (in its own subprocess) and returns a JSON-able dict, which
:func:`kvref.bench.report.report` turns into Markdown.
"""

import math
import sys
import time

from .measure import D, Q_HEADS, kv_bytes, measure_bandwidth, median_time, rotations, strict_read_limit


def _random_kv(rng, n, kv_heads, dtype):
    """K and V of n tokens for one layer and one sequence, (1, 1, n, kv_heads, D), standard normal in ``dtype``."""
    import numpy as np

    k = rng.standard_normal((1, 1, n, kv_heads, D), dtype=np.float32).astype(dtype)
    v = rng.standard_normal((1, 1, n, kv_heads, D), dtype=np.float32).astype(dtype)
    return k, v


def _best_of_rounds(caches, rng, rounds):
    """Decode attention of one random query over each name's rotated (cache, step) pairs, timed in ``rounds``
    alternating rounds (so drift hits every name alike); returns {name: lowest median seconds}."""
    import numpy as np

    q = rng.standard_normal((1, 1, Q_HEADS, D), dtype=np.float32)
    out = np.empty_like(q)
    best = {name: math.inf for name in caches}
    for _ in range(rounds):
        for name, pairs in caches.items():
            t = median_time(lambda c, s: c.attend(s, 0, q, out=out), pairs, min_seconds=0.2)
            best[name] = min(best[name], t)
    return best


# --------------------------------------------------------------------------------------------------------------
# Decode attention
# --------------------------------------------------------------------------------------------------------------
def bench_attention(n, kv_heads, dtype, rng, peers=True):
    """Times of one decode step over n cached tokens for each implementation (seconds), rotated caches."""
    import numpy as np

    from ..flat import FlatCache
    from ..shapes import CacheShape

    shape = CacheShape(1, Q_HEADS, kv_heads, D, dtype)
    count = rotations(kv_bytes(kv_heads, n, dtype))
    caches, steps = [], []
    for _ in range(count):
        cache = FlatCache(shape, batch=1, max_tokens=n, backend="cpu")
        k, v = _random_kv(rng, n, kv_heads, dtype)
        cache.append(k, v)
        cache.crop(n - 1)
        step = cache.plan(1)
        cache.write(step, 0, k[0, :, -1:], v[0, :, -1:])
        caches.append(cache)
        steps.append(step)
    q = rng.standard_normal((1, 1, Q_HEADS, D), dtype=np.float32)
    out = np.empty_like(q)
    results = {"kvref": median_time(lambda c, s: c.attend(s, 0, q, out=out), list(zip(caches, steps)))}
    if not peers:
        return results, caches, q
    group = Q_HEADS // kv_heads
    scale = np.float32(1.0 / math.sqrt(D))
    # Head-major views (kv_heads, n, D) of each cache's K and V, shared with torch without copies.
    kvs = [(c._kv[0, 0, 0].view(np.dtype(dtype)), c._kv[0, 1, 0].view(np.dtype(dtype))) for c in caches]

    def numpy_attend(keys, values):
        if keys.dtype != np.float32:  # NumPy has no fast fp16 matmul: widen first, as a NumPy user would
            keys = keys.astype(np.float32)
            values = values.astype(np.float32)
        qg = q.reshape(kv_heads, group, D)
        s = np.matmul(qg, keys.transpose(0, 2, 1)) * scale  # (kv_heads, G, n)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        return np.matmul(s, values)

    results["numpy"] = median_time(numpy_attend, kvs)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return results, caches, q
    tdtype = torch.float32 if dtype == "float32" else torch.float16
    tkv = [(torch.from_numpy(k.view(np.uint16) if dtype == "float16" else k),
            torch.from_numpy(v.view(np.uint16) if dtype == "float16" else v)) for k, v in kvs]
    if dtype == "float16":
        tkv = [(k.view(torch.float16), v.view(torch.float16)) for k, v in tkv]
    tq = torch.from_numpy(q).reshape(1, Q_HEADS, 1, D).to(tdtype)

    def torch_sdpa(keys, values):
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, keys[None], values[None], enable_gqa=True)

    tqg = tq.reshape(kv_heads, group, D)

    def torch_matmul(keys, values):
        with torch.no_grad():
            s = torch.matmul(tqg, keys.transpose(1, 2)) * float(scale)
            return torch.matmul(torch.softmax(s, dim=-1), values)

    results["torch_sdpa"] = median_time(torch_sdpa, tkv)
    results["torch_matmul"] = median_time(torch_matmul, tkv)
    return results, caches, q


# --------------------------------------------------------------------------------------------------------------
# Append
# --------------------------------------------------------------------------------------------------------------
def bench_append(n_values, kv_heads=8, rng=None):
    """Seconds to append one token (one layer, fp32) at context n: kvref FlatCache vs torch.cat growth."""
    import numpy as np

    from ..flat import FlatCache
    from ..shapes import CacheShape

    shape = CacheShape(1, Q_HEADS, kv_heads, D, "float32")
    k1 = rng.standard_normal((1, 1, kv_heads, D), dtype=np.float32)
    rows = []
    for n in n_values:
        cache = FlatCache(shape, batch=1, max_tokens=n + 1, backend="cpu")
        cache._lengths[0] = n  # pretend n tokens are cached: appending never reads them

        def kvref_append():
            step = cache.plan(1)
            cache.write(step, 0, k1, k1)
            cache.advance(step)
            cache._lengths[0] = n

        row = {"n": n, "kvref": median_time(kvref_append, [()], min_reps=200, min_seconds=0.2, max_reps=5000)}
        try:
            import torch

            tk = torch.zeros(1, kv_heads, n, D)
            tnew = torch.from_numpy(k1.reshape(1, kv_heads, 1, D))

            def torch_cat():
                torch.cat([tk, tnew], dim=-2)
                torch.cat([tk, tnew], dim=-2)  # K and V

            row["torch_cat"] = median_time(torch_cat, [()], min_reps=5, min_seconds=0.2, max_reps=200)
        except ImportError:
            pass
        rows.append(row)
    return rows


def bench_append_host(layers=32, kv_heads=8, n=1024, rng=None):
    """Host time of one decode step's writes (fp32, 8 KV heads, 1 token): the one-layer plan / write / advance
    apart, ``cache.append`` of all ``layers`` layers at once (per layer), and torch's in-place copy of one layer's
    new K and V into a preallocated tensor (what a framework's own cache does: the floor of a write)."""
    import numpy as np

    from ..flat import FlatCache
    from ..shapes import CacheShape

    cache = FlatCache(CacheShape(layers, Q_HEADS, kv_heads, D, "float32"), batch=1, max_tokens=n + 1, backend="cpu")
    k = rng.standard_normal((layers, 1, 1, kv_heads, D), dtype=np.float32)
    cache._lengths[0] = n

    def append_all():
        cache.append(k, k)
        cache._lengths[0] = n

    row = {"layers": layers, "append_all": median_time(append_all, [()], min_reps=50, min_seconds=0.3,
                                                       max_reps=2000) / layers}
    phases = {"plan": [], "write": [], "advance": []}
    append_all()  # warm
    for _ in range(2000):
        t0 = time.perf_counter()
        step = cache.plan(1)
        t1 = time.perf_counter()
        cache.write(step, 0, k[0], k[0])
        t2 = time.perf_counter()
        for layer in range(1, layers):
            cache.write(step, layer, k[layer], k[layer])
        t3 = time.perf_counter()
        cache.advance(step)
        t4 = time.perf_counter()
        cache._lengths[0] = n
        for name, dt in (("plan", t1 - t0), ("write", t2 - t1), ("advance", t4 - t3)):
            phases[name].append(dt)
    row.update({name: float(np.median(times)) for name, times in phases.items()})
    try:
        import torch

        tk, tv = torch.zeros(1, kv_heads, n + 1, D), torch.zeros(1, kv_heads, n + 1, D)
        new = torch.from_numpy(k[0].reshape(1, kv_heads, D))

        def torch_copy():
            tk[:, :, n].copy_(new)
            tv[:, :, n].copy_(new)

        row["torch_copy"] = median_time(torch_copy, [()], min_reps=200, min_seconds=0.2, max_reps=5000)
    except ImportError:
        pass
    return row


# --------------------------------------------------------------------------------------------------------------
# Ring vs flat decode attention, and ring memory
# --------------------------------------------------------------------------------------------------------------
def _decode_ready(cache, k, v, n_before, rng):
    """Fill ``cache`` (one layer, one sequence) with ``n_before`` tokens and write one more: a decode step whose
    attention can then be timed. Returns the planned step."""
    import numpy as np

    done = 0
    while done < n_before:  # chunks of at most the ring's window: each is written at once or deferred
        chunk = min(n_before - done, getattr(cache, "window", n_before))
        cache.append(k[:, :, :chunk], v[:, :, :chunk])
        done += chunk
    step = cache.plan(1)
    cache.write(step, 0, np.ascontiguousarray(k[0, :, :1]), np.ascontiguousarray(v[0, :, :1]))
    return step


def bench_ring(n, kv_heads, dtype, rng, rounds=3):
    """Decode attention over n visible keys: a RingCache of window n that has wrapped (its slots out of position
    order) vs a FlatCache holding n tokens. Returns {"ring": s, "flat": s, "ratio": ring / flat}; both are timed in
    alternating rounds on rotated caches and the lowest median of each is kept, so drift hits both alike."""
    from ..flat import FlatCache
    from ..ring import RingCache
    from ..shapes import CacheShape

    shape = CacheShape(1, Q_HEADS, kv_heads, D, dtype)
    count = rotations(kv_bytes(kv_heads, n, dtype))
    k, v = _random_kv(rng, n, kv_heads, dtype)
    rings, flats = [], []
    for _ in range(count):
        ring = RingCache(shape, batch=1, window=n, backend="cpu")
        rings.append((ring, _decode_ready(ring, k, v, n + n // 3, rng)))  # wrapped a third of the way round
        flat = FlatCache(shape, batch=1, max_tokens=n, backend="cpu")
        flats.append((flat, _decode_ready(flat, k, v, n - 1, rng)))
    best = _best_of_rounds({"ring": rings, "flat": flats}, rng, rounds)
    best["ratio"] = best["ring"] / best["flat"]
    return best


def _pooled_ready(cache, k, v, n_before, rng):
    """A PooledCache whose free queue is shuffled first (the block order a pool has after long churn: a sequence's
    blocks are scattered, not consecutive), filled with ``n_before`` tokens plus one written decode token."""
    from collections import deque

    cache.pool.free_queue = deque(int(b) for b in rng.permutation(cache.num_blocks))
    return _decode_ready(cache, k, v, n_before, rng)


def bench_pooled(n, kv_heads, dtype, rng, block_size=16, rounds=3):
    """Decode attention over n keys: a PooledCache (blocks of ``block_size``, scattered over the pool) vs a FlatCache
    holding n tokens. Alternating rounds on rotated caches, best median of each. Returns {"pooled", "flat", "ratio"}."""
    from ..flat import FlatCache
    from ..pooled import PooledCache
    from ..shapes import CacheShape

    shape = CacheShape(1, Q_HEADS, kv_heads, D, dtype)
    count = rotations(kv_bytes(kv_heads, n, dtype))
    k, v = _random_kv(rng, n, kv_heads, dtype)
    pools, flats = [], []
    for _ in range(count):
        pool = PooledCache(shape, num_blocks=-(-n // block_size), block_size=block_size, backend="cpu")
        pools.append((pool, _pooled_ready(pool, k, v, n - 1, rng)))
        flat = FlatCache(shape, batch=1, max_tokens=n, backend="cpu")
        flats.append((flat, _decode_ready(flat, k, v, n - 1, rng)))
    best = _best_of_rounds({"pooled": pools, "flat": flats}, rng, rounds)
    best["ratio"] = best["pooled"] / best["flat"]
    return best


def pooled_memory(max_tokens=8192, batch=16, block_sizes=(1, 16, 128), kv_heads=8, dtype="float16", seed=0):
    """Measured bytes of a batch of ``batch`` sequences with mixed lengths (uniform in [1, max_tokens], fixed seed):
    a FlatCache sized for max_tokens (its ``nbytes``) vs a PooledCache holding the same tokens (``stats()
    ["bytes_used"]``, the blocks in use), per block size. One layer, 32 query heads, head_dim 128."""
    import numpy as np

    from ..flat import FlatCache
    from ..pooled import PooledCache
    from ..shapes import CacheShape

    shape = CacheShape(1, Q_HEADS, kv_heads, D, dtype)
    lengths = np.random.default_rng(seed).integers(1, max_tokens + 1, batch)
    flat = FlatCache(shape, batch=batch, max_tokens=max_tokens, backend="cpu")
    rows = {"lengths": lengths.tolist(), "tokens": int(lengths.sum()), "flat_nbytes": flat.nbytes,
            "token_bytes": flat.token_bytes, "pooled": []}
    for block_size in block_sizes:
        blocks = int(sum(-(-int(n) // block_size) for n in lengths))
        cache = PooledCache(shape, num_blocks=blocks, block_size=block_size, batch=batch, backend="cpu")
        for s, n in enumerate(lengths.tolist()):
            kv = np.zeros((1, 1, n, kv_heads, D), dtype)
            cache.append(kv, kv, seq_ids=[s])
        stats = cache.stats()
        rows["pooled"].append({"block_size": block_size, "bytes_used": stats["bytes_used"],
                               "internal_fragmentation": stats["internal_fragmentation"]})
    return rows


def ring_memory(window=4096, n_values=(1024, 4096, 16384, 65536), kv_heads=8, dtype="float16"):
    """Measured ``nbytes`` of one RingCache of window W after n tokens, next to what a flat cache holding n tokens
    needs (kvref.memory.cache_bytes). One layer, 32 query heads, head_dim 128."""
    import numpy as np

    from ..memory import cache_bytes
    from ..ring import RingCache
    from ..shapes import CacheShape

    shape = CacheShape(1, Q_HEADS, kv_heads, D, dtype)
    ring = RingCache(shape, batch=1, window=window, backend="cpu")
    chunk = np.zeros((1, 1, window, kv_heads, D), dtype)
    rows = []
    for n in n_values:
        while ring.get_seq_length(0) < n:
            t = min(window, n - ring.get_seq_length(0))
            ring.append(chunk[:, :, :t], chunk[:, :, :t])
        rows.append({"n": n, "ring_nbytes": ring.nbytes, "position_bytes": ring.stats()["position_bytes"],
                     "flat_bytes": cache_bytes(shape, 1, n)})
    return {"window": window, "kv_heads": kv_heads, "dtype": dtype, "rows": rows}


# --------------------------------------------------------------------------------------------------------------
# Quantization and the two-tier cache
# --------------------------------------------------------------------------------------------------------------
QUANT_FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def bench_quantize(rng, rows=16384, cols=1024, formats=QUANT_FORMATS):
    """kvref-cpu quantize/dequantize vs gguf.quants (NumPy) on a (rows, cols) float32 array (64 MiB: DRAM, not L3).
    Returns one row per format with times, the input GB/s and whether the bytes were identical; [] without gguf."""
    import numpy as np

    try:
        import gguf
    except ImportError:
        return []
    from .. import quant
    from ..cpu import quant as cpu_quant

    x = rng.standard_normal((rows, cols), dtype=np.float32)
    out = []
    for fmt in formats:
        qtype = getattr(gguf.GGMLQuantizationType, fmt.upper())
        blocks = quant.quantize(x, fmt)
        t_kvref = median_time(lambda: quant.quantize(x, fmt), [()], min_reps=5)
        # the compiled loop alone (into a preallocated output), and the finite check quantize runs before it
        target = np.empty_like(blocks)
        t_loop = median_time(lambda: cpu_quant.quantize_rows(x, quant.GGML_TYPES[fmt], target), [()], min_reps=5)
        t_check = median_time(lambda: quant.check_finite("x", x), [()], min_reps=5)
        t_gguf = median_time(lambda: gguf.quants.quantize(x, qtype), [()], min_reps=3, min_seconds=0.5)
        reference = gguf.quants.quantize(x, qtype)
        t_deq = median_time(lambda: quant.dequantize(blocks, fmt, x.shape), [()], min_reps=5)
        t_gguf_deq = median_time(lambda: gguf.quants.dequantize(reference, qtype), [()], min_reps=3,
                                  min_seconds=0.5)
        out.append({"format": fmt, "bytes": int(x.nbytes), "kvref": t_kvref, "kvref_loop": t_loop,
                    "finite_check": t_check, "gguf": t_gguf, "kvref_deq": t_deq,
                    "gguf_deq": t_gguf_deq, "identical": bool(np.array_equal(blocks, reference))})
    return out


def _two_tier_ready(cache, k, v):
    """Fill a one-layer cache with all of k/v but the last token (in chunks), then write that token: a decode step."""
    import numpy as np

    n = k.shape[2]
    done = 0
    while done < n - 1:
        chunk = min(n - 1 - done, 4096)
        cache.append(np.ascontiguousarray(k[:, :, done:done + chunk]), np.ascontiguousarray(v[:, :, done:done + chunk]))
        done += chunk
    step = cache.plan(1)
    cache.write(step, 0, np.ascontiguousarray(k[0, :, n - 1:]), np.ascontiguousarray(v[0, :, n - 1:]))
    return step


def bench_two_tier(n, kv_heads, rng, formats=("q8_0", "q4_0"), tail=256, rounds=3):
    """Decode attention over n keys: a TwoTierCache (fp16 tail of ``tail`` tokens, the rest in the store) vs a
    FlatCache of fp16 holding n tokens. Times in alternating rounds on rotated caches, best median of each.
    Returns {"flat": s, fmt: s, ..., "bytes": {name: K/V bytes read}}."""
    import numpy as np

    from ..flat import FlatCache
    from ..quant import row_bytes
    from ..shapes import CacheShape
    from ..two_tier import TwoTierCache

    shape = CacheShape(1, Q_HEADS, kv_heads, D, "float16")
    k, v = _random_kv(rng, n, kv_heads, np.float16)
    flat_bytes = kv_bytes(kv_heads, n, "float16")
    caches = {"flat": []}
    read = {"flat": flat_bytes}
    for _ in range(rotations(flat_bytes)):
        flat = FlatCache(shape, batch=1, max_tokens=n, backend="cpu")
        caches["flat"].append((flat, _two_tier_ready(flat, k, v)))
    for fmt in formats:
        read[fmt] = 2 * kv_heads * ((n - tail) * row_bytes(D, fmt) + tail * D * 2)
        caches[fmt] = []
        for _ in range(rotations(read[fmt])):
            cache = TwoTierCache(shape, batch=1, tail_tokens=tail, max_tokens=n, store_format=fmt,
                                 migration_batch=min(64, tail), backend="cpu")
            caches[fmt].append((cache, _two_tier_ready(cache, k, v)))
    best = _best_of_rounds(caches, rng, rounds)
    best["bytes"] = read
    return best


# --------------------------------------------------------------------------------------------------------------
# One thread count (runs in a subprocess)
# --------------------------------------------------------------------------------------------------------------
def _versus_flat(bench, label, threads, sizes, rng):
    """Rows of ``bench`` (bench_ring or bench_pooled) for fp32 and fp16, 8 and 32 KV heads and the two largest
    sizes, each with its ratio to flat printed to stderr as it is measured."""
    rows = []
    for dtype in ("float32", "float16"):
        for kv_heads in (8, 32):
            for n in sizes[-2:]:
                r = bench(n, kv_heads, dtype, rng)
                rows.append({"dtype": dtype, "kv_heads": kv_heads, "n": n, **r})
                print(f"  [{threads} thr] {label} {dtype} kv_heads={kv_heads} n={n}: ratio {r['ratio']:.3f}",
                      file=sys.stderr, flush=True)
    return rows


def run_threads(threads, sizes, quick):
    """All measurements for one thread count (the strict read limit and the STREAM-like bandwidth, attention, and
    append with 1 thread), then the assembly verdicts of every attention kernel it compiled, as a JSON-able dict."""
    import numpy as np

    import numba

    numba.set_num_threads(threads)
    try:
        import torch

        torch.set_num_threads(threads)
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    rng = np.random.default_rng(0)
    result = {"threads": threads, "torch": torch_version, "numba": numba.__version__, "numpy": np.__version__}
    strict_before = strict_read_limit(repeats=3 if quick else 7)
    before = measure_bandwidth(threads, gib=0.5 if quick else 1.0)
    rows = []
    for dtype in ("float32", "float16"):
        for kv_heads in (4, 8, 32):  # G = 8, 4 and 1 with 32 query heads
            for n in sizes:
                times, caches, _ = bench_attention(n, kv_heads, dtype, rng)
                del caches
                rows.append({"dtype": dtype, "kv_heads": kv_heads, "n": n, "bytes": kv_bytes(kv_heads, n, dtype),
                             "times": times})
                print(f"  [{threads} thr] attention {dtype} kv_heads={kv_heads} n={n}: "
                      + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()), file=sys.stderr, flush=True)
    result["attention"] = rows
    # The second vCPU is shared and the bandwidth drifts: measure it again after the kernels, and divide by the
    # higher of the two readings, so that no kvref figure is flattered by a slow moment.
    after = measure_bandwidth(threads, gib=0.5 if quick else 1.0)
    strict_after = strict_read_limit(repeats=3 if quick else 7)
    # The strict limit (one thread, compiled int64 sum over 1 GiB) is the yardstick; the best of both readings.
    result["strict_read"] = {"GBps": max(strict_before["GBps"], strict_after["GBps"]),
                             "readings": [strict_before["GBps"], strict_after["GBps"]],
                             "nbytes": strict_before["nbytes"],
                             "note": strict_before["note"] or strict_after["note"]}
    result["bandwidth"] = {"read_GBps": max(before["read_GBps"], after["read_GBps"]),
                           "copy_GBps": max(before["copy_GBps"], after["copy_GBps"]),
                           "read_readings": [before["read_GBps"], after["read_GBps"]]}
    result["bandwidth_gib"] = 0.5 if quick else 1.0
    result["ring"] = _versus_flat(bench_ring, "ring vs flat", threads, sizes, rng)
    two_tier_rows = []
    for kv_heads in (8, 32):
        n = sizes[-1]
        r = bench_two_tier(n, kv_heads, rng)
        two_tier_rows.append({"kv_heads": kv_heads, "n": n, **r})
        print(f"  [{threads} thr] two-tier vs flat fp16 kv_heads={kv_heads} n={n}: "
              + ", ".join(f"{k} {r[k] * 1e3:.2f} ms" for k in r if k != "bytes"), file=sys.stderr, flush=True)
    result["two_tier"] = two_tier_rows
    result["pooled"] = _versus_flat(bench_pooled, "pooled (B=16) vs flat", threads, sizes, rng)
    if threads == 1:
        result["append"] = bench_append([1024, 4096, 16384, 65536], rng=rng)
        result["append_host"] = bench_append_host(rng=rng)
        result["ring_memory"] = ring_memory()
        result["quantize"] = bench_quantize(rng, rows=4096 if quick else 16384)
        result["pooled_memory"] = pooled_memory()
    # What the timed attention kernels compiled to (every specialisation this process compiled or loaded).
    from .asm import asm_rows, attention_dispatchers

    print(f"  [{threads} thr] inspecting the assembly of the attention kernels ...", file=sys.stderr, flush=True)
    result["asm"] = asm_rows(attention_dispatchers())
    return result

