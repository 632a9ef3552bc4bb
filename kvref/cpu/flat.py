"""CPU twins of the flat cache's spec (``kvref/flat.py``): the same functions, compiled.

``attend_tokens_parallel`` is a schedule: ``prange`` over every (sequence, token, KV head) triple, each running the
spec's ``attend_one``. ``attend_tokens`` picks it only when there is enough work to share
(:func:`kvref.cpu.choose_schedule`).
"""

import numpy as np
from numba import prange

from .. import flat
from ..attention import WORK_COLUMNS
from . import ATTENTION_FASTMATH, choose_schedule, compile_spec

write_tokens = compile_spec(flat.write_tokens)
attend_tokens_serial = compile_spec(flat.attend_tokens, fastmath=ATTENTION_FASTMATH)


def _attend_tokens_parallel(kv, layer, seq_ids, positions, q, scale, out):
    """Schedule: one work item per (i, t, h), spread over threads; the body is the spec's attend_one."""
    n_seq, n_tokens = positions.shape
    kv_heads = kv.shape[3]
    group = q.shape[2] // kv_heads
    for item in prange(n_seq * n_tokens * kv_heads):
        i, t, h = flat.work_item(item, n_tokens, kv_heads)
        work = np.empty((group, WORK_COLUMNS), np.float32)
        flat.attend_one(kv, layer, seq_ids, positions, q, scale, out, work, i, t, h)


attend_tokens_parallel = compile_spec(_attend_tokens_parallel, fastmath=ATTENTION_FASTMATH, parallel=True)


def attend_tokens(kv, layer, seq_ids, positions, q, scale, out):
    """The spec's ``attend_tokens``: serial for small steps, the prange schedule for large ones."""
    rows = (int(positions.sum()) + positions.size) * kv.shape[3]  # key rows read: p + 1 per token and KV head
    schedule = choose_schedule(rows, positions.size * kv.shape[3], attend_tokens_serial, attend_tokens_parallel)
    schedule(kv, layer, seq_ids, positions, q, scale, out)
