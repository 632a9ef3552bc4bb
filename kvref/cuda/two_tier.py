"""CUDA twins of the two-tier cache's spec (``kvref/two_tier.py``): thread mappings whose bodies call the spec.

Thread mappings (migrate, append: one warp per work item, CUDA block ``item = blockIdx.x`` of L = QUANT_LANES
threads, 32 on a GPU; lane = ``threadIdx.x``)::

    migrate  item = (i * n_old + k) * kv_heads + h: quantizes the k-th old tail token that leaves sequence i's tail
             (K and V rows of head h) into its store slot, the L lanes sharing each ggml block:
             two_tier.migrate_one(..., lane, L)
    append   item = (i * T + t) * kv_heads + h: stores new token t of head h in its tier, the lanes sharing each
             block it quantizes, or copying elements lane, lane + L, ... into the tail: two_tier.append_one
    attend   flash-decoding with ONE lane per block: grid (item, chunk); block (item, part) runs two_tier.attend_part
             over chunk ``part`` of the item's rows (store blocks decoded in the kernel, the tail, the step's own
             rows), q rows in shared memory; then the merge kernel (``attention.merge_parts``)

``advance`` launches migrate, then append, on one stream, so every old tail row is quantized before a new token may
take its slot (the order the spec's ``commit_tokens`` runs its two loops in). Quantizing bytes identical to ggml's
needs the unfused multiply of ``quant.mul_rn`` (its CUDA overload lives in ``kvref/cuda/quant.py``, imported here).
The spec's one-thread scratch row (``quant.quantize_row`` widens a block into it when ``lanes == 1``) is unused by
the warps, which read the row themselves; the launchers pass a one-row device array. The attend threads'
scratch is the spec's ``attention.local_array`` (per-thread local memory), so there is one attend kernel per shape
(G, D), built on first use.

Known gaps (BENCHMARKS.md, "GPU"): the attend runs one lane per block, because the spec decodes a quantized row
whole (``attention.decode_rows``, 32 values per ggml block) and a lane view of the store's bytes would cut through
blocks. It is correct and slow.
"""

import numpy as np
from numba import cuda, float32

from .. import two_tier
from ..flat import work_item
from ..quant import BLOCK
from . import (CudaOps, Specialisations, flash_decode, kernel_signatures, load_query_rows, on_device,
               ptx_kernels)
from .quant import QUANT_LANES  # (importing kvref.cuda.quant registers the CUDA form of quant.mul_rn)


# ---------------------------------------------------------------------------------------------------------------
# Kernels: index arithmetic only; the work is the spec's.
# ---------------------------------------------------------------------------------------------------------------
def _migrate_kernel_body(tail, store, layer, seq_ids, positions, tiers, fmt, n_old, scratch):
    """CUDA block ``item`` (its threads the lanes) migrates old tail token k of step-sequence i, head h."""
    i, k, h = work_item(cuda.blockIdx.x, n_old, tail.shape[3])
    two_tier.migrate_one(tail, store, layer, seq_ids, positions, tiers, fmt, scratch[0], i, k, h, cuda.threadIdx.x,
                         cuda.blockDim.x)


def _append_kernel_body(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, fmt, scratch):
    """CUDA block ``item`` (its threads the lanes) stores new token t of step-sequence i, head h."""
    i, t, h = work_item(cuda.blockIdx.x, positions.shape[1], tail.shape[3])
    two_tier.append_one(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, fmt, scratch[0], i, t, h,
                        cuda.threadIdx.x, cuda.blockDim.x)


def _attend_kernel_body(group, head_dim, lanes=1):
    """The flash-decoding attend kernel for G = group and D = head_dim (constants: kvref/attention.py,
    "Specialisation"; kvref/cuda/__init__.py, "Flash-decoding"), with one lane: the spec decodes whole quantized rows
    (``attention.decode_rows``), so head_dim is not cut over lanes here (``lanes`` must be 1)."""
    assert lanes == 1, "the two-tier attend kernel runs one lane per block"

    def attend(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q, scale, part_acc,
               part_m_l):
        """Block (item, part): chunk ``part`` of the keys of item (i, t, h), store, tail and step segments."""
        i, t, h = work_item(cuda.blockIdx.x, positions.shape[1], tail.shape[3])
        part, parts = cuda.blockIdx.y, cuda.gridDim.y
        q_rows = cuda.shared.array((group, head_dim), float32)
        load_query_rows(q, i, t, h * group, q_rows)
        two_tier.attend_part(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q_rows,
                             scale, part_acc[i, t, h, part], part_m_l[i, t, h, part], i, t, h, part, parts, group,
                             head_dim)

    return attend


_migrate_kernel = cuda.jit(_migrate_kernel_body)
_append_kernel = cuda.jit(_append_kernel_body)
_attend_kernels = Specialisations(lambda group, head_dim: cuda.jit(_attend_kernel_body(group, head_dim, 1)))


def _signatures():
    """The signatures the launchers below use (C-contiguous arrays; tail storage float32 or uint16)."""
    from numba.core.types import float32 as f32, int64 as i64, uint8 as u8

    return kernel_signatures({
        "migrate": lambda s, C: (C(s, 6), C(u8, 6), i64, C(i64, 1), C(i64, 2), C(i64, 2), i64, i64, C(f32, 2)),
        "append": lambda s, C: (C(s, 6), C(u8, 6), i64, C(i64, 1), C(i64, 2), C(i64, 2), C(s, 4), C(s, 4), i64,
                                C(f32, 2)),
        "attend": lambda s, C: (C(s, 6), C(u8, 6), i64, C(i64, 1), C(i64, 2), C(i64, 2), C(s, 4), C(s, 4), i64, i64,
                                C(f32, 4), f32, C(f32, 6), C(f32, 6)),
    })


#: every kernel of this module: name -> (plain Python body, [numba signatures it is launched with])
KERNELS = {
    "two_tier.migrate": (_migrate_kernel_body, _signatures()["migrate"]),
    "two_tier.append": (_append_kernel_body, _signatures()["append"]),
    **ptx_kernels("two_tier.attend", _attend_kernel_body, _signatures()["attend"], lanes=lambda head_dim: 1),
}


# ---------------------------------------------------------------------------------------------------------------
# Launchers and the operations object a cache calls
# ---------------------------------------------------------------------------------------------------------------
assert QUANT_LANES > 1, "every block gets the same one-lane scratch row: it must never be written"
_UNUSED_SCRATCH = []


def _unused_scratch():
    """The spec's one-lane scratch argument, a (1, 32) device array allocated once: the warps never touch it."""
    if not _UNUSED_SCRATCH:
        _UNUSED_SCRATCH.append(cuda.device_array((1, BLOCK), np.float32))
    return _UNUSED_SCRATCH[0]


def _warp_per_item(n_items):
    """(blocks, threads) for one warp of QUANT_LANES threads per work item, as Python ints: a real GPU refuses a
    numpy integer as a launch dimension (the simulator takes it), and the item counts come from numpy shapes."""
    return int(n_items), int(QUANT_LANES)


def commit_tokens(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, fmt):
    """Store one layer's step (spec: ``kvref.two_tier.commit_tokens``): the migrate kernel, then the append kernel,
    one warp of QUANT_LANES threads per work item."""
    n_seq, n_tokens, kv_heads, _ = pending_k.shape
    d_seq_ids, d_positions, d_tiers = on_device(seq_ids), on_device(positions), on_device(tiers)
    unused_scratch = _unused_scratch()  # the spec's one-lane scratch; the warps read the row itself
    n_old = max(two_tier.old_tokens_leaving(positions, tiers, i) for i in range(n_seq))  # the spec's count, on host
    if n_old > 0:
        _migrate_kernel[_warp_per_item(n_seq * n_old * kv_heads)](tail, store, int(layer), d_seq_ids, d_positions,
                                                                   d_tiers, int(fmt), int(n_old), unused_scratch)
    if n_seq * n_tokens * kv_heads > 0:
        n_items = n_seq * n_tokens * kv_heads
        _append_kernel[_warp_per_item(n_items)](tail, store, int(layer), d_seq_ids, d_positions, d_tiers,
                                                on_device(pending_k), on_device(pending_v), int(fmt), unused_scratch)


def attend_tokens(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q, scale, out,
                  group, head_dim, parts=None):
    """Attention of one layer for every new token (spec: ``kvref.two_tier.attend_tokens``), into ``out`` in place,
    as flash-decoding with one lane per block (:func:`kvref.cuda.flash_decode`; ``parts``: the chunk count, else
    chosen from n and the SMs)."""
    n_keys = int(np.max(CudaOps.to_host(positions))) + 1 if positions.size else 1  # at most p + 1 keys
    args = (tail, store, int(layer), on_device(seq_ids), on_device(positions), on_device(tiers), on_device(pending_k),
            on_device(pending_v), int(window), int(fmt), on_device(q), np.float32(scale))
    return flash_decode(_attend_kernels(group, head_dim), n_keys, positions.shape + (tail.shape[3], group, head_dim),
                        args, out, 1, parts)


OPS = CudaOps(commit_tokens=commit_tokens, attend_tokens=attend_tokens)
