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
import math  # noqa: E402

import numpy as np  # noqa: E402

from numba.core import config  # noqa: E402

from ..attention import local_array  # noqa: E402
from ..lowering import Specialisations, literal_shape, lower_local_array  # noqa: E402, F401

#: threads per block for the attend kernels (one thread per work item)
ATTEND_THREADS = 64
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


def attend_launch(n_items):
    """Launch shape of an attend kernel with one thread per work item (i, t, kv_head): ``(blocks, threads)``. Each
    thread's scratch (accumulators, scores, softmax state) is ``attention.local_array``: CUDA local memory."""
    threads = max(1, min(ATTEND_THREADS, n_items))
    return max(1, math.ceil(n_items / threads)), threads


def ptx_kernels(name, body_for, signatures):
    """``KERNELS`` entries of an attend kernel specialised per shape: ``{name[shape]: (body, signatures)}`` for each
    shape of :data:`PTX_SHAPES` (what ``tests/test_ptx.py`` compiles)."""
    return {f"{name}[G={shape[0]}, D={shape[1]}]": (body_for(*shape), signatures) for shape in PTX_SHAPES}


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
