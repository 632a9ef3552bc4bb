"""CPU twins of the pooled cache's spec (``kvref/pooled.py``): the same functions, compiled.

``attend_tokens_parallel`` is a schedule: ``prange`` over every (sequence, token, KV head) triple, each running the
spec's ``attend_one`` (numbered as in the flat cache, ``kvref.flat.work_item``). ``attend_tokens`` picks it only when
there is enough work to share (:func:`kvref.cpu.choose_schedule`).
"""

import numba
import numpy as np
from numba import prange

from .. import pooled
from ..attention import WORK_COLUMNS
from ..flat import work_item
from . import ATTENTION_FASTMATH, choose_schedule, compile_spec

write_tokens = compile_spec(pooled.write_tokens)
copy_blocks = compile_spec(pooled.copy_blocks)
attend_tokens_serial = compile_spec(pooled.attend_tokens, fastmath=ATTENTION_FASTMATH)


def head_ranges(n_items, kv_heads, threads):
    """How many ranges to split the KV heads into so that the parallel schedule has about ``threads`` work items per
    thread pool: 1 when the (sequence, token) pairs alone are enough."""
    return min(kv_heads, max(1, -(-threads // n_items)))


def _attend_tokens_parallel(kv, layer, tables, starts, positions, q, scale, out, ranges):
    """Schedule: one work item per (i, t, range of KV heads), spread over threads; the body is the spec's
    attend_one."""
    n_seq, n_tokens = positions.shape
    kv_heads = kv.shape[3]
    group = q.shape[2] // kv_heads
    per_range = -(-kv_heads // ranges)
    for item in prange(n_seq * n_tokens * ranges):
        i, t, r = work_item(item, n_tokens, ranges)
        first = r * per_range
        end = min(kv_heads, first + per_range)
        if first < end:
            work = np.empty((end - first, group, WORK_COLUMNS), np.float32)
            pooled.attend_one(kv, layer, tables, starts, positions, q, scale, out, work, i, t, first, end)


attend_tokens_parallel = compile_spec(_attend_tokens_parallel, fastmath=ATTENTION_FASTMATH, parallel=True)


def attend_tokens(kv, layer, tables, starts, positions, q, scale, out):
    """The spec's ``attend_tokens``: serial for small steps, the prange schedule for large ones."""
    rows = (int((positions - starts[:, None]).sum()) + positions.size) * kv.shape[3]  # held rows read

    def parallel(*args):
        attend_tokens_parallel(*args, head_ranges(positions.size, kv.shape[3], numba.get_num_threads()))

    schedule = choose_schedule(rows, positions.size * kv.shape[3], attend_tokens_serial, parallel)
    schedule(kv, layer, tables, starts, positions, q, scale, out)
