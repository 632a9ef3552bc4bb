"""``python -m kvref.bench --gpu``: the CUDA backend's kernels on a real GPU, against the device's own copy bandwidth,
torch SDPA and (where ``flashinfer`` imports) FlashInfer's decode.

One run does, in order:

1. **The yardstick.** The device's copy bandwidth, measured in this process: the best of the driver's
   device-to-device copy and a numba copy kernel, counting bytes read + bytes written (:func:`copy_bandwidth`).
2. **The check, before anything is timed.** For every case, the same kernels (same variant, dtype, G and D) run on a
   small shape on the cuda backend and on the python backend (the spec as plain Python): the stored state must be
   equal and the attention equal to float32 rounding (:func:`check_against_python`). Then, at the timed shape, the
   cuda result is compared with the cpu backend fed the same K/V (numba njit, itself checked against the float64
   reference by the test suite), and for flat also with the float64 reference. A failure stops the run with exit
   status 1 and nothing is timed.
3. **The timings.** One decode step (T = 1) per case: the attend of flash-decoding (attend kernel + merge kernel,
   :func:`kvref.cuda.flash_decode`, captured from a real ``cache.attend`` call and replayed) and torch SDPA on the
   same K/V (``enable_gqa``), and the write kernel of a prefill chunk. Achieved bandwidth = the bytes the kernel must
   move (attend: every visible K and V row once, in the storage format; write: the new rows read and stored) / its
   time.

Times are CUDA-event times of back-to-back launches (``ITERS`` per repeat, the median of ``REPEATS``): the launch
queue stays ahead of the GPU as in a decode loop, so what is measured is the GPU's time, not Python's launch cost.
Without a GPU (or in the CUDA simulator) the command says so and exits with status 0, having measured nothing.
"""

import sys
import time

import numpy as np
from numba import cuda

#: back-to-back launches per timed repeat, and repeats (the median is reported)
ITERS = 20
REPEATS = 5
#: bytes of each buffer of the copy-bandwidth measurement (well past the 60 MB L2 of an H100/H200)
COPY_BYTES = 1 << 31
#: tokens per append while a cache is filled
FILL_CHUNK = 8192
#: the issue's targets: attend and write at >= 50% of the measured copy bandwidth (attend at n >= 32k)
TARGET_FRACTION = 0.5
TARGET_MIN_KEYS = 32768

#: (q_heads, kv_heads, head_dim) of the models the cases use
LLAMA_8B = (32, 8, 128)
GEMMA_2B = (8, 1, 256)
#: (variant, options, dtype, heads, batch, keys): the decode cases timed. ring: a window of half the keys (the ring
#: has wrapped); two_tier: a tail of 256 rows, the rest in the quantized store; pooled: blocks of 16 rows
CASES = (
    ("flat", {}, "float16", LLAMA_8B, 1, 32768),
    ("flat", {}, "float16", LLAMA_8B, 1, 131072),
    ("flat", {}, "float32", LLAMA_8B, 1, 131072),
    ("flat", {}, "float16", GEMMA_2B, 1, 131072),
    ("flat", {}, "float16", LLAMA_8B, 8, 32768),
    ("ring", {}, "float16", LLAMA_8B, 1, 65536),
    ("two_tier", {"store_format": "q8_0"}, "float16", LLAMA_8B, 1, 131072),
    ("two_tier", {"store_format": "q4_0"}, "float16", LLAMA_8B, 1, 131072),
    ("pooled", {}, "float16", LLAMA_8B, 1, 131072),
    ("pooled", {}, "float16", LLAMA_8B, 8, 32768),
)
#: the smoke cases of ``--quick``
QUICK_CASES = tuple(case for case in CASES if case[5] == 32768 or case[0] in ("ring", "two_tier"))
#: tokens of the write-kernel cases (one prefill chunk of batch 1, and the same over 8 sequences)
WRITE_CASES = (("flat", "float16", LLAMA_8B, 1, 32768), ("flat", "float16", LLAMA_8B, 8, 4096),
               ("pooled", "float16", LLAMA_8B, 1, 32768))
#: the small shape of the python check: the case's G and D, fewer KV heads, enough keys for 2 chunks (n // 256)
CHECK_KEYS = 600


def unavailable_reason():
    """None when a real CUDA GPU can run the kernels here; else why not (a sentence)."""
    from ..backends import backends

    available, reason = backends()["cuda"]
    if not available:
        return reason
    from numba.core import config

    if config.ENABLE_CUDASIM:
        return "numba.cuda is the CUDA simulator (NUMBA_ENABLE_CUDASIM=1): it checks kernels, it cannot time them"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------
def event_seconds(launch, new_event, synchronize, iters=None, repeats=None):
    """Seconds of one ``launch()`` on the GPU: timing events (``new_event()``) around ``iters`` back-to-back calls,
    the median of ``repeats``, after one warm-up call (which also compiles) and ``synchronize()``."""
    iters, repeats = iters or ITERS, repeats or REPEATS
    launch()
    synchronize()
    times = []
    for _ in range(repeats):
        start, end = new_event(), new_event()
        start.record()
        for _ in range(iters):
            launch()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)  # milliseconds -> seconds per launch
    return max(float(np.median(times)), 1e-9)  # (the simulator's events read -1 ms)


def gpu_seconds(launch):
    """:func:`event_seconds` of numba work (numba's events, on the default stream)."""
    return event_seconds(launch, cuda.event, cuda.synchronize)


def torch_seconds(launch):
    """:func:`event_seconds` of torch work (torch's events, on torch's current stream)."""
    import torch

    return event_seconds(launch, lambda: torch.cuda.Event(enable_timing=True), torch.cuda.synchronize)


def _copy_kernel_body(src, dst):
    """dst[k] = src[k], a grid-stride loop (consecutive threads, consecutive words: coalesced)."""
    for k in range(cuda.grid(1), src.size, cuda.gridsize(1)):
        dst[k] = src[k]


def copy_bandwidth(nbytes=COPY_BYTES):
    """The device's copy bandwidth in bytes/s (read + written): ``{"driver": ..., "kernel": ..., "best": ...}``, the
    driver's device-to-device copy and a numba copy kernel over ``nbytes``-byte buffers."""
    from ..cuda import sm_count

    src = cuda.device_array(nbytes // 4, np.float32)
    dst = cuda.device_array(nbytes // 4, np.float32)
    kernel = cuda.jit(_copy_kernel_body)
    driver = 2 * nbytes / gpu_seconds(lambda: dst.copy_to_device(src))
    blocks = sm_count() * 8
    compiled = 2 * nbytes / gpu_seconds(lambda: kernel[blocks, 256](src, dst))
    return {"driver": driver, "kernel": compiled, "best": max(driver, compiled)}


# ---------------------------------------------------------------------------------------------------------------
# Caches filled with the same K/V on two backends
# ---------------------------------------------------------------------------------------------------------------
def make_cache(variant, options, shape, batch, keys, backend):
    """A one-layer cache of ``variant`` that can hold ``keys`` tokens per sequence (ring: a window of keys / 2)."""
    import kvref

    if variant == "flat":
        return kvref.FlatCache(shape, batch=batch, max_tokens=keys + 1, backend=backend)
    if variant == "ring":
        return kvref.RingCache(shape, batch=batch, window=max(1, keys // 2), backend=backend)
    if variant == "two_tier":
        return kvref.TwoTierCache(shape, batch=batch, tail_tokens=min(256, keys), max_tokens=keys + 1,
                                  backend=backend, **options)
    if variant == "pooled":
        blocks = batch * (-(-(keys + 1) // 16))
        return kvref.PooledCache(shape, num_blocks=blocks, block_size=16, batch=batch, backend=backend)
    raise ValueError(f"unknown variant {variant!r}")


def fill(caches, rng, shape, batch, keys, chunk=FILL_CHUNK):
    """Append ``keys`` random tokens to every sequence of each cache (the same K/V to each), in chunks."""
    done = 0
    while done < keys:
        size = min(chunk, keys - done)
        dims = (1, batch, size, shape.kv_heads, shape.head_dim)
        k = rng.standard_normal(dims).astype(shape.public_dtype)
        v = rng.standard_normal(dims).astype(shape.public_dtype)
        for cache in caches:
            cache.append(k, v)
        done += size


def decode_step(caches, rng, shape, batch):
    """One decode step (T = 1) of layer 0 on each cache with the same K/V and q: returns [out of each cache]."""
    dims = (batch, 1, shape.kv_heads, shape.head_dim)
    k = rng.standard_normal(dims).astype(shape.public_dtype)
    v = rng.standard_normal(dims).astype(shape.public_dtype)
    q = rng.standard_normal((batch, 1, shape.q_heads, shape.head_dim)).astype(np.float32)
    outs = []
    for cache in caches:
        step = cache.plan(1)
        cache.write(step, 0, k, v)
        outs.append(cache.attend(step, 0, q))
        cache.advance(step)
    return outs, q


def same_state(a, b):
    """True when two ``cache.state()`` snapshots hold equal values (arrays compared exactly), apart from their
    ``version`` (a process-wide step counter, different for any two caches)."""
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(same_state(a[key], b[key]) for key in a if key != "version"))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_state, a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
    return a == b


def _shape(dtype, heads, kv_heads=None):
    from .. import CacheShape

    q_heads, model_kv_heads, head_dim = heads
    kv_heads = model_kv_heads if kv_heads is None else kv_heads
    group = q_heads // model_kv_heads
    return CacheShape(layers=1, q_heads=group * kv_heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)


def check_against_python(variant, options, dtype, heads, keys=CHECK_KEYS, seed=0):
    """The case's kernels (same G, D, dtype) on a small shape: cuda vs python backend. Returns (ok, detail)."""
    shape = _shape(dtype, heads, kv_heads=min(2, heads[1]))
    caches = [make_cache(variant, options, shape, 1, keys, backend) for backend in ("python", "cuda")]
    rng = np.random.default_rng(seed)
    fill(caches, rng, shape, 1, keys - 1, chunk=keys)
    (spec, got), _ = decode_step(caches, rng, shape, 1)
    error = float(np.max(np.abs(spec - got)))
    tolerance = 1e-5 * max(1.0, float(np.max(np.abs(spec))))
    states_equal = same_state(caches[0].state(), caches[1].state())
    ok = states_equal and error <= tolerance
    verdict = "equal" if states_equal else "DIFFERS"
    return ok, f"state {verdict}, cuda vs python max error {error:.1e} (<= {tolerance:.0e})"


# ---------------------------------------------------------------------------------------------------------------
# One timed case
# ---------------------------------------------------------------------------------------------------------------
def capture_flash_decode(module, call):
    """Run ``call()`` while recording the arguments of ``module.flash_decode`` (the variant's launch of
    flash-decoding); returns (call's result, (args, kwargs) of the launch)."""
    recorded = []
    original = module.flash_decode

    def recording(*args, **kwargs):
        recorded.append((args, kwargs))
        return original(*args, **kwargs)

    module.flash_decode = recording
    try:
        result = call()
    finally:
        module.flash_decode = original
    return result, recorded[-1]


def kv_bytes_read(cache, shape, batch, keys):
    """Bytes an attend must read: every visible K and V row once, in its storage format (per sequence: ring, its
    window; two-tier, the quantized store's block bytes and the tail's rows)."""
    row = shape.kv_heads * shape.head_dim
    if cache.__class__.__name__ == "RingCache":
        visible = [(min(keys, cache.window), shape.storage_dtype.itemsize)]
    elif cache.__class__.__name__ == "TwoTierCache":
        from .. import quant

        bits_per_value = quant.FORMATS[cache.store_format][2]
        tail = min(cache.tail_tokens, keys)
        visible = [(keys - tail, bits_per_value / 8), (tail, shape.storage_dtype.itemsize)]
    else:
        visible = [(keys, shape.storage_dtype.itemsize)]
    return int(batch * 2 * row * sum(rows * per_value for rows, per_value in visible))


def time_attend_case(case, rng, copy_bw, log):
    """Fill a cuda and a cpu cache alike, check the cuda decode step against the cpu one (and flat against the
    float64 reference), then time the captured flash-decoding launch and torch SDPA. Returns a result dict."""
    import importlib

    from .. import cuda as kvref_cuda
    from ..check import decode_attention_gqa

    variant, options, dtype, heads, batch, keys = case
    shape = _shape(dtype, heads)
    module = importlib.import_module(f"kvref.cuda.{variant}")
    caches = [make_cache(variant, options, shape, batch, keys + 1, backend) for backend in ("cpu", "cuda")]
    started = time.perf_counter()
    fill(caches, rng, shape, batch, keys)
    log(f"    filled {keys} tokens x {batch} in {time.perf_counter() - started:.1f} s")
    (outs, q), launch = capture_flash_decode(module, lambda: decode_step(caches, rng, shape, batch))
    expected, got = outs
    error = float(np.max(np.abs(expected - got)))
    tolerance = 1e-4 * max(1.0, float(np.max(np.abs(expected))))
    ok = error <= tolerance
    detail = f"vs cpu {error:.1e}"
    if variant == "flat" and ok:
        worst = 0.0
        for s in range(batch):
            k, v = caches[0].keys(0, s), caches[0].values(0, s)  # (kv_heads, n, D) in position order
            reference = decode_attention_gqa(q[s, 0], k, v, 1.0 / np.sqrt(shape.head_dim))
            worst = max(worst, float(np.max(np.abs(reference - got[s, 0]))))
        ok = worst <= tolerance
        detail += f", vs float64 {worst:.1e}"
    result = {"case": case, "ok": ok, "check": detail, "bytes": kv_bytes_read(caches[1], shape, batch, keys + 1)}
    if not ok:
        return result
    args, kwargs = launch
    kernels, n_keys, state_dims, kernel_args, out, lanes = args[:6]
    parts = args[6] if len(args) > 6 else kwargs.get("parts")
    d_out = cuda.device_array(out.shape, np.float32)
    chunks = kvref_cuda.choose_chunks(n_keys, int(np.prod(state_dims[:3]))) if parts is None else parts
    seconds = gpu_seconds(lambda: kvref_cuda.flash_decode(kernels, n_keys, state_dims, kernel_args, d_out, lanes,
                                                          parts))
    result.update(seconds=seconds, chunks=chunks, lanes=lanes, bandwidth=result["bytes"] / seconds,
                  fraction=result["bytes"] / seconds / copy_bw)
    result["torch"] = torch_sdpa(caches[0], shape, batch, q, result["bytes"])
    result["flashinfer"] = flashinfer_decode(caches[0], shape, batch, q, result["bytes"], variant)
    return result


def _torch_kv(cache, shape, batch):
    """The cache's visible K and V as torch tensors on the GPU, (batch, kv_heads, n, D) in the public dtype."""
    import torch

    ks = [cache.keys(0, s) for s in range(batch)]
    vs = [cache.values(0, s) for s in range(batch)]
    dtype = getattr(torch, shape.dtype) if shape.dtype in ("float16", "float32") else torch.float16
    k = torch.as_tensor(np.stack(ks)).to("cuda", dtype)
    v = torch.as_tensor(np.stack(vs)).to("cuda", dtype)
    return k, v


def torch_sdpa(cache, shape, batch, q, nbytes):
    """torch SDPA of the same decode step on the GPU (grouped heads via ``enable_gqa``): seconds and bandwidth over
    the same bytes as kvref's kernel, or why it did not run."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as exc:
        return {"skipped": f"torch not importable: {exc}"}
    if not torch.cuda.is_available():
        return {"skipped": "torch sees no GPU"}
    if cache.__class__.__name__ in ("RingCache", "TwoTierCache"):
        return {"skipped": "no ring/quantized layout in torch"}
    k, v = _torch_kv(cache, shape, batch)
    tq = torch.as_tensor(q[:, 0]).to("cuda", k.dtype)[:, :, None, :]  # (batch, q_heads, 1, D)
    seconds = torch_seconds(lambda: F.scaled_dot_product_attention(tq, k, v, enable_gqa=True))
    return {"seconds": seconds, "bandwidth": nbytes / seconds}


def flashinfer_decode(cache, shape, batch, q, nbytes, variant):
    """FlashInfer's single-sequence decode on the same K/V, where ``flashinfer`` imports (batch 1, fp16)."""
    try:
        import flashinfer
        import torch
    except ImportError:
        return {"skipped": "flashinfer-python not installed"}
    if batch != 1 or shape.dtype != "float16" or variant not in ("flat", "pooled"):
        return {"skipped": "single-sequence fp16 cases only"}
    k, v = _torch_kv(cache, shape, batch)
    k, v = (x[0].transpose(0, 1).contiguous() for x in (k, v))  # (n, kv_heads, D), FlashInfer's NHD layout
    tq = torch.as_tensor(q[0, 0]).to("cuda", torch.float16)
    seconds = torch_seconds(lambda: flashinfer.single_decode_with_kv_cache(tq, k, v))
    return {"seconds": seconds, "bandwidth": nbytes / seconds}


def time_write_case(case, rng):
    """One prefill chunk's write kernel: captured from ``cache.append`` on the cuda backend, replayed with the same
    device arrays. Bytes: the new rows read and stored (2 x K and V)."""
    from ..cuda import on_device

    variant, dtype, heads, batch, tokens = case
    shape = _shape(dtype, heads)
    cache = make_cache(variant, {}, shape, batch, tokens, "cuda")
    ops = cache._ops
    recorded = []
    original = ops.write_tokens

    def recording(*args):
        recorded.append(args)
        return original(*args)

    ops.write_tokens = recording
    try:
        fill([cache], rng, shape, batch, tokens, chunk=tokens)
    finally:
        ops.write_tokens = original  # OPS is the module's, shared by every cache
    args = tuple(on_device(a) if isinstance(a, np.ndarray) else a for a in recorded[-1])
    nbytes = 2 * 2 * batch * tokens * shape.kv_heads * shape.head_dim * shape.storage_dtype.itemsize
    seconds = gpu_seconds(lambda: original(*args))
    cuda.synchronize()
    return {"case": case, "seconds": seconds, "bytes": nbytes, "bandwidth": nbytes / seconds}


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------
def _gbs(x):
    return f"{x / 1e9:,.0f}"


def report(device, copy_bw, attend_rows, write_rows):
    """The Markdown section of BENCHMARKS.md for one GPU run."""
    lines = [f"### GPU: {device}", "",
             f"Copy bandwidth measured in this run (bytes read + written per second): driver copy "
             f"{_gbs(copy_bw['driver'])} GB/s, numba copy kernel {_gbs(copy_bw['kernel'])} GB/s; the yardstick is "
             f"the best, {_gbs(copy_bw['best'])} GB/s. Target: attend (n >= {TARGET_MIN_KEYS}) and write >= "
             f"{TARGET_FRACTION:.0%} of it.", "",
             "| variant | dtype | q/kv heads, D | batch | n | chunks x lanes | kvref µs | kvref GB/s | of copy | "
             "torch SDPA GB/s | FlashInfer GB/s | target | max error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in attend_rows:
        variant, options, dtype, heads, batch, keys = row["case"]
        name = variant + (f" {options['store_format']}" if options else "")
        if not row["ok"]:
            lines.append(f"| {name} | {dtype} | {heads[0]}/{heads[1]}, {heads[2]} | {batch} | {keys} | | | | | | | "
                         f"| FAILED: {row['check']} |")
            continue
        peers = [_gbs(row[p]["bandwidth"]) if "bandwidth" in row[p] else row[p]["skipped"]
                 for p in ("torch", "flashinfer")]
        met = row["fraction"] >= TARGET_FRACTION if keys >= TARGET_MIN_KEYS else None
        verdict = "" if met is None else ("met" if met else "missed")
        lines.append(f"| {name} | {dtype} | {heads[0]}/{heads[1]}, {heads[2]} | {batch} | {keys} | "
                     f"{row['chunks']} x {row['lanes']} | {row['seconds'] * 1e6:,.1f} | {_gbs(row['bandwidth'])} | "
                     f"{row['fraction']:.0%} | {peers[0]} | {peers[1]} | {verdict} | {row['check']} |")
    lines += ["", "| write | dtype | q/kv heads, D | batch | tokens | µs | GB/s | of copy | target |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in write_rows:
        variant, dtype, heads, batch, tokens = row["case"]
        fraction = row["bandwidth"] / copy_bw["best"]
        lines.append(f"| {variant} | {dtype} | {heads[0]}/{heads[1]}, {heads[2]} | {batch} | {tokens} | "
                     f"{row['seconds'] * 1e6:,.1f} | {_gbs(row['bandwidth'])} | {fraction:.0%} | "
                     f"{'met' if fraction >= TARGET_FRACTION else 'missed'} |")
    return "\n".join(lines) + "\n"


def run(cases=CASES, write_cases=WRITE_CASES, check_keys=CHECK_KEYS, copy_bytes=COPY_BYTES, log=None):
    """The whole GPU benchmark (see the module docstring). Returns (exit status, Markdown report or None)."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    device = getattr(cuda.get_current_device(), "name", "the CUDA simulator")
    device = device.decode() if isinstance(device, bytes) else device
    log(f"kvref.bench --gpu on {device}")
    log("checking each timed kernel against the python backend (small shapes) ...")
    seen = set()
    for variant, options, dtype, heads, _, _ in cases:
        key = (variant, tuple(sorted(options.items())), dtype, heads[0] // heads[1], heads[2])
        if key in seen:
            continue
        seen.add(key)
        ok, detail = check_against_python(variant, options, dtype, heads, keys=check_keys)
        log(f"  {variant} {options or ''} {dtype} G={key[3]} D={key[4]}: {'ok' if ok else 'FAILED'} ({detail})")
        if not ok:
            log("kvref.bench --gpu: a kernel disagrees with the python backend; nothing was timed")
            return 1, None
    log("measuring the copy bandwidth ...")
    copy_bw = copy_bandwidth(copy_bytes)
    log(f"  driver {_gbs(copy_bw['driver'])} GB/s, numba kernel {_gbs(copy_bw['kernel'])} GB/s")
    rng = np.random.default_rng(0)
    attend_rows = []
    for case in cases:
        log(f"  attend {case}")
        row = time_attend_case(case, rng, copy_bw["best"], log)
        log(f"    {row['check']}" + (f", {_gbs(row['bandwidth'])} GB/s ({row['fraction']:.0%} of copy)"
                                     if row["ok"] else " FAILED"))
        if not row["ok"]:
            log("kvref.bench --gpu: a kernel disagrees with the cpu backend at the timed shape; stopped")
            return 1, report(device, copy_bw, attend_rows + [row], [])
        attend_rows.append(row)
    write_rows = []
    for case in write_cases:
        row = time_write_case(case, rng)
        log(f"  write {case}: {_gbs(row['bandwidth'])} GB/s")
        write_rows.append(row)
    return 0, report(device, copy_bw, attend_rows, write_rows)


def main(quick=False, out="-"):
    """``python -m kvref.bench --gpu``: 0 after printing (or writing) the report, 0 with a message when there is no
    GPU to measure, 1 when a kernel fails its check."""
    reason = unavailable_reason()
    if reason is not None:
        print(f"kvref.bench --gpu: no GPU benchmark on this machine: {reason}. Nothing was measured.",
              file=sys.stderr)
        return 0
    status, text = run(QUICK_CASES if quick else CASES)
    if text is not None:
        if out == "-":
            sys.stdout.write(text)
        else:
            with open(out, "w") as f:
                f.write(text)
    return status
