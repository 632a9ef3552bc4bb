"""The ring cache: a sliding window of the last W tokens per sequence, in W slots. This file is its whole algorithm.

**Addressing.** Token position p of a sequence lives in slot ``p % W`` of that sequence's ring, and the slot also
stores p itself (``slot_positions``; -1 for a slot never written, never 0, which is a real position, pytorch/
executorch#17252). Writing position p past W overwrites position p - W, which is exactly the key that has just left
the window: this is the design, not an overflow, and the ring never raises one (Mistral's rolling buffer)::

    slot(p)            = p % W
    kv[layer, 0=K|1=V, seq, kv_head, slot, dim]          head-major storage (kvref/shapes.py), W slots per sequence
    slot_positions[layer, seq, slot] = p                 written by the same write as the K/V, so each layer's
                                                         slots describe exactly what that layer holds

The layer index is part of every address, and ``kvref.shapes.layer_offset / k_offset / v_offset`` give the byte
offset of each layer's K and V (seed 000 bound every layer at offset 0). The storage is sized by **KV heads** (seed
000 sized it by the 40 query heads of a model with 10 KV heads: 4x too big).

**The window rule**, one function for every variant (:func:`kvref.attention.visible`): key position j is visible
from query position i iff::

    i - W < j <= i            W keys, the query's own key included

The same W keys in other conventions (``../shared/reference`` has the sources):

    ==============================  ===========================  ===============================================
    convention                      parameter for these W keys   notes
    ==============================  ===========================  ===============================================
    kvref                           ``window = W``               ``i - W < j <= i``
    FlashAttention, FlashInfer      ``window_size_left = W - 1`` left size counts keys *before* the query
                                                                 (inclusive bound i - j <= W - 1); passing
                                                                 ``(W, W)`` gives W + 1 keys (transformers
                                                                 #39408)
    llama.cpp SWA                   ``n_swa = W``                masked iff ``i - j >= n_swa``
    Hugging Face ``sliding_window`` ``sliding_window = W``       the cache keeps W - 1 past tokens and returns
                                                                 W with the new one; the mask allows W
    Mistral reference code          ``sliding_window = W``       its prefill mask ``triu(tril(1), diagonal=-W)``
                                                                 lets a query see W + 1 keys while the buffer
                                                                 holds W (also mlx-lm #390)
    vLLM                            ``sliding_window = W``       W keys
    ==============================  ===========================  ===============================================

**Decode attention over the ring** reads every slot and keeps those whose *stored* position is visible
(:func:`kvref.attention.attend_slots`). Slot order does not matter: the online softmax is a sum over keys, and the
keys were rotated (RoPE) at their absolute positions before they were stored, so no key is ever re-rotated.

**A step** is the flat cache's: plan (host) -> write (per layer) -> attend (per layer) -> advance (host). A single new
token (decode) is written first and then attends; the key it overwrites (p - W) is the one that just left its window.
**Chunked prefill needs care** (rasbt/LLMs-from-scratch #1013): a chunk of C tokens at positions L .. L+C-1 needs up
to W - 1 + C keys, but the ring holds W. Query L sees L-W+1 .. L, while new token L+1 goes to the slot of L+1-W,
which query L still needs. So when a step would overwrite a key that one of its own earlier queries needs
(:func:`must_defer`: C >= 2 and L + C - 1 >= W), the step is **deferred**: ``write`` keeps the chunk's K/V aside,
``attend`` reads the ring as it was *plus* the held-aside chunk (each masked by the same rule), and ``advance``
writes the chunk into the ring. Of a chunk longer than the ring only the tokens the ring ends up keeping are written
(:func:`kept_after_step`); the others get slot -1, so no two tokens of a step ever share a slot (no write race on a
GPU). A deferred step holds one copy of its K/V (all layers) until ``advance``.

**Attention sinks** (StreamingLLM, option ``sinks = S``): the first S positions keep slots 0 .. S-1 forever, and the
other W - S slots form the ring of the most recent positions::

    slot(p) = p                        if p < S
            = S + (p - S) % (W - S)    otherwise
    visible(i, j, W, S):  0 <= j <= i  and  (j < S  or  i - (W - S) < j)        still W keys at most

*Position convention* (chosen): llama.cpp-style **absolute positions with post-RoPE keys**. A key is rotated once,
at its absolute position, before it is stored, and queries use their absolute position; nothing is re-rotated when
the window slides. The distance between a query and a sink grows without bound, so this is exactly "attention with
the mask above", and a full recompute with that mask reproduces it (tested with the toy decoder).
*Alternative* (StreamingLLM's ``pos_shift``): cache keys *before* RoPE and, every step, rotate the kept keys with their
positions *within the cache* (``0 .. W-1``; the query gets ``min(i, W - 1)``), so distances never exceed the window
the model was trained on. That needs a re-rotation per step (HF's ``SinkCache`` tried it on post-RoPE keys and got
positions wrong, transformers #33691, #35350); kvref leaves it to the model code.

``reset`` clears the sequence's slot positions to -1 (O(layers * W) integers; the K/V is never zeroed). ``crop`` is
exact only while it needs no key the ring has already dropped: it is allowed when the sequence has not wrapped
(length <= W), when the target keeps nothing but sinks (target <= S), or when it changes nothing.

The functions marked ``@register_jitable`` are the spec: plain Python here (backend "python"), compiled with
``numba.njit`` by ``kvref/cpu/ring.py`` and called from the CUDA kernels of ``kvref/cuda/ring.py``.
"""

import dataclasses

import numpy as np
from numba.extending import register_jitable

from .attention import (SCORE_KEYS, WORK_COLUMNS, attend_slots, key_share, local_array, merge_parts, save_state,
                        softmax_start)
from .cache import CacheBase, Step, allocate, check_integer, freeze
from .errors import IndexOutOfRangeError, StaleStepError
from .shapes import check_index, check_positive_int

__all__ = ["RingCache", "RingStep", "attend_one", "attend_part", "attend_tokens", "kept_after_step", "must_defer", "ring_slot", "write_one",
           "write_tokens"]


# ---------------------------------------------------------------------------------------------------------------
# Spec: addressing, write, attend
# ---------------------------------------------------------------------------------------------------------------
@register_jitable
def ring_slot(position, window, sinks):
    """Slot of token position p: ``p % W`` (with S sinks: p below S keeps slot p, the rest share the W - S others)."""
    if position < sinks:
        return position
    return sinks + (position - sinks) % (window - sinks)


@register_jitable
def kept_after_step(position, last_position, window, sinks):
    """True iff the token at ``position`` is still in the ring once the step ending at ``last_position`` is stored:
    a sink, or one of the last W - S positions. (Within one step, a later token may take an earlier one's slot.)"""
    return position < sinks or position > last_position - (window - sinks)


def must_defer(length, num_tokens, window):
    """True iff writing a step of C = ``num_tokens`` tokens at positions L .. L+C-1 would overwrite a key that one of
    the step's own earlier queries still needs: C >= 2 and L + C - 1 >= W.

    Token t (position L+t >= W) overwrites position L+t-(W-S), which query t-1 still sees (it is one of its last
    W - S positions; with S sinks the same holds for the recent part of the window).
    """
    return num_tokens >= 2 and length + num_tokens - 1 >= window


@register_jitable
def write_one(kv, slot_positions, layer, seq_ids, positions, slots, k_new, v_new, i, t, h, d):
    """Store element d of head h of new token t of step-sequence i, and (once per token) its position.

    kv[layer, 0, seq, h, slot, d] = k_new[i, t, h, d]   (same for V);   slot_positions[layer, seq, slot] = p
    A token with slot -1 is not stored (a later token of the same step takes its slot).
    """
    slot = slots[i, t]
    if slot < 0:
        return
    seq = seq_ids[i]
    kv[layer, 0, seq, h, slot, d] = k_new[i, t, h, d]
    kv[layer, 1, seq, h, slot, d] = v_new[i, t, h, d]
    if h == 0 and d == 0:
        slot_positions[layer, seq, slot] = positions[i, t]


@register_jitable
def write_tokens(kv, slot_positions, layer, seq_ids, positions, slots, k_new, v_new):
    """Scatter one layer's new K/V into their ring slots and record the positions they hold.

    kv: (layers, 2, batch, kv_heads, W, D); slot_positions: (layers, batch, W) int64
    k_new, v_new: (n_seq, T, kv_heads, D) in the storage dtype; positions, slots: (n_seq, T) int64 from the plan
    """
    n_seq, n_tokens, kv_heads, head_dim = k_new.shape
    for i in range(n_seq):
        for t in range(n_tokens):
            for h in range(kv_heads):
                for d in range(head_dim):
                    write_one(kv, slot_positions, layer, seq_ids, positions, slots, k_new, v_new, i, t, h, d)


@register_jitable
def attend_part(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q_heads, scale,
                part_acc, part_m_l, i, t, h, part, parts, group, head_dim):
    """The online softmax of the G query heads ``q_heads`` (G, D) of KV head h for new token t (position p) of
    step-sequence i, over share ``part`` of ``parts`` of its candidate rows, saved as a partial state (``part_acc``
    (G, D), ``part_m_l`` (G, 2); ``attention.merge_parts`` combines the parts).

    The candidate rows are the W ring slots, then the step's held-aside chunk (``pending_k/v[i, :, h]``, at
    ``positions[i, :]``; empty unless the step is deferred): rows 0 .. W + C - 1, shared out by
    ``attention.key_share``. A slot takes part iff its stored position is visible from p (for a deferred step: and
    below the step's first position); a chunk row iff its position is visible from p. Both go through one online
    softmax; the order of the keys does not matter.
    """
    acc = local_array((group, head_dim))  # the unnormalised output of the G heads
    work = local_array((group, WORK_COLUMNS))  # a tile's scores, then m and l
    block = local_array((SCORE_KEYS, group))  # the sums of one score pass
    seq = seq_ids[i]
    p = positions[i, t]
    n_slots = kv.shape[4]
    lo, hi = key_share(n_slots + pending_k.shape[1], part, parts)
    # A deferred step reads the ring only below its first position: a slot holding a position >= the length can
    # only be left over from a step that was written but never advanced, and the chunk brings its own keys.
    ring_end = positions[i, 0] if pending_k.shape[1] > 0 else p + 1
    softmax_start(acc, work)
    ring_hi = min(hi, n_slots)  # this part's slots: lo .. ring_hi - 1
    keys = kv[layer, 0, seq, h, lo:ring_hi]  # the ring's K rows of head h, in slot order
    values = kv[layer, 1, seq, h, lo:ring_hi]
    held = slot_positions[layer, seq, lo:ring_hi]  # the position each slot holds, -1 if empty
    attend_slots(q_heads, keys, values, held, ring_end, p, window, sinks, scale, acc, work, block)
    chunk_lo = max(lo, n_slots) - n_slots  # this part's rows of the held-aside chunk (deferred steps)
    chunk_hi = max(hi, n_slots) - n_slots
    chunk_k = pending_k[i, chunk_lo:chunk_hi, h]  # (rows, D) the step's held-aside keys of head h
    chunk_v = pending_v[i, chunk_lo:chunk_hi, h]
    attend_slots(q_heads, chunk_k, chunk_v, positions[i, chunk_lo:chunk_hi], p + 1, p, window, sinks, scale, acc,
                 work, block)
    save_state(acc, work, part_acc, part_m_l)


@register_jitable
def attend_one(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q, scale, out,
               i, t, h, group, head_dim):
    """Attention of the G query heads of KV head h for new token t of step-sequence i: all its rows as one part."""
    part_acc = local_array((1, group, head_dim))
    part_m_l = local_array((1, group, 2))
    first = h * group
    attend_part(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks,
                q[i, t, first:first + group], scale, part_acc[0], part_m_l[0], i, t, h, 0, 1, group, head_dim)
    merge_parts(part_acc, part_m_l, out[i, t, first:first + group], group, head_dim)


@register_jitable
def attend_tokens(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q, scale, out,
                  group, head_dim):
    """Decode attention (T = 1) or chunked prefill (T > 1) over the ring for every new token of one layer.

    q, out: (n_seq, T, q_heads, D) float32; pending_k/v: (n_seq, T or 0, kv_heads, D) in the storage dtype
    group, head_dim: G and D, constants when compiled (kvref/attention.py, "Specialisation")
    """
    n_seq, n_tokens = positions.shape
    for i in range(n_seq):
        for t in range(n_tokens):
            for h in range(kv.shape[3]):
                attend_one(kv, slot_positions, layer, seq_ids, positions, pending_k, pending_v, window, sinks, q,
                           scale, out, i, t, h, group, head_dim)


# ---------------------------------------------------------------------------------------------------------------
# The cache object: the lifecycle and the checks are kvref/cache.py's; the ring adds its slots, deferred steps and
# the crop it can do exactly.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class RingStep(Step):
    """A planned step of the ring cache. ``deferred``: the step's K/V are held aside until ``advance``, because
    writing them at once would overwrite keys that the step's own earlier queries still need (:func:`must_defer`)."""

    deferred: bool


class RingCache(CacheBase):
    """A sliding-window KV cache: W slots per sequence, slot ``p % W``, positions stored per slot.

    shape:   CacheShape (layers, q_heads, kv_heads, head_dim, dtype float32|float16)
    batch:   number of sequences
    window:  W, the slots per sequence and the keys a query sees (itself included)
    sinks:   S, 0 <= S < W: the first S positions are kept forever (attention sinks); the ring covers W - S slots
    backend: "python", "cpu" or "cuda"

    Use it as the flat cache; it never overflows::

        step = cache.plan(num_tokens)
        for layer in range(shape.layers):
            cache.write(step, layer, k, v)         # k, v: (n_seq, T, kv_heads, head_dim), RoPE'd at absolute positions
            o = cache.attend(step, layer, q)       # q: (n_seq, T, q_heads, head_dim) float32
        cache.advance(step)                        # a deferred step is written into the ring here
    """

    variant = "ring"
    step_type = RingStep
    holds_step_aside = True

    def __init__(self, shape, batch=1, window=4096, sinks=0, backend="cpu"):
        check_positive_int("window", window)
        sinks = check_integer("sinks", sinks)
        if not 0 <= sinks < window:
            raise IndexOutOfRangeError("sinks", f"0 <= sinks < window={int(window)}", sinks)
        self.window = int(window)
        self.sinks = sinks
        super().__init__(shape, batch, self.window, backend, size_argument="window")
        self._slot_positions = allocate(self._ops, "window", (shape.layers, self.batch, self.window), np.int64, -1)
        self._overwritten_at = None  # the version at which a written, not yet advanced step overwrote ring slots

    # --- reading the state ---------------------------------------------------------------------------------
    @property
    def slot_positions(self):
        """(layers, batch, W) int64: the position each slot holds, -1 if empty (a read-only host copy or view)."""
        view = self._ops.to_host(self._slot_positions).view()
        view.setflags(write=False)
        return view

    def get_max_cache_shape(self):
        """Slots per sequence: the window W (like Hugging Face's sliding-window layers)."""
        return self.window

    def remaining_capacity(self, seq=0):
        """Empty slots of sequence ``seq`` (W - length, at least 0). Past that the ring overwrites, by design."""
        return max(0, self.window - self.get_seq_length(seq))

    def held_positions(self, seq=0, layer=0):
        """Sorted committed positions the ring holds for ``seq`` in ``layer``: sinks, then the last W - S positions.

        (A step written but not yet advanced is not committed; its positions are not listed.)
        """
        check_index("layer", layer, self.shape.layers)
        check_index("seq", seq, self.batch)
        held = self.slot_positions[layer, seq]
        return np.sort(held[(held >= 0) & (held < self._lengths[seq])])

    def _stored(self, layer, seq, kv_index):
        check_index("layer", layer, self.shape.layers)
        check_index("seq", seq, self.batch)
        held = self.slot_positions[layer, seq]
        committed = (held >= 0) & (held < self._lengths[seq])
        order = [int(slot) for slot in np.argsort(held, kind="stable") if committed[slot]]
        return self._rows(layer, seq, kv_index, order)

    def stats(self):
        """A dict describing the cache: window, sinks, use, bytes, dtype and layout."""
        held = np.minimum(self._lengths, self.window)
        return {
            **self._stats_head(),
            "window": self.window,
            "sinks": self.sinks,
            "lengths": self._lengths.tolist(),
            "tokens_held": held.tolist(),
            "tokens_overwritten": (self._lengths - held).tolist(),
            "utilization": float(held.sum()) / (self.batch * self.window),
            "bytes_per_token": self.token_bytes,
            "bytes_used": int(held.sum()) * self.token_bytes,
            "nbytes": self.nbytes,
            "position_bytes": int(self._slot_positions.nbytes),
            "pending_bytes": self._pending_bytes(),
        }

    def state(self):
        """A deep snapshot of everything the cache holds (for tests: equal snapshots = identical caches)."""
        return {"kv": self.kv.copy(), "slot_positions": self.slot_positions.copy(), "lengths": self._lengths.copy(),
                **self._tracking_state()}

    # --- the variant's part of the lifecycle (kvref/cache.py runs it) -----------------------------------------
    def _plan(self, ids, positions):
        """slots[i, t] = ring_slot(p), or -1 if a later token of the same step takes that slot; the step is
        deferred if writing it at once would overwrite a key one of its own queries needs. Never raises for
        length: the ring overwrites."""
        num_tokens = positions.shape[1]
        slots = np.empty_like(positions)
        for i in range(positions.shape[0]):
            last = positions[i, -1]
            for t in range(num_tokens):
                p = positions[i, t]
                kept = kept_after_step(p, last, self.window, self.sinks)
                slots[i, t] = ring_slot(p, self.window, self.sinks) if kept else -1
        deferred = any(must_defer(int(self._lengths[s]), num_tokens, self.window) for s in ids.tolist())
        ids, positions, slots = freeze(ids, positions, slots)
        return RingStep(ids, positions, slots, self._id, self._version, deferred)

    def _write(self, step, layer, k_store, v_store):
        """A deferred step's K/V are copied aside and written into the ring by ``advance``."""
        if step.deferred:
            self._pending[layer] = (self._ops.copy(k_store), self._ops.copy(v_store))
        else:  # written at once: a step may be abandoned (a rejected draft token), but a crop must wait (below)
            self._ops.write_tokens(self._kv, self._slot_positions, layer, step.seq_ids, step.positions, step.slots,
                                   k_store, v_store)
            self._overwritten_at = self._version

    def _attend(self, step, layer, q, scale, out):
        if step.deferred:
            pending_k, pending_v = self._pending[layer]
        else:
            empty = (step.seq_ids.size, 0, self.shape.kv_heads, self.shape.head_dim)
            pending_k = pending_v = self._ops.zeros(empty, self.shape.storage_dtype)
        self._ops.attend_tokens(self._kv, self._slot_positions, layer, step.seq_ids, step.positions, pending_k,
                                pending_v, self.window, self.sinks, q, scale, out, self.shape.group_size,
                                self.shape.head_dim)

    def _commit(self, step):
        """A deferred step's K/V go into the ring now."""
        if step.deferred:
            for layer in range(self.shape.layers):
                k_store, v_store = self._pending[layer]
                self._ops.write_tokens(self._kv, self._slot_positions, layer, step.seq_ids, step.positions,
                                       step.slots, k_store, v_store)

    def _clear_positions(self, keep_below):
        """Mark empty (-1) every slot of sequence s whose position is >= keep_below[s], in every layer."""
        positions = np.array(self._ops.to_host(self._slot_positions))
        for s, below in keep_below.items():
            rows = positions[:, s]
            rows[rows >= below] = -1
        self._slot_positions = self._ops.from_host(positions)

    def _reset(self, seqs):
        """Lengths to 0 and slot positions to -1 (empty): O(layers * W) integer writes; the K/V bytes are not
        zeroed (no empty slot is ever read)."""
        self._clear_positions({s: 0 for s in seqs})
        self._lengths[seqs] = 0

    def _check_crop(self, seq, length, target, max_length):
        """Exact only when the ring still holds every key the shorter sequence needs: a sequence that has wrapped
        (length > W) may only keep its length or keep nothing but sinks (target <= S); and no crop while a step
        written in this state has overwritten slots without being advanced (the overwritten keys may be needed)."""
        if self._overwritten_at == self._version:
            raise StaleStepError("max_length", "no crop while a written step is not advanced",
                                 "a written step that overwrote ring slots", detail="advance a step first")
        if length > self.window and self.sinks < target < length:
            dropped = f"{self.sinks} .. {length - (self.window - self.sinks) - 1}"
            raise IndexOutOfRangeError(
                "max_length", f"{length} (no change) or <= sinks={self.sinks} for sequence {seq}, which has wrapped",
                max_length, detail=f"positions {dropped} were overwritten and a cropped ring would need some of "
                                   "them; nothing was changed")

    def _crop(self, targets):
        self._clear_positions(targets)
        for s, target in targets.items():
            self._lengths[s] = target
