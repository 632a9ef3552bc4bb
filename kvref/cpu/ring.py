"""CPU twins of the ring cache's spec (``kvref/ring.py``): the same functions, compiled.

Attention is compiled once per shape (G, D), on first use (:class:`kvref.cpu.Specialisations`): ``serial`` is the
spec's ``attend_tokens``; ``parallel`` is a schedule, ``prange`` over every (sequence, token, KV head) triple, each
running the spec's ``attend_one`` (numbered as in the flat cache, ``kvref.flat.work_item``). ``attend_tokens`` picks
it only when there is enough work to share (:func:`kvref.cpu.choose_schedule`).
"""

from numba import prange

from .. import ring
from ..flat import work_item
from . import ATTENTION_FASTMATH, Specialisations, choose_schedule, compile_spec

write_tokens = compile_spec(ring.write_tokens)


def _specialise(group, head_dim):
    """(serial, parallel) with G and D frozen to constants."""

    def serial(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q, scale, out):
        ring.attend_tokens(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q,
                           scale, out, group, head_dim)

    def parallel(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q, scale, out):
        """One work item per (i, t, h), spread over threads; the body is the spec's attend_one."""
        n_seq, n_tokens = positions.shape
        kv_heads = kv.shape[3]
        for item in prange(n_seq * n_tokens * kv_heads):
            i, t, h = work_item(item, n_tokens, kv_heads)
            ring.attend_one(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q,
                            scale, out, i, t, h, group, head_dim)

    return (compile_spec(serial, fastmath=ATTENTION_FASTMATH),
            compile_spec(parallel, fastmath=ATTENTION_FASTMATH, parallel=True))


ATTEND = Specialisations(_specialise)


def attend_tokens(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q, scale, out,
                  group, head_dim):
    """The spec's ``attend_tokens``: serial for small steps, the prange schedule for large ones."""
    serial, parallel = ATTEND(group, head_dim)
    rows = positions.size * (kv.shape[4] + pending_k.shape[1]) * kv.shape[3]  # every slot and held-aside row
    schedule = choose_schedule(rows, positions.size * kv.shape[3], serial, parallel)
    schedule(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q, scale, out)
