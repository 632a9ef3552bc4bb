"""CPU twins of the ring cache's spec (``kvref/ring.py``): the same functions, compiled.

``attend_tokens_parallel`` is a schedule: ``prange`` over every (sequence, token, KV head) triple, each running the
spec's ``attend_one`` (numbered as in the flat cache, ``kvref.flat.work_item``). ``attend_tokens`` picks it only when
there is enough work to share (:func:`kvref.cpu.choose_schedule`).
"""

import numpy as np
from numba import prange

from .. import ring
from ..attention import WORK_COLUMNS
from ..flat import work_item
from . import ATTENTION_FASTMATH, choose_schedule, compile_spec

write_tokens = compile_spec(ring.write_tokens)
attend_tokens_serial = compile_spec(ring.attend_tokens, fastmath=ATTENTION_FASTMATH)


def _attend_tokens_parallel(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q,
                            scale, out):
    """Schedule: one work item per (i, t, h), spread over threads; the body is the spec's attend_one."""
    n_seq, n_tokens = positions.shape
    kv_heads = kv.shape[3]
    group = q.shape[2] // kv_heads
    for item in prange(n_seq * n_tokens * kv_heads):
        i, t, h = work_item(item, n_tokens, kv_heads)
        work = np.empty((group, WORK_COLUMNS), np.float32)
        ring.attend_one(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q, scale,
                        out, work, i, t, h)


attend_tokens_parallel = compile_spec(_attend_tokens_parallel, fastmath=ATTENTION_FASTMATH, parallel=True)


def attend_tokens(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q, scale, out):
    """The spec's ``attend_tokens``: serial for small steps, the prange schedule for large ones."""
    rows = positions.size * (kv.shape[4] + pending_k.shape[1]) * kv.shape[3]  # every slot and held-aside row
    schedule = choose_schedule(rows, positions.size * kv.shape[3], attend_tokens_serial, attend_tokens_parallel)
    schedule(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q, scale, out)
