"""CPU twins of the ring cache's spec (``kvref/ring.py``): the same functions, compiled.

Attention is compiled once per shape (G, D), on first use (:class:`kvref.cpu.Specialisations`), as for the flat
cache: ``serial`` (the spec's ``attend_tokens``), ``parallel`` (the head split: ``prange`` over every (sequence, token,
KV head) triple, numbered as ``kvref.flat.work_item``, each running the spec's ``attend_one``) and ``split`` (the key
split: ``prange`` over every (triple, part), each running the spec's ``attend_part``, then
``kvref.cpu.MERGE_TOKENS``); ``attend_tokens`` picks one (:func:`kvref.cpu.choose_parts`).
"""

from numba import prange

from .. import ring
from ..flat import work_item
from . import ATTENTION_FASTMATH, Specialisations, compile_spec, run_attention

write_tokens = compile_spec(ring.write_tokens)


def _specialise(group, head_dim):
    """(serial, parallel, split) with G and D frozen to constants."""

    def serial(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q, scale, out):
        ring.attend_tokens(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q,
                           scale, out, group, head_dim)

    def parallel(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q, scale, out):
        """The head split: one work item per (i, t, h), spread over threads; the body is the spec's attend_one."""
        n_seq, n_tokens = positions.shape
        kv_heads = kv.shape[3]
        for item in prange(n_seq * n_tokens * kv_heads):
            i, t, h = work_item(item, n_tokens, kv_heads)
            ring.attend_one(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q,
                            scale, out, i, t, h, group, head_dim)

    def split(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q, scale, part_acc,
              part_m_l):
        """The key split: one unit per (i, t, h, part), spread over threads; the body is the spec's attend_part."""
        n_seq, n_tokens = positions.shape
        kv_heads, parts = kv.shape[3], part_acc.shape[3]
        for unit in prange(n_seq * n_tokens * kv_heads * parts):
            i, t, h = work_item(unit // parts, n_tokens, kv_heads)
            part = unit % parts
            ring.attend_part(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks,
                             q[i, t, h * group:(h + 1) * group], scale, part_acc[i, t, h, part],
                             part_m_l[i, t, h, part], i, t, h, part, parts, group, head_dim)

    return (compile_spec(serial, fastmath=ATTENTION_FASTMATH),
            compile_spec(parallel, fastmath=ATTENTION_FASTMATH, parallel=True),
            compile_spec(split, fastmath=ATTENTION_FASTMATH, parallel=True))


ATTEND = Specialisations(_specialise)


def attend_tokens(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q, scale, out,
                  group, head_dim):
    """The spec's ``attend_tokens`` on the schedule :func:`kvref.cpu.choose_parts` picks."""
    rows = positions.size * (kv.shape[4] + pending_k.shape[1]) * kv.shape[3]  # every slot and held-aside row
    state_dims = positions.shape + (kv.shape[3], group, head_dim)
    run_attention(ATTEND(group, head_dim), rows, state_dims,
                  (kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q, scale), out)
