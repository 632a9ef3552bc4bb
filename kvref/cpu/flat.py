"""CPU twins of the flat cache's spec (``kvref/flat.py``): the same functions, compiled.

``attend_tokens`` here is the parallel schedule: ``prange`` over every (sequence, token, KV head) triple, each
running the spec's ``attend_one``. With one Numba thread it is the serial loop of the spec.
"""

import numpy as np
from numba import prange

from .. import flat
from ..attention import TILE
from . import ATTENTION_FASTMATH, compile_spec

write_tokens = compile_spec(flat.write_tokens)
attend_tokens_serial = compile_spec(flat.attend_tokens, fastmath=ATTENTION_FASTMATH)


def _attend_tokens_parallel(kv, layer, seq_ids, positions, q, scale, out):
    """Schedule: one work item per (i, t, h), spread over threads; the body is the spec's attend_one."""
    n_seq, n_tokens = positions.shape
    kv_heads = kv.shape[3]
    group = q.shape[2] // kv_heads
    for item in prange(n_seq * n_tokens * kv_heads):
        i = item // (n_tokens * kv_heads)
        t = (item // kv_heads) % n_tokens
        h = item % kv_heads
        work = np.empty((group, TILE + 2), np.float32)
        flat.attend_one(kv, layer, seq_ids, positions, q, scale, out, work, i, t, h)


attend_tokens = compile_spec(_attend_tokens_parallel, fastmath=ATTENTION_FASTMATH, parallel=True)
