"""Timing and bandwidth helpers of the benchmarks: the median of repeated calls on rotated inputs, the strict read
limit of one thread (a compiled int64 sum over 1 GiB, :func:`strict_read_limit`: the yardstick), the older STREAM-like
float32 read and copy of this machine's memory (kept for comparison: it reads less), the K/V bytes one decode step
reads, and the machine's description.

Every case times decode attention with one query token, ``Q_HEADS`` = 32 query heads and head_dim ``D`` = 128.
Inputs are rotated over at least ``ROTATE_BYTES`` (256 MiB) of caches so that no timing is served from the 32 MiB L3.
"""

import math
import os
import platform
import time

ROTATE_BYTES = 256 * 2**20
D = 128
Q_HEADS = 32


def median_time(fn, args_list, min_reps=5, min_seconds=0.3, max_reps=200):
    """Median wall time of fn(*args), cycling through args_list (rotated inputs)."""
    fn(*args_list[0])  # warm-up (and compile)
    times = []
    start = time.perf_counter()
    i = 0
    while (len(times) < min_reps or time.perf_counter() - start < min_seconds) and len(times) < max_reps:
        args = args_list[i % len(args_list)]
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
        i += 1
    times.sort()
    return times[len(times) // 2]


_STREAM_KERNELS = []


def _stream_kernels():
    """The compiled parallel float32 read and copy of :func:`measure_bandwidth` (compiled once per process)."""
    if not _STREAM_KERNELS:
        import numba
        import numpy as np

        @numba.njit(parallel=True, fastmath=True)
        def read(a, chunks):
            n = a.size
            partial = np.zeros(chunks, np.float32)
            for c in numba.prange(chunks):
                part = a[c * n // chunks:(c + 1) * n // chunks]
                s = np.float32(0.0)
                for i in range(part.size):
                    s += part[i]
                partial[c] = s
            return partial.sum()

        @numba.njit(parallel=True)
        def copy(dst, src, chunks):
            n = src.size
            for c in numba.prange(chunks):
                d = dst[c * n // chunks:(c + 1) * n // chunks]
                s = src[c * n // chunks:(c + 1) * n // chunks]
                for i in range(s.size):
                    d[i] = s[i]

        _STREAM_KERNELS.append((read, copy))
    return _STREAM_KERNELS[0]


def measure_bandwidth(threads, gib=1.0, copy=True):
    """STREAM-like read (and, if ``copy``, copy) of a ``gib`` GiB float32 array with ``threads`` Numba threads ->
    {"read_GBps": ..., "copy_GBps": ... or None}."""
    import numba
    import numpy as np

    read_kernel, copy_kernel = _stream_kernels()
    numba.set_num_threads(threads)
    n = int(gib * 2**30 // 4)
    a = np.ones(n, np.float32)
    chunks = 64
    t_read = median_time(read_kernel, [(a, chunks)], min_reps=5, min_seconds=1.0)
    result = {"read_GBps": a.nbytes / t_read / 1e9, "copy_GBps": None}
    if copy:
        b = np.empty_like(a)
        t_copy = median_time(copy_kernel, [(b, a, chunks)], min_reps=5, min_seconds=1.0)
        result["copy_GBps"] = 2 * a.nbytes / t_copy / 1e9
    return result


_INT64_SUM = []


def _int64_sum():
    """The compiled sequential int64 sum of :func:`strict_read_limit` (compiled once per process, not cached)."""
    if not _INT64_SUM:
        import numba

        @numba.njit
        def int64_sum(a):
            s = 0
            for i in range(a.size):
                s += a[i]
            return s

        _INT64_SUM.append(int64_sum)
    return _INT64_SUM[0]


def available_memory():
    """MemAvailable of /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def strict_read_limit(nbytes=1 << 30, repeats=7):
    """The strict read limit of one thread: the best (highest) GB/s of ``repeats`` passes of a Numba-compiled
    sequential int64 sum over an int64 array of ``nbytes`` bytes (1 GiB by default: 32x the L3), measured in the
    calling process on its calling thread. The array is written first so that every page is mapped before the first
    timed pass; the sum is compiled before it too. This is the yardstick kvref's attention figures are judged
    against: on the project's machine it reads 39-42 GB/s, where the STREAM-like float32 read of
    :func:`measure_bandwidth` gave about 34 GB/s and NumPy reads 21-33 GB/s.

    Returns {"GBps": best, "readings": [GB/s of each pass], "nbytes": bytes read per pass, "passes": repeats,
    "note": None, or why the array is smaller than asked (less memory available than 2 x nbytes: it then reads
    half of what is available, and says so; under 1 GiB it is no longer a DRAM figure one can trust)}."""
    import numpy as np

    note = None
    available = available_memory()
    if available is not None and available < 2 * nbytes:
        smaller = max(8 << 20, (available // 2) // 8 * 8)
        note = (f"memory short: {available / 2**30:.1f} GiB available, so the strict read used "
                f"{smaller / 2**30:.2f} GiB instead of {nbytes / 2**30:.2f} GiB")
        nbytes = min(nbytes, smaller)
    a = np.empty(max(1, int(nbytes) // 8), np.int64)
    a.fill(1)  # touch every page before timing
    fn = _int64_sum()
    fn(a[:1024])  # compile
    readings = []
    for _ in range(max(1, int(repeats))):
        t0 = time.perf_counter()
        total = fn(a)
        t = time.perf_counter() - t0
        if total != a.size:
            raise RuntimeError(f"strict_read_limit: the int64 sum read {total}, expected {a.size}")
        readings.append(a.nbytes / t / 1e9)
    return {"GBps": max(readings), "readings": readings, "nbytes": int(a.nbytes), "passes": len(readings),
            "note": note}


def kv_bytes(kv_heads, n, dtype):
    """K/V bytes one decode step over n cached tokens reads: 2 * kv_heads * n * D * element bytes."""
    return 2 * kv_heads * n * D * (4 if dtype == "float32" else 2)


def rotations(nbytes):
    """How many copies of an input of ``nbytes`` bytes cover ROTATE_BYTES (at least one)."""
    return max(1, math.ceil(ROTATE_BYTES / nbytes))


def machine_info():
    """Platform, Python, NumPy, core count and CPU model, for the report."""
    import numpy as np

    info = {"platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info
