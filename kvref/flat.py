"""The flat cache: one contiguous row of ``max_tokens`` slots per sequence. This file is its whole algorithm.

Addressing (ARCHITECTURE.md, "a cache is a map from (sequence, position) to a slot"):

    slot(seq, p) = p                            in the sequence's own row
    storage      kv[layer, 0=K|1=V, seq, kv_head, slot, dim]        head-major, see kvref/shapes.py

A step of the model, the same for every variant:

1. **plan** (host Python, once per step): validate, then compute ``positions[i, t] = length[seq_i] + t`` and
   ``slots[i, t] = slot(positions[i, t])`` for the ``T`` new tokens of each sequence. Overflow
   (``length + T > max_tokens``) raises :class:`CacheOverflowError` here, before anything changes (seed 001 added
   first and checked afterwards, leaving its position past the end).
2. **write** (per layer, compiled): ``kv[layer, K, seq_i, h, slots[i, t], :] = k_new[i, t, h, :]``, same for V.
   The layer index is part of every address, so one layer can never overwrite another (seed 000).
3. **attend** (per layer, compiled): the query at position p sees slots ``0..p`` (causal, including itself), so a
   chunk of T tokens attends causally within itself (chunked prefill) and a single token is plain decode.
4. **advance** (host, once per step): ``length[seq_i] += T``.

``reset`` is O(1): it sets lengths to 0. No slot at or past a sequence's length is ever read, so nothing needs
zeroing (seed 001 zeroed the whole buffer, O(capacity)).

The functions marked ``@register_jitable`` are the spec. Called directly they run as plain Python (backend
"python"); ``kvref/cpu/flat.py`` compiles the very same functions with ``numba.njit``, and ``kvref/cuda/flat.py``
calls them from CUDA kernels as device functions.
"""

import dataclasses

import numpy as np
from numba.extending import register_jitable

from .attention import (SCORE_KEYS, WORK_COLUMNS, attend_rows, key_share, local_array, merge_parts, save_state,
                        softmax_start)
from .cache import CacheBase, Step, freeze
from .errors import CacheOverflowError
from .shapes import check_index, check_positive_int

__all__ = ["FlatCache", "FlatStep", "attend_one", "attend_part", "attend_tokens", "flat_slot", "work_item", "write_one", "write_tokens"]


# ---------------------------------------------------------------------------------------------------------------
# Spec: addressing, write, attend
# ---------------------------------------------------------------------------------------------------------------
@register_jitable
def flat_slot(position):
    """Slot of token position ``p`` in its sequence's row: ``p`` itself."""
    return position


@register_jitable
def write_one(kv, layer, seq_ids, slots, k_new, v_new, i, t, h, d):
    """Store element d of head h of new token t of step-sequence i (one CUDA thread does exactly this).

    kv[layer, 0, seq_ids[i], h, slots[i, t], d] = k_new[i, t, h, d]    and the same for V (index 1).
    """
    seq = seq_ids[i]
    slot = slots[i, t]
    kv[layer, 0, seq, h, slot, d] = k_new[i, t, h, d]
    kv[layer, 1, seq, h, slot, d] = v_new[i, t, h, d]


@register_jitable
def write_tokens(kv, layer, seq_ids, slots, k_new, v_new):
    """Scatter the new K/V of one layer into their slots.

    kv:     (layers, 2, batch, kv_heads, max_tokens, D) storage (float32, or uint16 fp16 bits)
    k_new:  (n_seq, T, kv_heads, D) same dtype as kv; v_new likewise
    slots:  (n_seq, T) int64 from the plan; seq_ids: (n_seq,) int64
    """
    n_seq, n_tokens, kv_heads, head_dim = k_new.shape
    for i in range(n_seq):
        for t in range(n_tokens):
            for h in range(kv_heads):
                for d in range(head_dim):
                    write_one(kv, layer, seq_ids, slots, k_new, v_new, i, t, h, d)


@register_jitable
def attend_part(kv, layer, seq_ids, positions, q_heads, scale, part_acc, part_m_l, i, t, h, part, parts, group,
                head_dim):
    """The online softmax of the G query heads ``q_heads`` (G, D) of KV head h, for new token t of step-sequence i,
    over share ``part`` of ``parts`` of its visible keys (``attention.key_share``), saved as a partial state:
    ``part_acc`` (G, D) and ``part_m_l`` (G, 2) (``attention.save_state``; ``attention.merge_parts`` combines them).

    A query at position p sees slots 0..p of its sequence: n_visible = p + 1 (the flat cache keeps every token).
    Query heads h*G .. h*G+G-1 share KV head h (GQA; G = ``group`` = q_heads // kv_heads, D = ``head_dim``).
    """
    acc = local_array((group, head_dim))  # the unnormalised output
    work = local_array((group, WORK_COLUMNS))  # a tile's scores, then m and l
    block = local_array((SCORE_KEYS, group))  # the sums of one score pass
    seq = seq_ids[i]
    lo, hi = key_share(positions[i, t] + 1, part, parts)
    keys = kv[layer, 0, seq, h, lo:hi]  # (hi - lo, D) this part's K rows of head h, slot = position
    values = kv[layer, 1, seq, h, lo:hi]
    softmax_start(acc, work)
    attend_rows(q_heads, keys, values, hi - lo, scale, acc, work, block)
    save_state(acc, work, part_acc, part_m_l)


@register_jitable
def attend_one(kv, layer, seq_ids, positions, q, scale, out, i, t, h, group, head_dim):
    """Attention of the G query heads of KV head h, for new token t of step-sequence i: all its keys as one part."""
    part_acc = local_array((1, group, head_dim))
    part_m_l = local_array((1, group, 2))
    first = h * group
    attend_part(kv, layer, seq_ids, positions, q[i, t, first:first + group], scale, part_acc[0], part_m_l[0], i, t, h,
                0, 1, group, head_dim)
    merge_parts(part_acc, part_m_l, out[i, t, first:first + group], group, head_dim)


@register_jitable
def work_item(item, n_tokens, kv_heads):
    """Unflatten a work item: item = (i * T + t) * kv_heads + h  ->  (i, t, h). Parallel schedules number their
    (step-sequence, token, KV head) triples this way."""
    return item // (n_tokens * kv_heads), (item // kv_heads) % n_tokens, item % kv_heads


@register_jitable
def attend_tokens(kv, layer, seq_ids, positions, q, scale, out, group, head_dim):
    """Decode attention (T = 1) or causal chunked prefill (T > 1) of one layer for every new token.

    q:    (n_seq, T, q_heads, D) float32;  out: same shape, float32, overwritten
    positions: (n_seq, T) int64 absolute positions of the new tokens (already written to the cache)
    group, head_dim: G = q_heads // kv_heads and D; compiled, they are constants (kvref/attention.py,
    "Specialisation")
    """
    n_seq, n_tokens = positions.shape
    for i in range(n_seq):
        for t in range(n_tokens):
            for h in range(kv.shape[3]):
                attend_one(kv, layer, seq_ids, positions, q, scale, out, i, t, h, group, head_dim)


# ---------------------------------------------------------------------------------------------------------------
# The cache object: the lifecycle and the checks are kvref/cache.py's; the flat cache adds its addressing and its
# overflow rule, and the compiled work goes to the backend's twin functions.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class FlatStep(Step):
    """A planned step of the flat cache: positions and slots (``slot = p``); no other field."""


class FlatCache(CacheBase):
    """A contiguous KV cache for a batch of sequences with their own lengths.

    shape:      CacheShape (layers, q_heads, kv_heads, head_dim, dtype float32|float16)
    batch:      number of sequences (rows)
    max_tokens: slots per sequence
    backend:    "python" (the spec as plain Python), "cpu" (numba.njit) or "cuda" (numba.cuda kernels)

    Use per step::

        step = cache.plan(num_tokens)              # validates; raises CacheOverflowError before any change
        for layer in range(shape.layers):
            cache.write(step, layer, k, v)         # k, v: (n_seq, T, kv_heads, head_dim)
            o = cache.attend(step, layer, q)       # q: (n_seq, T, q_heads, head_dim) float32
        cache.advance(step)                        # every layer must have been written
    """

    variant = "flat"
    step_type = FlatStep

    def __init__(self, shape, batch=1, max_tokens=2048, backend="cpu"):
        check_positive_int("max_tokens", max_tokens)
        self.max_tokens = int(max_tokens)
        super().__init__(shape, batch, self.max_tokens, backend)

    # --- reading the state ---------------------------------------------------------------------------------
    def get_max_cache_shape(self):
        """Capacity of one sequence in tokens (``max_tokens``)."""
        return self.max_tokens

    def remaining_capacity(self, seq=0):
        """Tokens sequence ``seq`` can still take: max_tokens - length."""
        return self.max_tokens - self.get_seq_length(seq)

    def _stored(self, layer, seq, kv_index):
        check_index("layer", layer, self.shape.layers)
        check_index("seq", seq, self.batch)
        return self._rows(layer, seq, kv_index, slice(0, int(self._lengths[seq])))

    def stats(self):
        """A dict describing the cache: capacity, use, bytes, dtype and layout."""
        used = int(self._lengths.sum())
        capacity = self.batch * self.max_tokens
        return {
            **self._stats_head(),
            "max_tokens": self.max_tokens,
            "lengths": self._lengths.tolist(),
            "tokens_used": used,
            "tokens_capacity": capacity,
            "utilization": used / capacity,
            "bytes_per_token": self.token_bytes,
            "bytes_used": used * self.token_bytes,
            "nbytes": self.nbytes,
        }

    def state(self):
        """A deep snapshot of everything the cache holds (for tests: equal snapshots = identical caches)."""
        return {"kv": self.kv.copy(), "lengths": self._lengths.copy(), **self._tracking_state()}

    # --- the variant's part of the lifecycle (kvref/cache.py runs it) -----------------------------------------
    def _check_capacity(self, ids, num_tokens):
        """Overflow (``length + T > max_tokens``) raises CacheOverflowError before anything changes (seed 001
        added first and checked afterwards)."""
        for s in ids.tolist():
            if int(self._lengths[s]) + num_tokens > self.max_tokens:  # Python ints: no int64 wrap-around
                raise CacheOverflowError(
                    "num_tokens", f"<= remaining capacity {self.max_tokens - self._lengths[s]} of sequence {s}",
                    num_tokens, detail="nothing was written")

    def _plan(self, ids, positions):
        slots = np.array([[flat_slot(p) for p in row] for row in positions.tolist()], np.int64)
        ids, positions, slots = freeze(ids, positions, slots)
        return FlatStep(ids, positions, slots, self._id, self._version)

    def _write(self, step, layer, k_store, v_store):
        self._ops.write_tokens(self._kv, layer, step.seq_ids, step.slots, k_store, v_store)

    def _attend(self, step, layer, q, scale, out):
        self._ops.attend_tokens(self._kv, layer, step.seq_ids, step.positions, q, scale, out, self.shape.group_size,
                                self.shape.head_dim)

    def _commit(self, step):
        """Nothing beyond ``length += T``: the K/V are in their slots already."""

    def _reset(self, seqs):
        """O(1) per sequence: only the length changes; no slot is zeroed (none at or past a length is read)."""
        self._lengths[seqs] = 0

    def _crop(self, targets):
        for s, target in targets.items():
            self._lengths[s] = target
