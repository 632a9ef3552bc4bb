"""CPU twins of the flat cache's spec (``kvref/flat.py``): the same functions, compiled.

Attention is compiled once per shape (G, D), on first use (:class:`kvref.cpu.Specialisations`): ``serial`` is the
spec's ``attend_tokens``; ``parallel`` (the head split) is ``prange`` over every (sequence, token, KV head) triple,
each running the spec's ``attend_one``; ``split`` (the key split, split-K) is ``prange`` over every (triple, part),
each running the spec's ``attend_part`` on its share of the keys, then ``kvref.cpu.MERGE_TOKENS``.
``attend_tokens`` picks one by the shape of the work (:func:`kvref.cpu.choose_parts`).
"""

from numba import prange

from .. import flat
from . import ATTENTION_FASTMATH, Specialisations, compile_spec, run_attention

write_tokens = compile_spec(flat.write_tokens)


def _specialise(group, head_dim):
    """(serial, parallel, split) with G and D frozen to constants."""

    def serial(kv, layer, seq_ids, positions, q, scale, out):
        flat.attend_tokens(kv, layer, seq_ids, positions, q, scale, out, group, head_dim)

    def parallel(kv, layer, seq_ids, positions, q, scale, out):
        """The head split: one work item per (i, t, h), spread over threads; the body is the spec's attend_one."""
        n_seq, n_tokens = positions.shape
        kv_heads = kv.shape[3]
        for item in prange(n_seq * n_tokens * kv_heads):
            i, t, h = flat.work_item(item, n_tokens, kv_heads)
            flat.attend_one(kv, layer, seq_ids, positions, q, scale, out, i, t, h, group, head_dim)

    def split(kv, layer, seq_ids, positions, q, scale, part_acc, part_m_l):
        """The key split: one unit per (i, t, h, part), spread over threads; the body is the spec's attend_part."""
        n_seq, n_tokens = positions.shape
        kv_heads, parts = kv.shape[3], part_acc.shape[3]
        for unit in prange(n_seq * n_tokens * kv_heads * parts):
            i, t, h = flat.work_item(unit // parts, n_tokens, kv_heads)
            part = unit % parts
            flat.attend_part(kv, layer, seq_ids, positions, q[i, t, h * group:(h + 1) * group], scale,
                             part_acc[i, t, h, part], part_m_l[i, t, h, part], i, t, h, part, parts, group, head_dim)

    return (compile_spec(serial, fastmath=ATTENTION_FASTMATH),
            compile_spec(parallel, fastmath=ATTENTION_FASTMATH, parallel=True),
            compile_spec(split, fastmath=ATTENTION_FASTMATH, parallel=True))


ATTEND = Specialisations(_specialise)


def attend_tokens(kv, layer, seq_ids, positions, q, scale, out, group, head_dim):
    """The spec's ``attend_tokens`` on the schedule :func:`kvref.cpu.choose_parts` picks: serial, head split or key
    split."""
    rows = (int(positions.sum()) + positions.size) * kv.shape[3]  # key rows read: p + 1 per token and KV head
    state_dims = positions.shape + (kv.shape[3], group, head_dim)
    run_attention(ATTEND(group, head_dim), rows, state_dims, (kv, layer, seq_ids, positions, q, scale), out)
