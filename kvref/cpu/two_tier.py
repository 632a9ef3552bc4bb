"""CPU twins of the two-tier cache's spec (``kvref/two_tier.py``): the same functions, compiled.

Attention is compiled once per shape (G, D), on first use (:class:`kvref.cpu.Specialisations`): ``serial`` is the
spec's ``attend_tokens``; ``parallel`` is a schedule, ``prange`` over every (sequence, token, KV head) triple, each
running the spec's ``attend_one`` (numbered as in the flat cache, ``kvref.flat.work_item``). ``attend_tokens`` picks
it only when there is enough work to share (:func:`kvref.cpu.choose_schedule`). The materializing path's attention
(``attention.attend_gathered_tokens``) is specialised the same way.
"""

import numpy as np
from numba import prange

from .. import two_tier
from ..flat import work_item
from . import ATTENTION_FASTMATH, Specialisations, choose_schedule, compile_spec

commit_tokens = compile_spec(two_tier.commit_tokens)


def _specialise(group, head_dim):
    """(serial, parallel, materialized) with G and D frozen to constants."""

    def serial(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q, scale, out):
        two_tier.attend_tokens(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q,
                               scale, out, group, head_dim)

    def parallel(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q, scale, out):
        """One work item per (i, t, h), spread over threads; the body is the spec's attend_one."""
        n_seq, n_tokens = positions.shape
        kv_heads = tail.shape[3]
        for item in prange(n_seq * n_tokens * kv_heads):
            i, t, h = work_item(item, n_tokens, kv_heads)
            two_tier.attend_one(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q,
                                scale, out, i, t, h, group, head_dim)

    def materialized(keys, values, key_positions, positions, window, sinks, q, scale, out):
        two_tier.attend_materialized_tokens(keys, values, key_positions, positions, window, sinks, q, scale, out,
                                            group, head_dim)

    return (compile_spec(serial, fastmath=ATTENTION_FASTMATH),
            compile_spec(parallel, fastmath=ATTENTION_FASTMATH, parallel=True),
            compile_spec(materialized, fastmath=ATTENTION_FASTMATH))


ATTEND = Specialisations(_specialise)


def attend_tokens(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q, scale, out,
                  group, head_dim):
    """The spec's ``attend_tokens``: serial for small steps, the prange schedule for large ones."""
    serial, parallel, _ = ATTEND(group, head_dim)
    held = np.minimum(positions[:, :1] + 1, window).sum() * positions.shape[1]  # rows read, about
    schedule = choose_schedule(int(held) * tail.shape[3], positions.size * tail.shape[3], serial, parallel)
    schedule(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q, scale, out)


def attend_materialized_tokens(keys, values, key_positions, positions, window, sinks, q, scale, out, group, head_dim):
    """The spec's ``attend_materialized_tokens`` (``attention.attend_gathered_tokens``), compiled."""
    ATTEND(group, head_dim)[2](keys, values, key_positions, positions, window, sinks, q, scale, out)
