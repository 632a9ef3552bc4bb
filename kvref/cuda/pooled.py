"""CUDA twins of the pooled (paged) cache's spec (``kvref/pooled.py``): thread mappings whose bodies call the spec.

The kernels below contain no cache logic: no page-table walk, no slot arithmetic, no softmax. Each thread works out
which element (write, copy) or which work item (attend) is its own and calls the spec function that handles exactly
that, ``pooled.write_one``, ``pooled.copy_one`` or ``pooled.attend_part``, which numba-cuda compiles as device
functions together with everything they call (``pooled.block_of``, ``attention.attend_rows``, ``fp16.widen``'s
generic overload, ``attention.exp_f32``).

Thread mappings::

    copy     grid (n_copies, kv_heads), block min(B * head_dim, 1024) threads
             block (c, h) copies KV head h of copy-on-write pair c (source block copies[c, 0] -> copies[c, 1]), K and
             V, this layer; thread x strides over the B * head_dim elements of the block, element e = r * head_dim + d
             (row r, element d). A step without copies launches nothing.
    write    grid (n_seq * T, kv_heads), block head_dim threads       (as for the flat cache)
             block (row, h) is token t of step-sequence i with row = i * T + t; thread d stores element d in the
             token's slot (block = slot // B, row = slot % B); if head_dim > 1024, each thread strides over d
    attend   flash-decoding, as for the flat cache: grid (item, chunk), block L lanes; block (item, part) runs
             pooled.attend_part over chunk ``part`` of positions starts[i] .. p, block by block through the step's
             table tables[i]; lane j on columns j::L; then the merge kernel (``attention.merge_parts``)

``PooledCache.write`` launches copy, then write, on one stream, so a copied block is complete before a new token
lands in it (the order of the spec: copies first, then the scatter). Within a launch no two threads write one
element: the plan's copy targets are distinct fresh blocks, and its slots are distinct.

The attend kernel reads its q rows from global memory through the lane view (not from shared memory as flat and
ring do): the spec's ``pooled.attend_part`` takes the whole q array and picks head range h itself. One kernel per
(G, D, L), built on first use.

Numerics: writes and copies are copies, bit-identical to the python backend. Attention agrees with the spec to
float32 rounding, not bit for bit (FMA contraction, libdevice's exp).

Kernel bodies are plain Python functions made into kernels with ``cuda.jit``; ``KERNELS`` lists each body with the
signatures it is launched with (fp32 and uint16 storage), which ``tests/test_ptx.py`` compiles to sm_90 PTX.
"""

import numpy as np
from numba import cuda

from .. import pooled
from ..flat import work_item
from . import (MAX_BLOCK_THREADS, CudaOps, Specialisations, flash_decode, kernel_signatures, lanes_for, on_device,
               ptx_kernels)


# ---------------------------------------------------------------------------------------------------------------
# Kernels: index arithmetic only; the work is the spec's.
# ---------------------------------------------------------------------------------------------------------------
def _copy_kernel_body(kv, layer, copies):
    """Block (c, h) copies KV head h of copy-on-write pair c; thread x copies elements x, x + blockDim, ... of the
    block's B * head_dim (row r = e // head_dim, element d = e % head_dim)."""
    c = cuda.blockIdx.x
    h = cuda.blockIdx.y
    head_dim = kv.shape[5]
    for e in range(cuda.threadIdx.x, kv.shape[4] * head_dim, cuda.blockDim.x):
        pooled.copy_one(kv, layer, copies, c, h, e // head_dim, e % head_dim)


def _write_kernel_body(kv, layer, slots, k_new, v_new):
    """Block (i * T + t, h) writes head h of new token t of step-sequence i; thread d writes element d."""
    i, t, h = work_item(cuda.blockIdx.x * cuda.gridDim.y + cuda.blockIdx.y, slots.shape[1], cuda.gridDim.y)
    for d in range(cuda.threadIdx.x, k_new.shape[3], cuda.blockDim.x):
        pooled.write_one(kv, layer, slots, k_new, v_new, i, t, h, d)


def _attend_kernel_body(group, head_dim, lanes=1):
    """The flash-decoding attend kernel for G = group, D = head_dim and L = lanes (constants: kvref/attention.py,
    "Specialisation"; kvref/cuda/__init__.py, "Flash-decoding"). Each block takes one KV head, so the spec's
    per-head scratch is sized for one (``kv_heads`` = 1)."""
    lane_dim = head_dim // lanes

    def attend(kv, layer, tables, starts, positions, q, scale, part_acc, part_m_l):
        """Block (item, part): chunk ``part`` of the keys of item (i, t, h), read through the block table; lane j
        takes columns j::lanes. (The spec's paged ``attend_part`` indexes q itself, so q is read from global memory
        here, not staged in shared memory: G x D floats per block, against the chunk's thousands of K/V rows.)"""
        i, t, h = work_item(cuda.blockIdx.x, positions.shape[1], kv.shape[3])
        part, parts, lane = cuda.blockIdx.y, cuda.gridDim.y, cuda.threadIdx.x
        pooled.attend_part(kv[:, :, :, :, :, lane::lanes], layer, tables, starts, positions, q[:, :, :, lane::lanes],
                           scale, part_acc[i, t, h:h + 1, part, :, lane::lanes], part_m_l[i, t, h:h + 1, part], i, t,
                           h, h + 1, part, parts, group, lane_dim, 1)

    return attend


_copy_kernel = cuda.jit(_copy_kernel_body)
_write_kernel = cuda.jit(_write_kernel_body)
_attend_kernels = Specialisations(lambda group, head_dim, lanes: cuda.jit(_attend_kernel_body(group, head_dim, lanes)))


def _signatures():
    """The signatures the launchers below use (C-contiguous arrays; storage float32 or uint16)."""
    from numba.core.types import float32 as f32, int64 as i64

    return kernel_signatures({
        "copy": lambda s, C: (C(s, 6), i64, C(i64, 2)),
        "write": lambda s, C: (C(s, 6), i64, C(i64, 2), C(s, 4), C(s, 4)),
        "attend": lambda s, C: (C(s, 6), i64, C(i64, 2), C(i64, 1), C(i64, 2), C(f32, 4), f32, C(f32, 6),
                                C(f32, 6)),
    })


#: every kernel of this module: name -> (plain Python body, [numba signatures it is launched with])
KERNELS = {
    "pooled.copy": (_copy_kernel_body, _signatures()["copy"]),
    "pooled.write": (_write_kernel_body, _signatures()["write"]),
    **ptx_kernels("pooled.attend", _attend_kernel_body, _signatures()["attend"]),
}


# ---------------------------------------------------------------------------------------------------------------
# Launchers and the operations object a cache calls (the interface of kvref.backends.HostOps)
# ---------------------------------------------------------------------------------------------------------------
def copy_blocks(kv, layer, copies):
    """The step's copy-on-write copies for one layer (spec: ``kvref.pooled.copy_blocks``); ``kv`` is on the device.

    copies: (n, 2) int64 (source block, target block), host or device array; nothing is launched when n = 0.
    """
    n_copies = copies.shape[0]
    if n_copies == 0:
        return
    block_size, head_dim = kv.shape[4], kv.shape[5]
    threads = min(block_size * head_dim, MAX_BLOCK_THREADS)
    _copy_kernel[(n_copies, kv.shape[3]), threads](kv, int(layer), on_device(copies))


def write_tokens(kv, layer, slots, k_new, v_new):
    """Scatter the new K/V of one layer into their pool slots (spec: ``kvref.pooled.write_tokens``); ``kv`` is on
    the device.

    slots: (n_seq, T) int64; k_new, v_new: (n_seq, T, kv_heads, head_dim) in the storage dtype, host or device arrays.
    """
    n_seq, n_tokens, kv_heads, head_dim = k_new.shape
    threads = min(head_dim, MAX_BLOCK_THREADS)
    _write_kernel[(n_seq * n_tokens, kv_heads), threads](
        kv, int(layer), on_device(slots), on_device(k_new), on_device(v_new))


def attend_tokens(kv, layer, tables, starts, positions, q, scale, out, group, head_dim, kv_heads, parts=None):
    """Paged attention of one layer for every new token (spec: ``kvref.pooled.attend_tokens``), into ``out`` in place,
    as flash-decoding (:func:`kvref.cuda.flash_decode`; ``parts``: the chunk count, else chosen from n and the SMs).

    tables: (n_seq, C) int64; starts: (n_seq,) int64; positions: (n_seq, T) int64;
    q, out: (n_seq, T, q_heads, head_dim) float32, host or device arrays; a host ``out`` receives a copy of the result.
    """
    lanes = lanes_for(head_dim)
    host_positions, host_starts = CudaOps.to_host(positions), CudaOps.to_host(starts)
    n_keys = int(np.max(host_positions - host_starts[:, None])) + 1 if positions.size else 1  # starts[i] .. p
    args = (kv, int(layer), on_device(tables), on_device(starts), on_device(positions), on_device(q),
            np.float32(scale))
    return flash_decode(_attend_kernels(group, head_dim, lanes), n_keys, positions.shape + (kv_heads, group,
                        head_dim), args, out, lanes, parts)


OPS = CudaOps(write_tokens=write_tokens, copy_blocks=copy_blocks, attend_tokens=attend_tokens)
