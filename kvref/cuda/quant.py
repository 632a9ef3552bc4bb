"""CUDA twins of the quantization spec (``kvref/quant.py``): thread mappings whose bodies call the spec.

Thread mappings::

    quantize     one warp per ggml block: CUDA block ``item = blockIdx.x = r * n_blocks + b`` of L = QUANT_LANES
                 threads (32 on a GPU, ``SIMULATOR_MAX_LANES`` in the simulator); lane ``threadIdx.x`` takes elements
                 lane, lane + L, ... of the block: quant.quantize_one(x, fmt, blocks, r, b, lane, L), whose
                 statistics (max |x|, min, max, the 5th bits) are warp-shuffle reductions (``quant.lane_max``, ...)
    dequantize   one thread per ggml block, ``item = cuda.grid(1) = r * n_blocks + b``:
                 quant.dequantize_one(blocks, fmt, x, r, b, codes[item])

The lanes of a quantize warp read 32 consecutive floats (one 128-byte line) and write the block's bytes side by
side. A dequantize thread does 32 elements of work, like ggml's reference loop; the threads of a warp read
neighbouring blocks. The spec's ``dequantize_rows`` allocates its 32-float ``codes`` scratch with ``np.empty``,
which device code cannot do, so the dequantize launcher allocates a device array ``codes`` of shape (n_items, 32)
and hands row ``codes[item]`` to each thread.

**No FMA.** NVVM contracts ``a * b + c`` into one ``fma.rn.f32`` by default (even without fast-math), which rounds
once where ggml rounds twice: for q4_0's ``(int8_t)(x * id + 8.5f)`` 9 inputs then get a different code
(``../shared/reference/numba_facts.md`` §4(c)). The spec writes that product as ``quant.mul_rn(x, id)``; below, the
CUDA target gets its own overload of ``mul_rn``, ``numba.cuda.libdevice.fmul_rn`` (PTX ``mul.rn.f32``, which NVVM
never fuses). The CPU target keeps the plain multiply (Numba does not contract without fast-math). The simulator runs
the plain-Python spec, not this overload (libdevice functions are typing stubs there, which return NaN).
``tests_cuda/test_cuda_quant.py`` checks that the compiled quantize kernel's PTX has ``mul.rn.f32`` and no ``fma``.

Kernel bodies are plain Python functions made into kernels with ``cuda.jit``; ``KERNELS`` lists every body with the
signatures its launcher uses, so ``tests/test_ptx.py`` compiles each to sm_90 PTX without a GPU.
"""

import math

import numpy as np
from numba import cuda
from numba.core import config, types
from numba.extending import overload

from .. import quant
from . import is_device_array, lanes_for, on_device

#: threads per CUDA block of the dequantize kernel (each thread handles one 32-element quantization block)
THREADS = 64
#: the lanes that share one ggml block when quantizing: a warp (32) on a GPU, 4 in the simulator (the same code path
#: with 8x fewer simulated threads; see ``kvref.cuda.lanes_for``)
QUANT_LANES = lanes_for(quant.BLOCK)


# ---------------------------------------------------------------------------------------------------------------
# The CUDA form of the spec's unfused multiply
# ---------------------------------------------------------------------------------------------------------------
if not config.ENABLE_CUDASIM:  # the simulator runs quant.mul_rn as Python; libdevice is a stub there
    from numba.cuda import libdevice

    @overload(quant.mul_rn, target="cuda")
    def _mul_rn_cuda(a, b):
        """``a * b`` as PTX ``mul.rn.f32``: rounded on its own, never contracted with a following add into FMA."""
        if a == types.float32 and b == types.float32:
            return lambda a, b: libdevice.fmul_rn(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Kernels: index arithmetic only; the work is the spec's.
# ---------------------------------------------------------------------------------------------------------------
def _quantize_kernel_body(x, fmt, blocks):
    """CUDA block ``item`` quantizes ggml block b of row r (item = r * n_blocks + b); its threads are the lanes."""
    n_blocks = x.shape[1] // quant.BLOCK
    item = cuda.blockIdx.x
    quant.quantize_one(x, fmt, blocks, item // n_blocks, item % n_blocks, cuda.threadIdx.x, cuda.blockDim.x)


def _dequantize_kernel_body(blocks, fmt, x, codes):
    """Thread ``item`` dequantizes block b of row r, with ``codes[item]`` as its 32-float scratch."""
    n_blocks = x.shape[1] // quant.BLOCK
    item = cuda.grid(1)
    if item < x.shape[0] * n_blocks:
        quant.dequantize_one(blocks, fmt, x, item // n_blocks, item % n_blocks, codes[item])


_quantize_kernel = cuda.jit(_quantize_kernel_body)
_dequantize_kernel = cuda.jit(_dequantize_kernel_body)


def _signatures():
    f32 = types.Array(types.float32, 2, "C")
    u8 = types.Array(types.uint8, 2, "C")
    return {"quantize": [types.void(f32, types.int64, u8)],
            "dequantize": [types.void(u8, types.int64, f32, f32)]}


#: every kernel of this module: name -> (plain Python body, [numba signatures it is launched with])
KERNELS = {
    "quant.quantize": (_quantize_kernel_body, _signatures()["quantize"]),
    "quant.dequantize": (_dequantize_kernel_body, _signatures()["dequantize"]),
}


# ---------------------------------------------------------------------------------------------------------------
# Launchers and the operations object kvref.quant calls (backend_ops("quant", "cuda"))
# ---------------------------------------------------------------------------------------------------------------
def _launch_shape(n_items):
    threads = max(1, min(THREADS, n_items))
    return max(1, math.ceil(n_items / threads)), threads


def _output(out, dtype):
    """The device array a kernel writes into: ``out`` itself if it is a device array, else a new one."""
    return out if is_device_array(out) else cuda.device_array(out.shape, dtype)


def _copy_back(d_out, out):
    if d_out is not out:
        out[...] = d_out.copy_to_host()


def quantize_rows(x, fmt, blocks):
    """Spec: ``kvref.quant.quantize_rows``. x: (rows, n) float32, n % 32 == 0; blocks: (rows, n/32 * B) uint8, filled
    in place. Host or device arrays; a host ``blocks`` receives a copy of the result."""
    rows, n = x.shape
    n_items = rows * (n // quant.BLOCK)
    if n_items == 0:
        return blocks
    d_blocks = _output(blocks, np.uint8)
    _quantize_kernel[n_items, QUANT_LANES](on_device(x), int(fmt), d_blocks)  # one warp per ggml block
    _copy_back(d_blocks, blocks)
    return blocks


def dequantize_rows(blocks, fmt, x):
    """Spec: ``kvref.quant.dequantize_rows``. blocks: (rows, n/32 * B) uint8; x: (rows, n) float32, filled in place."""
    rows, n = x.shape
    n_items = rows * (n // quant.BLOCK)
    if n_items == 0:
        return x
    d_x = _output(x, np.float32)
    codes = cuda.device_array((n_items, quant.BLOCK), np.float32)  # per-thread scratch (the spec's np.empty)
    grid, threads = _launch_shape(n_items)
    _dequantize_kernel[grid, threads](on_device(blocks), int(fmt), d_x, codes)
    _copy_back(d_x, x)
    return x


class QuantOps:
    """What ``kvref.quant.quantize`` / ``dequantize`` call on a backend: ``quantize_rows`` and ``dequantize_rows``."""

    quantize_rows = staticmethod(quantize_rows)
    dequantize_rows = staticmethod(dequantize_rows)


OPS = QuantOps()
