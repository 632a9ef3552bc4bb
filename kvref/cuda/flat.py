"""CUDA twins of the flat cache's spec (``kvref/flat.py``): thread mappings whose bodies call the spec.

The kernels below contain no cache logic. Each thread works out which element (write) or which work item (attend)
is its own and calls the spec function that handles exactly that, ``flat.write_one`` or ``flat.attend_part``. Those
are ``@register_jitable`` functions, which numba-cuda compiles as device functions, together with everything they
call (``attention.attend_rows``, ``attention.merge_parts``, ``fp16.widen`` through its generic overload,
``attention.exp_f32``).

Thread mappings::

    write    grid (n_seq * T, kv_heads), block head_dim threads       (ARCHITECTURE.md, "Write")
             block (row, h) is token t of step-sequence i with row = i * T + t; thread d stores element d
             (if head_dim > 1024, the most threads a block can have, each thread strides over d)
    attend   flash-decoding (kvref/cuda/__init__.py, "Flash-decoding"): grid (item, chunk), block L lanes
             block (item, part) with item = (i * T + t) * kv_heads + h runs flat.attend_part for key chunk ``part``
             (``attention.key_share``) of that item: the G query rows are loaded into shared memory first, lane j
             reads columns j, j + L, ... of every key row (L = 32 for every real head_dim: a warp reads a row in
             one coalesced sweep) and ``attention.lane_sum`` adds the lanes' partial dot products with warp
             shuffles. Then the merge kernel (one block per item) combines the P partial states with the spec's
             ``attention.merge_parts``.

The attend kernel is the spec's ``attend_part`` on a strided view: the kernel only chooses the item, the chunk and
the lane's columns. Its scratch comes from ``attention.local_array``, whose sizes (G, D / L) are compile-time
constants, so there is one kernel per (G, D, L) (``_attend_kernels``: kvref/attention.py, "Specialisation").
Measured on an H200 this schedule is correct but far from the copy bandwidth (BENCHMARKS.md, "GPU"): each lane
keeps its own copy of the scores tile in local memory and the kernel needs 100+ registers.

Numerics: writes are copies, bit-identical to the python backend. Attention agrees with the spec to float32
rounding, not bit for bit: NVVM contracts ``a * b + c`` into FMA by default and ``math.exp`` lowers to libdevice.

Kernel bodies are plain Python functions (``_write_kernel_body``; ``_attend_kernel_body(G, D, L)`` returns one) made
into kernels with ``cuda.jit``. ``KERNELS`` lists every body with the signatures it is launched with (attend: for each
shape of ``PTX_SHAPES``), so ``tests/test_ptx.py`` can compile each one to PTX for sm_90 without a GPU
(``cuda.compile_ptx(body, sig, cc=(9, 0))``).
"""

import numpy as np
from numba import cuda, float32

from .. import flat
from ..flat import work_item
from . import (MAX_BLOCK_THREADS, CudaOps, Specialisations, flash_decode, kernel_signatures, lanes_for,
               load_query_rows, on_device, ptx_kernels)


# ---------------------------------------------------------------------------------------------------------------
# Kernels: index arithmetic only; the work is the spec's.
# ---------------------------------------------------------------------------------------------------------------
def _write_kernel_body(kv, layer, seq_ids, slots, k_new, v_new):
    """Block (i * T + t, h) writes head h of new token t of step-sequence i; thread d writes element d."""
    i, t, h = work_item(cuda.blockIdx.x * cuda.gridDim.y + cuda.blockIdx.y, slots.shape[1], cuda.gridDim.y)
    for d in range(cuda.threadIdx.x, k_new.shape[3], cuda.blockDim.x):
        flat.write_one(kv, layer, seq_ids, slots, k_new, v_new, i, t, h, d)


def _attend_kernel_body(group, head_dim, lanes=1):
    """The flash-decoding attend kernel for G = group, D = head_dim and L = lanes (constants: kvref/attention.py,
    "Specialisation"; kvref/cuda/__init__.py, "Flash-decoding")."""
    lane_dim = head_dim // lanes

    def attend(kv, layer, seq_ids, positions, q, scale, part_acc, part_m_l):
        """Block (item, part): chunk ``part`` of the keys of item (i, t, h); lane j takes columns j::lanes."""
        i, t, h = work_item(cuda.blockIdx.x, positions.shape[1], kv.shape[3])
        part, parts, lane = cuda.blockIdx.y, cuda.gridDim.y, cuda.threadIdx.x
        q_rows = cuda.shared.array((group, head_dim), float32)
        load_query_rows(q, i, t, h * group, q_rows)
        flat.attend_part(kv[:, :, :, :, :, lane::lanes], layer, seq_ids, positions, q_rows[:, lane::lanes], scale,
                         part_acc[i, t, h, part, :, lane::lanes], part_m_l[i, t, h, part], i, t, h, part, parts,
                         group, lane_dim)

    return attend


_write_kernel = cuda.jit(_write_kernel_body)
_attend_kernels = Specialisations(lambda group, head_dim, lanes: cuda.jit(_attend_kernel_body(group, head_dim, lanes)))


def _signatures():
    """The signatures the launchers below use (C-contiguous arrays; storage float32 or uint16)."""
    from numba.core.types import float32 as f32, int64 as i64

    return kernel_signatures({
        "write": lambda s, C: (C(s, 6), i64, C(i64, 1), C(i64, 2), C(s, 4), C(s, 4)),
        "attend": lambda s, C: (C(s, 6), i64, C(i64, 1), C(i64, 2), C(f32, 4), f32, C(f32, 6), C(f32, 6)),
    })


#: every kernel of this module: name -> (plain Python body, [numba signatures it is launched with])
KERNELS = {
    "flat.write": (_write_kernel_body, _signatures()["write"]),
    **ptx_kernels("flat.attend", _attend_kernel_body, _signatures()["attend"]),
}


# ---------------------------------------------------------------------------------------------------------------
# Launchers and the operations object a cache calls (the interface of kvref.backends.HostOps)
# ---------------------------------------------------------------------------------------------------------------
def write_tokens(kv, layer, seq_ids, slots, k_new, v_new):
    """Scatter the new K/V of one layer into their slots (spec: ``kvref.flat.write_tokens``); ``kv`` is on the device.

    k_new, v_new: (n_seq, T, kv_heads, head_dim) in the storage dtype, host or device arrays.
    """
    n_seq, n_tokens, kv_heads, head_dim = k_new.shape
    threads = min(head_dim, MAX_BLOCK_THREADS)
    _write_kernel[(n_seq * n_tokens, kv_heads), threads](
        kv, int(layer), on_device(seq_ids), on_device(slots), on_device(k_new), on_device(v_new))


def attend_tokens(kv, layer, seq_ids, positions, q, scale, out, group, head_dim, parts=None):
    """Attention of one layer for every new token (spec: ``kvref.flat.attend_tokens``), into ``out`` in place, as
    flash-decoding (:func:`kvref.cuda.flash_decode`; ``parts``: the chunk count, else chosen from n and the SMs).

    q, out: (n_seq, T, q_heads, head_dim) float32, host or device arrays; a host ``out`` receives a copy of the result.
    """
    lanes = lanes_for(head_dim)
    n_keys = int(np.max(CudaOps.to_host(positions))) + 1 if positions.size else 1  # position p sees p + 1 keys
    args = (kv, int(layer), on_device(seq_ids), on_device(positions), on_device(q), np.float32(scale))
    return flash_decode(_attend_kernels(group, head_dim, lanes), n_keys, positions.shape + (kv.shape[3], group,
                        head_dim), args, out, lanes, parts)


OPS = CudaOps(write_tokens=write_tokens, attend_tokens=attend_tokens)
