"""CUDA twins of the ring cache's spec (``kvref/ring.py``): thread mappings whose bodies call the spec.

The thread mappings are the flat cache's (``kvref/cuda/flat.py``)::

    write    grid (n_seq * T, kv_heads), block head_dim threads; thread d of block (i * T + t, h) runs
             ring.write_one(..., i, t, h, d), which also records the token's position (thread h = 0, d = 0).
             A token with slot -1 (a later token of the same step takes its slot) writes nothing, so no two threads
             ever write one slot.
    attend   flash-decoding, as for the flat cache: grid (item, chunk), block L lanes; block (item, part) runs
             ring.attend_part over chunk ``part`` of the item's candidate rows (the W ring slots, then the step's
             held-aside rows; a slot is skipped unless its stored position is visible), q rows in shared memory,
             lane j on columns j::L; then the merge kernel (``attention.merge_parts``).
"""

import numpy as np
from numba import cuda, float32

from .. import ring
from ..flat import work_item
from . import (MAX_BLOCK_THREADS, CudaOps, Specialisations, flash_decode, kernel_signatures, lanes_for,
               load_query_rows, on_device, ptx_kernels)


# ---------------------------------------------------------------------------------------------------------------
# Kernels: index arithmetic only; the work is the spec's.
# ---------------------------------------------------------------------------------------------------------------
def _write_kernel_body(kv, slot_positions, layer, seq_ids, positions, slots, k_new, v_new):
    """Block (i * T + t, h) writes head h of new token t of step-sequence i; thread d writes element d."""
    i, t, h = work_item(cuda.blockIdx.x * cuda.gridDim.y + cuda.blockIdx.y, slots.shape[1], cuda.gridDim.y)
    for d in range(cuda.threadIdx.x, k_new.shape[3], cuda.blockDim.x):
        ring.write_one(kv, slot_positions, layer, seq_ids, positions, slots, k_new, v_new, i, t, h, d)


def _attend_kernel_body(group, head_dim, lanes=1):
    """The flash-decoding attend kernel for G = group, D = head_dim and L = lanes (constants: kvref/attention.py,
    "Specialisation"; kvref/cuda/__init__.py, "Flash-decoding")."""
    lane_dim = head_dim // lanes

    def attend(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q, scale, part_acc,
               part_m_l):
        """Block (item, part): chunk ``part`` of the candidate rows of item (i, t, h); lane j takes columns
        j::lanes."""
        i, t, h = work_item(cuda.blockIdx.x, positions.shape[1], kv.shape[3])
        part, parts, lane = cuda.blockIdx.y, cuda.gridDim.y, cuda.threadIdx.x
        q_rows = cuda.shared.array((group, head_dim), float32)
        load_query_rows(q, i, t, h * group, q_rows)
        ring.attend_part(kv[:, :, :, :, :, lane::lanes], slot_positions, layer, seq_ids, positions,
                         pending_k[:, :, :, lane::lanes], pending_v[:, :, :, lane::lanes], window, sinks,
                         q_rows[:, lane::lanes], scale, part_acc[i, t, h, part, :, lane::lanes],
                         part_m_l[i, t, h, part], i, t, h, part, parts, group, lane_dim)

    return attend


_write_kernel = cuda.jit(_write_kernel_body)
_attend_kernels = Specialisations(lambda group, head_dim, lanes: cuda.jit(_attend_kernel_body(group, head_dim, lanes)))


def _signatures():
    """The signatures the launchers below use (C-contiguous arrays; storage float32 or uint16)."""
    from numba.core.types import float32 as f32, int64 as i64

    return kernel_signatures({
        "write": lambda s, C: (C(s, 6), C(i64, 3), i64, C(i64, 1), C(i64, 2), C(i64, 2), C(s, 4), C(s, 4)),
        "attend": lambda s, C: (C(s, 6), C(i64, 3), i64, C(i64, 1), C(i64, 2), C(s, 4), C(s, 4), i64, i64,
                                C(f32, 4), f32, C(f32, 6), C(f32, 6)),
    })


#: every kernel of this module: name -> (plain Python body, [numba signatures it is launched with])
KERNELS = {
    "ring.write": (_write_kernel_body, _signatures()["write"]),
    **ptx_kernels("ring.attend", _attend_kernel_body, _signatures()["attend"]),
}


# ---------------------------------------------------------------------------------------------------------------
# Launchers and the operations object a cache calls
# ---------------------------------------------------------------------------------------------------------------
def write_tokens(kv, slot_positions, layer, seq_ids, positions, slots, k_new, v_new):
    """Scatter one layer's new K/V into their ring slots (spec: ``kvref.ring.write_tokens``); kv and slot_positions
    are device arrays, the others host or device arrays."""
    n_seq, n_tokens, kv_heads, head_dim = k_new.shape
    threads = min(head_dim, MAX_BLOCK_THREADS)
    _write_kernel[(n_seq * n_tokens, kv_heads), threads](
        kv, slot_positions, int(layer), on_device(seq_ids), on_device(positions), on_device(slots),
        on_device(k_new), on_device(v_new))


def attend_tokens(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q, scale, out,
                  group, head_dim, parts=None):
    """Attention of one layer for every new token (spec: ``kvref.ring.attend_tokens``), into ``out`` in place, as
    flash-decoding (:func:`kvref.cuda.flash_decode`; ``parts``: the chunk count, else chosen from n and the SMs)."""
    lanes = lanes_for(head_dim)
    n_keys = kv.shape[4] + pending_k.shape[1]  # candidate rows: the W slots, then the step's pending rows
    args = (kv, slot_positions, int(layer), on_device(seq_ids), on_device(positions), on_device(pending_k),
            on_device(pending_v), int(window), int(sinks), on_device(q), np.float32(scale))
    return flash_decode(_attend_kernels(group, head_dim, lanes), n_keys, positions.shape + (kv.shape[3], group,
                        head_dim), args, out, lanes, parts)


OPS = CudaOps(write_tokens=write_tokens, attend_tokens=attend_tokens)
