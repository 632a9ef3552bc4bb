"""CPU twins of the two-tier cache's spec (``kvref/two_tier.py``): the same functions, compiled.

``attend_tokens_parallel`` is a schedule: ``prange`` over every (sequence, token, KV head) triple, each running the
spec's ``attend_one`` (numbered as in the flat cache, ``kvref.flat.work_item``). ``attend_tokens`` picks it only when
there is enough work to share (:func:`kvref.cpu.choose_schedule`).
"""

import numpy as np
from numba import prange

from .. import two_tier
from ..attention import WORK_COLUMNS
from ..flat import work_item
from ..quant import BLOCK
from . import ATTENTION_FASTMATH, choose_schedule, compile_spec

commit_tokens = compile_spec(two_tier.commit_tokens)
attend_tokens_serial = compile_spec(two_tier.attend_tokens, fastmath=ATTENTION_FASTMATH)
attend_materialized_tokens = compile_spec(two_tier.attend_materialized_tokens, fastmath=ATTENTION_FASTMATH)


def _attend_tokens_parallel(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q,
                            scale, out):
    """Schedule: one work item per (i, t, h), spread over threads; the body is the spec's attend_one."""
    n_seq, n_tokens = positions.shape
    kv_heads = tail.shape[3]
    group = q.shape[2] // kv_heads
    for item in prange(n_seq * n_tokens * kv_heads):
        i, t, h = work_item(item, n_tokens, kv_heads)
        work = np.empty((group, WORK_COLUMNS), np.float32)
        scratch = np.empty(q.shape[3] + BLOCK, np.float32)
        two_tier.attend_one(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q,
                            scale, out, work, scratch, i, t, h)


attend_tokens_parallel = compile_spec(_attend_tokens_parallel, fastmath=ATTENTION_FASTMATH, parallel=True)


def attend_tokens(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q, scale, out):
    """The spec's ``attend_tokens``: serial for small steps, the prange schedule for large ones."""
    held = np.minimum(positions[:, :1] + 1, window).sum() * positions.shape[1]  # rows read, about
    schedule = choose_schedule(int(held) * tail.shape[3], positions.size * tail.shape[3], attend_tokens_serial,
                               attend_tokens_parallel)
    schedule(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q, scale, out)
