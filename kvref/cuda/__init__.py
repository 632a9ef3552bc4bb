"""The CUDA backend: ``numba.cuda`` kernels that map threads onto the spec functions. Nothing here rewrites an algorithm.

Each ``kvref/cuda/<variant>.py`` computes a thread's indices and calls the very same ``@register_jitable`` spec
functions that ``kvref/<variant>.py`` runs as plain Python and ``kvref/cpu`` compiles with ``numba.njit``; numba-cuda
compiles them as device functions. Each module exposes ``OPS``, the operations object a cache calls (same interface
as :class:`kvref.backends.HostOps`, with device arrays).

**Which numba.cuda.** ``numba.cuda`` must come from the ``numba-cuda`` package (``implementation == "NVIDIA"``).
Without that package, ``from numba import cuda`` silently gives numba's deprecated built-in target
(``implementation == "Built-in"``), which kvref does not support.

**The simulator rule.** Whether ``numba.cuda`` is the CUDA simulator is fixed when ``numba`` is first imported:
set ``NUMBA_ENABLE_CUDASIM=1`` in the environment *before anything imports numba* (kvref itself imports numba).
Setting it later fails with ``CudaSupportError`` at driver initialisation. The simulator and a real GPU cannot be
used in one process, so the CUDA tests (``tests_cuda/``) run in their own pytest process::

    python -m pytest tests_cuda                   # simulator (the default; no GPU needed)
    KVREF_CUDA=gpu python -m pytest tests_cuda    # the same tests on a real GPU

The simulator does no type checking, so passing there proves the thread mapping, not that the kernels compile for
a GPU; ``tests/test_ptx.py`` compiles every kernel to sm_90 PTX (needs ``pip install kvref[cu13]``, no GPU).

**Flash-decoding.** Every attend runs as split-K (the section of that name below): a grid over (work item, key
chunk) with one warp of L lanes per block, each block the spec's ``attend_part`` over its chunk, then a merge kernel
that calls the spec's ``attention.merge_parts``. The chunk count comes from n and the SM count
(:func:`choose_chunks`); the lanes share each dot product through ``attention.lane_sum``, warp shuffles on a GPU
(:func:`_register_lane_reductions`). The merge rule itself lives only in ``kvref/attention.py``.

This package is imported only when a cache asks for ``backend="cuda"`` (see :mod:`kvref.backends`), so
``import kvref`` never touches ``numba.cuda``.
"""

from numba import cuda

if getattr(cuda, "implementation", None) != "NVIDIA":
    raise ImportError(
        "kvref.cuda needs numba.cuda from the numba-cuda package (cuda.implementation == 'NVIDIA'); found "
        f"{getattr(cuda, 'implementation', 'unknown')!r}, numba's deprecated built-in CUDA target. "
        "Install it with: pip install 'numba-cuda<0.31' (or 'kvref[cu13]' for a CUDA 13 toolchain)")


# ---------------------------------------------------------------------------------------------------------------
# Device-array plumbing shared by every variant's launchers
# ---------------------------------------------------------------------------------------------------------------

import numpy as np  # noqa: E402

from numba.core import config  # noqa: E402

from .. import attention  # noqa: E402
from ..attention import local_array, merge_parts  # noqa: E402
from ..flat import work_item  # noqa: E402
from ..lowering import Specialisations, literal_shape, lower_local_array  # noqa: E402, F401

#: the most threads a CUDA block may have; wider heads make each write thread stride over head_dim
MAX_BLOCK_THREADS = 1024


def kernel_signatures(kernels):
    """Numba signatures of kernels for fp32 and uint16 (fp16 bits) storage: ``kernels`` maps a name to a function
    ``args(storage, C)`` giving the argument types, where ``C(dtype, ndim)`` is a C-contiguous array type. Returns
    {name: [void(args) for each storage dtype]}, what ``tests/test_ptx.py`` compiles."""
    from numba.core import types

    def contiguous(dtype, ndim):
        return types.Array(dtype, ndim, "C")

    return {name: [types.void(*args(storage, contiguous)) for storage in (types.float32, types.uint16)]
            for name, args in kernels.items()}


def ptx_kernels(name, body_for, signatures, lanes=None):
    """``KERNELS`` entries of an attend kernel specialised per shape: ``{name[shape]: (body, signatures)}`` for each
    shape (G, D) of :data:`PTX_SHAPES`, built as ``body_for(G, D, L)`` with L = ``lanes(D)`` (default
    :func:`lanes_for`): what ``tests/test_ptx.py`` compiles."""
    lanes = lanes_for if lanes is None else lanes
    return {f"{name}[G={g}, D={d}]": (body_for(g, d, lanes(d)), signatures) for g, d in PTX_SHAPES}


#: (G, D) shapes whose attend kernels tests/test_ptx.py compiles for sm_90: shapes the CUDA tests run, and two
#: presets' (Llama-3-8B: G = 4, D = 128; Gemma-2B: G = 8, D = 256)
PTX_SHAPES = ((2, 16), (1, 32), (4, 128), (8, 256))


def _register_local_array():
    """``attention.local_array(shape)`` in CUDA kernels: one local-memory array (``kvref/lowering.py``). Registered
    for numba-cuda's own typing and lowering; the simulator runs the spec's ``np.empty`` instead."""
    from numba.cuda import types as cuda_types
    from numba.cuda.extending import lower_builtin, type_callable

    @type_callable(local_array)
    def _type_local_array(context):
        def typer(shape):
            dims = literal_shape(shape)
            return cuda_types.Array(cuda_types.float32, len(dims), "C") if dims else None

        return typer

    lower_builtin(local_array, cuda_types.BaseTuple)(lower_local_array)


if not config.ENABLE_CUDASIM:
    _register_local_array()


def is_device_array(a):
    """True for numba device arrays, real and simulated."""
    return bool(getattr(a, "__cuda_ndarray__", False))


def on_device(a):
    """A device array as is; a host array copied to the device (C-contiguous)."""
    return a if is_device_array(a) else cuda.to_device(np.ascontiguousarray(a))


def result_array(out):
    """The device array a kernel writes its result into: ``out`` itself if it is on the device, else a new one."""
    return out if is_device_array(out) else cuda.device_array(out.shape, np.float32)


def copy_result(d_out, out):
    """Bring a kernel's result back into a host ``out`` (no-op when ``out`` is the device array itself)."""
    if d_out is out:
        return
    if out.flags.c_contiguous:
        d_out.copy_to_host(out)
    else:
        out[...] = d_out.copy_to_host()


class CudaOps:
    """Operations for the cuda backend (the interface of :class:`kvref.backends.HostOps`): the cache's storage lives
    in device arrays; inputs may be host or device arrays. The keyword arguments (``write_tokens``, ``attend_tokens``, ...)
    are the variant's launchers."""

    def __init__(self, **launchers):
        for name, launcher in launchers.items():  # write_tokens=..., attend_tokens=..., commit_tokens=...
            setattr(self, name, launcher)

    @staticmethod
    def zeros(dims, dtype):
        """A zero-filled device array."""
        return cuda.to_device(np.zeros(dims, dtype))

    @staticmethod
    def full(dims, fill, dtype):
        """A device array of ``dims`` filled with ``fill``."""
        return cuda.to_device(np.full(dims, fill, dtype))

    @staticmethod
    def memory_limit():
        """Bytes an allocation may ask for: the GPU's memory (in the simulator, and for the host staging copy, the
        host's memory as well)."""
        from ..backends import host_memory_bytes

        limit = host_memory_bytes()
        if not config.ENABLE_CUDASIM:
            limit = min(limit, cuda.current_context().get_memory_info()[1])
        return limit

    @staticmethod
    def to_host(a):
        """A NumPy copy of a device array; NumPy arrays pass through."""
        return a.copy_to_host() if is_device_array(a) else a

    @staticmethod
    def from_host(a):
        """A device copy of host array a."""
        return cuda.to_device(np.ascontiguousarray(a))

    @staticmethod
    def copy(a):
        """A private device copy of a (host or device array)."""
        if is_device_array(a):
            c = cuda.device_array(a.shape, a.dtype)
            c.copy_to_device(a)
            return c
        return cuda.to_device(np.ascontiguousarray(a))

    @staticmethod
    def is_device_array(a):
        return is_device_array(a)

    @staticmethod
    def as_storage(a, storage_dtype):
        """float16 arrays (host or device) become their uint16 bit patterns (zero-copy); others pass through."""
        if is_device_array(a):
            return a.view(storage_dtype)
        return np.ascontiguousarray(a).view(storage_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Flash-decoding (split-K): the schedule every attend kernel runs
# ---------------------------------------------------------------------------------------------------------------
#: a key chunk (one block's share of an item's keys) is never cut below this many keys: a block's fixed cost (loading
#: q, saving its state, its share of the merge: about G x D x 3 floats) stays small beside the keys it reads
MIN_CHUNK_KEYS = 256
#: blocks aimed for per SM: 16 blocks of one warp each keep 512 threads resident per SM to hide load latency
BLOCKS_PER_SM = 16
#: the most lanes (threads) that share one dot product: one warp, so the lane sum is a butterfly of warp shuffles
MAX_LANES = 32


#: the most lanes in the CUDA simulator, which runs one Python thread per CUDA thread (and each butterfly step through
#: a barrier): the same code path as 32 lanes (strided columns, a butterfly of lane sums), 8x fewer threads
SIMULATOR_MAX_LANES = 4


def lanes_for(head_dim, most=None):
    """L, the threads that share an item's dot products: the largest power of two <= ``most`` dividing head_dim
    (``most``: 32 = ``MAX_LANES`` on a GPU, so L = 32 for every real model's head_dim; ``SIMULATOR_MAX_LANES`` in
    the simulator). Lane j holds columns j, j + L, j + 2L, ... of q, K, V and the output."""
    if most is None:
        most = SIMULATOR_MAX_LANES if config.ENABLE_CUDASIM else MAX_LANES
    lanes = 1
    while lanes < most and head_dim % (2 * lanes) == 0:
        lanes *= 2
    return lanes


def sm_count():
    """The device's streaming multiprocessors (1 in the simulator, which has no such attribute)."""
    return int(getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", 1))


def choose_chunks(n_keys, items, sms=None):
    """P, the key chunks per work item (the grid's second dimension), from the keys and the SM count, as FlashInfer's
    split-K does: enough blocks to fill every SM (``BLOCKS_PER_SM`` each), but no chunk under ``MIN_CHUNK_KEYS``
    keys, and never more chunks than tiles.

        P = max(1, min(ceil(sms * BLOCKS_PER_SM / items), n_keys // MIN_CHUNK_KEYS))

    Batch 1, 8 KV heads, n = 32k on a 132-SM H100: P = min(264, 128) = 128 chunks of 256 keys, 1024 blocks."""
    sms = sm_count() if sms is None else sms
    wanted = -(-sms * BLOCKS_PER_SM // max(1, items))
    return max(1, min(wanted, n_keys // MIN_CHUNK_KEYS))


@cuda.jit(device=True)
def load_query_rows(q, i, t, first, rows):
    """Copy the G query rows ``q[i, t, first:first + G]`` into the block's shared array ``rows`` (G, D), the block's
    threads taking every blockDim-th element, then wait for all of them (every thread of the block must call it)."""
    group, head_dim = rows.shape
    for k in range(cuda.threadIdx.x, group * head_dim, cuda.blockDim.x):
        rows[k // head_dim, k % head_dim] = q[i, t, first + k // head_dim, k % head_dim]
    cuda.syncthreads()


def _merge_kernel_body(group, head_dim, lanes):
    """The merge kernel: block (i, t, h) of the grid, lane j merges columns j::lanes of the item's P partial states
    (``attention.merge_parts``; each lane keeps its own running state, the parts are only read)."""
    lane_dim = head_dim // lanes

    def merge(part_acc, part_m_l, out):
        n_tokens, kv_heads = part_acc.shape[1], part_acc.shape[2]
        i, t, h = work_item(cuda.blockIdx.x, n_tokens, kv_heads)
        lane = cuda.threadIdx.x
        merge_parts(part_acc[i, t, h, :, :, lane::lanes], part_m_l[i, t, h],
                    out[i, t, h * group:(h + 1) * group, lane::lanes], group, lane_dim)

    return merge


_merge_kernels = Specialisations(lambda group, head_dim, lanes: cuda.jit(_merge_kernel_body(group, head_dim, lanes)))


def _merge_signatures():
    """The merge kernel's signature: part_acc (6-D), part_m_l (6-D), out (4-D), all C-contiguous float32."""
    from numba.core import types

    return [types.void(*(types.Array(types.float32, ndim, "C") for ndim in (6, 6, 4)))]


#: this module's kernels (``tests/test_ptx.py``): the merge, for each shape of PTX_SHAPES
KERNELS = ptx_kernels("merge", _merge_kernel_body, _merge_signatures())


#: the partial states of recent launches, by shape: a decode loop reuses them rather than allocating two device arrays
#: per step. Reuse is safe because kvref launches on one stream, where each kernel starts after the one before ends.
_partial_states = {}
#: shapes kept at most (a new one past this clears the rest)
PARTIAL_STATES_KEPT = 8


def partial_states(dims, head_dim):
    """(part_acc, part_m_l) of shapes ``dims + (head_dim,)`` and ``dims + (2,)``, float32 device arrays, reused
    from an earlier launch of the same shape (their contents are written by the attend kernel before being read)."""
    key = dims + (head_dim,)
    if key not in _partial_states:
        if len(_partial_states) >= PARTIAL_STATES_KEPT:
            _partial_states.clear()
        _partial_states[key] = (cuda.device_array(key, np.float32), cuda.device_array(dims + (2,), np.float32))
    return _partial_states[key]


def flash_decode(kernels, n_keys, state_dims, args, out, lanes, parts=None):
    """Run one step's attention as flash-decoding: the attend kernel on a grid (item, chunk) with ``lanes`` threads
    per block, each block the online softmax of one chunk of one item's keys (the variant's spec ``attend_part``),
    then the merge kernel, one block per item (the spec's ``merge_parts``).

    kernels: the variant's attend kernel for this shape; n_keys: the most keys an item can see (sizes the chunks);
    state_dims: (n_seq, T, kv_heads, G, D); args: the attend kernel's arguments before the partial states; out: the
    result, host or device; parts: the chunk count when the caller chose it (else :func:`choose_chunks`)."""
    n_seq, n_tokens, kv_heads, group, head_dim = state_dims
    items = n_seq * n_tokens * kv_heads
    parts = choose_chunks(n_keys, items) if parts is None else int(parts)
    part_acc, part_m_l = partial_states((n_seq, n_tokens, kv_heads, parts, group), head_dim)
    kernels[(items, parts), lanes](*args, part_acc, part_m_l)
    d_out = result_array(out)
    _merge_kernels(group, head_dim, lanes)[items, lanes](part_acc, part_m_l, d_out)
    copy_result(d_out, out)
    return out


def _add(a, b):
    return a + b


def _larger(a, b):
    return max(a, b)


def _smaller(a, b):
    return min(a, b)


def _bitwise_or(a, b):
    return a | b


def _simulated_butterfly(x, lanes, combine):
    """A lane reduction in the CUDA simulator, which has no warp shuffles: the butterfly of the GPU form
    (``lanes / 2, lanes / 4, ..., 1`` apart), each step through the block's barrier (the lanes sharing one reduction
    are the whole block). Outside a simulated kernel (the python backend in the same process), or with one lane, it
    is the spec's identity."""
    import threading

    from numba.cuda.simulator.kernel import BlockThread

    thread = threading.current_thread()
    if not isinstance(thread, BlockThread) or lanes == 1:
        return x
    lane = thread.threadIdx.x
    exchange = thread._manager.__dict__.setdefault("kvref_lanes", {})
    offset = lanes // 2
    while offset > 0:
        exchange[lane] = x
        thread.syncthreads()
        partner = exchange[lane ^ offset]
        thread.syncthreads()
        x = combine(x, partner)
        offset //= 2
    return x


def _simulated_lane_sum(x):
    """``attention.lane_sum`` in the simulator: the lanes are the block (``blockDim.x``)."""
    import threading

    manager = getattr(threading.current_thread(), "_manager", None)
    lanes = manager._block_dim[0] if manager is not None else 1
    return _simulated_butterfly(x, lanes, _add)


def _simulated(combine):
    """The simulator's form of a ``quant.lane_*`` reduction ``(x, lanes)`` combining with ``combine``."""
    return lambda x, lanes: _simulated_butterfly(x, lanes, combine)


#: the spec's lane reductions of kvref/quant.py (the quantize warps) and how each combines two lanes' values
QUANT_LANE_REDUCTIONS = {"lane_max": _larger, "lane_min": _smaller, "lane_or": _bitwise_or}


def _register_lane_reductions():
    """The compiled forms of the spec's lane reductions, ``attention.lane_sum`` (over the block's lanes) and
    ``quant.lane_max`` / ``lane_min`` / ``lane_or`` (over ``lanes`` lanes): warp shuffles on a GPU, a butterfly of
    ``cuda.shfl_xor_sync`` (log2 L steps; each step combines the same two values in every lane, so every lane gets
    the same value, up to the sign of a zero for max and min: the spec only compares those). In the simulator the
    spec's globals are replaced by the simulated butterflies above (whose compiled forms, for CPU code compiled in
    the same process, are the identity)."""
    from numba.extending import overload, register_jitable

    from .. import quant

    if config.ENABLE_CUDASIM:
        attention.lane_sum = _simulated_lane_sum
        overload(_simulated_lane_sum)(lambda x: (lambda x: x))
        for name, combine in QUANT_LANE_REDUCTIONS.items():
            simulated = _simulated(combine)
            setattr(quant, name, simulated)
            overload(simulated)(lambda x, lanes: (lambda x, lanes: x))
        return

    def butterfly(combine):
        """``reduce(x, lanes)``: the shuffle butterfly over one warp's first ``lanes`` threads."""
        combine = register_jitable(combine)

        @register_jitable
        def reduce(x, lanes):
            mask = np.uint32((np.int64(1) << lanes) - 1)
            offset = lanes // 2
            while offset > 0:
                x = combine(x, cuda.shfl_xor_sync(mask, x, offset))
                offset //= 2
            return x

        return reduce

    def over_lanes(combine):
        """The typing function of an overload ``(x, lanes)``: the butterfly of ``combine``."""
        reduce = butterfly(combine)
        return lambda x, lanes: (lambda x, lanes: reduce(x, lanes))

    block_sum = butterfly(_add)
    overload(attention.lane_sum, target="cuda")(
        lambda x: (lambda x: block_sum(x, cuda.blockDim.x)))  # the lanes are the block: one warp or part of one
    for name, combine in QUANT_LANE_REDUCTIONS.items():
        overload(getattr(quant, name), target="cuda")(over_lanes(combine))


_register_lane_reductions()
