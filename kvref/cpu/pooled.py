"""CPU twins of the pooled cache's spec (``kvref/pooled.py``): the same functions, compiled.

Attention is compiled once per shape (G, D, KV heads), on first use (:class:`kvref.cpu.Specialisations`): ``serial``
is the spec's ``attend_tokens``; ``parallel`` is a schedule, ``prange`` over every (sequence, token, range of KV
heads), each running the spec's ``attend_one`` (numbered as in the flat cache, ``kvref.flat.work_item``).
``attend_tokens`` picks it only when there is enough work to share (:func:`kvref.cpu.choose_schedule`).
"""

import numba
from numba import prange

from .. import pooled
from ..flat import work_item
from . import ATTENTION_FASTMATH, Specialisations, choose_parts, compile_spec, run_attention

write_tokens = compile_spec(pooled.write_tokens)
copy_blocks = compile_spec(pooled.copy_blocks)


def head_ranges(n_items, kv_heads, threads):
    """How many ranges to split the KV heads into so that the parallel schedule has about ``threads`` work items per
    thread pool: 1 when the (sequence, token) pairs alone are enough."""
    return min(kv_heads, max(1, -(-threads // n_items)))


def _specialise(group, head_dim, kv_heads):
    """(serial, parallel, split) with G, D and the KV heads frozen to constants."""

    def serial(kv, layer, tables, starts, positions, q, scale, out):
        pooled.attend_tokens(kv, layer, tables, starts, positions, q, scale, out, group, head_dim, kv_heads)

    def parallel(kv, layer, tables, starts, positions, q, scale, out, ranges):
        """The head split: one work item per (i, t, range of KV heads), spread over threads; the body is the spec's
        attend_one."""
        n_seq, n_tokens = positions.shape
        per_range = -(-kv_heads // ranges)
        for item in prange(n_seq * n_tokens * ranges):
            i, t, r = work_item(item, n_tokens, ranges)
            first = r * per_range
            end = min(kv_heads, first + per_range)
            if first < end:
                pooled.attend_one(kv, layer, tables, starts, positions, q, scale, out, i, t, first, end, group,
                                  head_dim, kv_heads)

    def split(kv, layer, tables, starts, positions, q, scale, part_acc, part_m_l):
        """The key split: one unit per (i, t, part), every KV head (a tile is still one sweep over K and one over V),
        spread over threads; the body is the spec's attend_part."""
        n_seq, n_tokens = positions.shape
        parts = part_acc.shape[3]
        for unit in prange(n_seq * n_tokens * parts):
            i, t, part = work_item(unit, n_tokens, parts)
            pooled.attend_part(kv, layer, tables, starts, positions, q, scale, part_acc[i, t, :, part],
                               part_m_l[i, t, :, part], i, t, 0, kv_heads, part, parts, group, head_dim, kv_heads)

    return (compile_spec(serial, fastmath=ATTENTION_FASTMATH),
            compile_spec(parallel, fastmath=ATTENTION_FASTMATH, parallel=True),
            compile_spec(split, fastmath=ATTENTION_FASTMATH, parallel=True))


ATTEND = Specialisations(_specialise)


def attend_tokens(kv, layer, tables, starts, positions, q, scale, out, group, head_dim, kv_heads):
    """The spec's ``attend_tokens`` on the schedule :func:`kvref.cpu.choose_parts` picks, counting the (sequence,
    token) pairs as the items: the key split's units are (pair, part), each over every KV head (a tile stays one
    sweep over K and one over V); the head split's are (pair, range of KV heads) (:func:`head_ranges`)."""
    serial, attend_parallel, split = ATTEND(group, head_dim, kv_heads)
    rows = (int((positions - starts[:, None]).sum()) + positions.size) * kv_heads  # held rows read

    def parallel(*args):
        attend_parallel(*args, head_ranges(positions.size, kv_heads, numba.get_num_threads()))

    state_dims = positions.shape + (kv_heads, group, head_dim)
    run_attention((serial, parallel, split), rows, state_dims, (kv, layer, tables, starts, positions, q, scale), out,
                  parts=choose_parts(rows, positions.size))
