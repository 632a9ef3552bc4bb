"""CPU twins of the two-tier cache's spec (``kvref/two_tier.py``): the same functions, compiled.

Attention is compiled once per shape (G, D), on first use (:class:`kvref.cpu.Specialisations`), as for the flat
cache: ``serial`` (the spec's ``attend_tokens``), ``parallel`` (the head split, each item the spec's ``attend_one``)
and ``split`` (the key split, each (item, part) the spec's ``attend_part``, then ``kvref.cpu.MERGE_TOKENS``);
``attend_tokens`` picks one (:func:`kvref.cpu.choose_parts`). The materializing path's attention
(``attention.attend_gathered_tokens``) is specialised the same way.
"""

import numpy as np
from numba import prange

from .. import two_tier
from ..flat import work_item
from . import ATTENTION_FASTMATH, Specialisations, compile_spec, run_attention

commit_tokens = compile_spec(two_tier.commit_tokens)


def _specialise(group, head_dim):
    """(serial, parallel, split, materialized) with G and D frozen to constants."""

    def serial(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q, scale, out):
        two_tier.attend_tokens(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q,
                               scale, out, group, head_dim)

    def parallel(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q, scale, out):
        """The head split: one work item per (i, t, h), spread over threads; the body is the spec's attend_one."""
        n_seq, n_tokens = positions.shape
        kv_heads = tail.shape[3]
        for item in prange(n_seq * n_tokens * kv_heads):
            i, t, h = work_item(item, n_tokens, kv_heads)
            two_tier.attend_one(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q,
                                scale, out, i, t, h, group, head_dim)

    def split(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q, scale, part_acc,
              part_m_l):
        """The key split: one unit per (i, t, h, part), spread over threads; the body is the spec's attend_part."""
        n_seq, n_tokens = positions.shape
        kv_heads, parts = tail.shape[3], part_acc.shape[3]
        for unit in prange(n_seq * n_tokens * kv_heads * parts):
            i, t, h = work_item(unit // parts, n_tokens, kv_heads)
            part = unit % parts
            two_tier.attend_part(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt,
                                 q[i, t, h * group:(h + 1) * group], scale, part_acc[i, t, h, part],
                                 part_m_l[i, t, h, part], i, t, h, part, parts, group, head_dim)

    def materialized(keys, values, key_positions, positions, window, sinks, q, scale, out):
        two_tier.attend_materialized_tokens(keys, values, key_positions, positions, window, sinks, q, scale, out,
                                            group, head_dim)

    return (compile_spec(serial, fastmath=ATTENTION_FASTMATH),
            compile_spec(parallel, fastmath=ATTENTION_FASTMATH, parallel=True),
            compile_spec(split, fastmath=ATTENTION_FASTMATH, parallel=True),
            compile_spec(materialized, fastmath=ATTENTION_FASTMATH))


ATTEND = Specialisations(_specialise)


def attend_tokens(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q, scale, out,
                  group, head_dim):
    """The spec's ``attend_tokens`` on the schedule :func:`kvref.cpu.choose_parts` picks."""
    held = np.minimum(positions[:, :1] + 1, window).sum() * positions.shape[1]  # rows read, about
    state_dims = positions.shape + (tail.shape[3], group, head_dim)
    run_attention(ATTEND(group, head_dim)[:3], int(held) * tail.shape[3], state_dims,
                  (tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q, scale), out)


def attend_materialized_tokens(keys, values, key_positions, positions, window, sinks, q, scale, out, group, head_dim):
    """The spec's ``attend_materialized_tokens`` (``attention.attend_gathered_tokens``), compiled."""
    ATTEND(group, head_dim)[3](keys, values, key_positions, positions, window, sinks, q, scale, out)
