"""The two-tier cache: recent tokens at full precision, older ones in ggml's quantized blocks. Its whole algorithm.

**The tiers.** Every sequence's tokens 0 .. L-1 split into three ranges, with two counters per sequence,
``e`` (evicted) and ``m`` (migrated)::

    positions   0 ........ e-1 | e ............. m-1 | m ............ L-1
                evicted (gone)   quantized store        tail (fp16 or fp32, the cache's dtype)
                                 slot p % S             slot p % R

* The **tail** is a ring of ``R = tail_tokens`` slots holding the most recent tokens exactly as written.
* The **store** is a ring of ``S`` slots of ggml blocks (``kvref/quant.py``): per token, per KV head, K and V
  separately, ``head_dim / 32`` blocks of 32 channels along ``head_dim``, each with its own scale. This is how
  llama.cpp quantizes its KV cache (``-ctk q8_0``), so every token and head and K and V get their own scales
  (seed 004 used one scale per token across all heads, computed from the keys and applied to the values too, and
  stored the codes as f32, which saved nothing).
* **Migration.** When a step would leave more than R tokens in the tail, the oldest tail tokens move to the store
  in batches of ``B = migration_batch``: ``m' = m + ceil(overflow / B) * B`` with ``overflow = L' - m - R``.
  A token is quantized exactly once, when it enters the store, and never again (Hugging Face's ``QuantizedCache``
  dequantizes and re-quantizes its whole store on every flush; KIVI and kvref do not). After a migration the tail
  holds between R - B + 1 and R tokens.
* **Eviction.** ``max_tokens = M`` bounds the tokens held: ``e = max(0, L - M)``, exactly (seed 004's
  ``enforce_max_tokens`` subtracted a count taken after it had shrunk the tail, so its total drifted). Since M >= R,
  eviction only ever takes store tokens, the oldest first. The store therefore needs ``S = M - R + B - 1`` slots.
* **Prefill longer than R** goes straight to the right tiers: of a step's new tokens, those below ``m'`` are
  quantized directly into the store and the rest go to the tail; tokens below ``e'`` (a prompt longer than M) are
  never stored at all. Hugging Face instead quantizes the whole prompt at once whatever ``residual_length`` says
  (transformers #35185), so right after prefill it has no full-precision tail.

**Attention.** The cache holds a sliding window of the last M tokens, so a query at position i sees the keys
``i - M < j <= i`` (the window rule of :func:`kvref.attention.visible`, with W = M), from three places, all in one
online softmax:

    store rows   [max(i - M + 1, 0), m)     dequantized block by block inside the loop (no float copy)
    tail rows    [m, L)                     as stored
    step rows    [L, i]                     the step's own new K/V, as given to write()

**A step**: plan (host: positions, and the tier counters after the step) -> write (per layer: the new K/V are
held aside) -> attend (per layer: store + tail as they were, plus the held-aside step) -> advance (per layer,
compiled: migrate the old tail tokens that leave, then store the new tokens in their tiers; then the counters).
So a step's queries see its own tokens at the precision they arrived in, and every earlier token in the tier it was
in before the step, and all of a step's keys stay available to all of its queries even when the step evicts
(a chunk longer than M). Storing at advance also means one step never overwrites a tail slot that it still reads.
Decode (T = 1) is the same as write-then-attend: the new token would be in the tail either way.

``crop`` keeps the first n tokens when nothing has been evicted (store tokens cut off are simply forgotten; the
kept ones are not re-quantized, and a crop into the store leaves an empty tail); ``reset`` zeroes the counters.

The functions marked ``@register_jitable`` are the spec: plain Python here (backend "python"), compiled by
``kvref/cpu/two_tier.py`` and called from the CUDA kernels of ``kvref/cuda/two_tier.py``.
"""

import dataclasses

import numpy as np
from numba.extending import register_jitable

from . import quant
from .attention import (MAX_ROWS, SCORE_KEYS, WORK_COLUMNS, attend_gathered_tokens, attend_quantized_rows, attend_rows,
                        first_visible, key_share, local_array, merge_parts, ring_run, save_state, softmax_start)
from .cache import CacheBase, Step, allocate, freeze
from .errors import DTypeError, IndexOutOfRangeError, ShapeError
from .quant import BLOCK
from .shapes import CacheShape, check_index, check_positive_int

__all__ = ["TwoTierCache", "TwoTierStep", "attend_one", "attend_part", "attend_tokens", "commit_tokens", "migrate_to",
           "old_tokens_leaving", "store_capacity"]


# ---------------------------------------------------------------------------------------------------------------
# Spec: the tier counters
# ---------------------------------------------------------------------------------------------------------------
def store_capacity(tail_tokens, max_tokens, migration_batch):
    """S = M - R + B - 1: the most tokens the store holds (M held at most, of which at least R - B + 1 in the tail
    once anything has migrated)."""
    return max_tokens - tail_tokens + migration_batch - 1


def migrate_to(length, migrated, num_tokens, tail_tokens, migration_batch):
    """m' after a step of C tokens: ``m + ceil((L + C - m - R) / B) * B`` if the tail would overflow, else m."""
    overflow = length + num_tokens - migrated - tail_tokens
    if overflow <= 0:
        return migrated
    return migrated + -(-overflow // migration_batch) * migration_batch


# ---------------------------------------------------------------------------------------------------------------
# Spec: storing (at advance)
# ---------------------------------------------------------------------------------------------------------------
@register_jitable
def old_tokens_leaving(positions, tiers, i):
    """How many old tail tokens of step-sequence i leave the tail in this step: positions ``max(m, e') <= p <
    min(m', L)`` (the old tokens below e' are evicted without ever being quantized)."""
    return max(0, min(tiers[i, 1], positions[i, 0]) - max(tiers[i, 0], tiers[i, 2]))


@register_jitable
def migrate_one(tail, store, layer, seq_ids, positions, tiers, fmt, scratch, i, k, h, lane, lanes):
    """Migrate the k-th old tail token of step-sequence i that leaves the tail in this step (head h, K and V):
    quantize tail slot p % R into store slot p % S (as lane ``lane`` of ``lanes``: :func:`kvref.quant.quantize_row`).
    The old tokens that leave are ``max(m, e') <= p < min(m', L)``
    (those below e' are evicted without ever being quantized)."""
    seq = seq_ids[i]
    length = positions[i, 0]
    p = max(tiers[i, 0], tiers[i, 2]) + k
    if p >= min(tiers[i, 1], length):
        return
    R = tail.shape[4]
    S = store.shape[4]
    for kv_index in range(2):
        quant.quantize_row(tail[layer, kv_index, seq, h, p % R], fmt, store[layer, kv_index, seq, h, p % S],
                           scratch, lane, lanes)


@register_jitable
def append_one(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, fmt, scratch, i, t, h, lane,
               lanes):
    """Store new token t (position p) of step-sequence i, head h: nothing if p < e' (evicted at once), quantized into
    store slot p % S if p < m', else copied into tail slot p % R. Lane ``lane`` of ``lanes`` does its share:
    elements d = lane, lane + lanes, ... of the copy, its share of each block of the quantized rows."""
    seq = seq_ids[i]
    p = positions[i, t]
    if p < tiers[i, 2]:
        return
    if p < tiers[i, 1]:
        S = store.shape[4]
        quant.quantize_row(pending_k[i, t, h], fmt, store[layer, 0, seq, h, p % S], scratch, lane, lanes)
        quant.quantize_row(pending_v[i, t, h], fmt, store[layer, 1, seq, h, p % S], scratch, lane, lanes)
        return
    slot = p % tail.shape[4]
    for d in range(lane, pending_k.shape[3], lanes):
        tail[layer, 0, seq, h, slot, d] = pending_k[i, t, h, d]
        tail[layer, 1, seq, h, slot, d] = pending_v[i, t, h, d]


@register_jitable
def commit_tokens(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, fmt):
    """Store one layer's step: first migrate the old tail tokens that leave (they are read from tail slots the new
    tokens may reuse), then place the new tokens.

    tail: (layers, 2, batch, kv_heads, R, D) float32|uint16;  store: (layers, 2, batch, kv_heads, S, D/32*B) uint8
    tiers: (n_seq, 3) int64 [m, m', e'];  pending_k/v: (n_seq, T, kv_heads, D) in the tail's dtype
    """
    n_seq, n_tokens, kv_heads, _ = pending_k.shape
    scratch = np.empty(quant.BLOCK, np.float32)
    for i in range(n_seq):
        for k in range(old_tokens_leaving(positions, tiers, i)):
            for h in range(kv_heads):
                migrate_one(tail, store, layer, seq_ids, positions, tiers, fmt, scratch, i, k, h, 0, 1)
    for i in range(n_seq):
        for t in range(n_tokens):
            for h in range(kv_heads):
                append_one(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, fmt, scratch, i, t, h,
                           0, 1)


# ---------------------------------------------------------------------------------------------------------------
# Spec: attention over both tiers and the step's own tokens
# ---------------------------------------------------------------------------------------------------------------
@register_jitable
def attend_part(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q_heads, scale,
                part_acc, part_m_l, i, t, h, part, parts, group, head_dim):
    """The online softmax of the G query heads ``q_heads`` (G, D) of KV head h for new token t (position p) of
    step-sequence i, over share ``part`` of ``parts`` (``attention.key_share``) of its keys ``p - M < j <= p``,
    saved as a partial state (``part_acc`` (G, D), ``part_m_l`` (G, 2); ``attention.merge_parts`` combines them).

    The part's positions [a, b) fall into up to three segments: store positions [a, m), tail positions
    [max(a, m), L), step positions [max(a, L), b) (m: migrated before the step, L: the length; see the docstring)."""
    acc = local_array((group, head_dim))  # the unnormalised output of the G heads
    work = local_array((group, WORK_COLUMNS))  # a tile's scores, then m and l
    block = local_array((SCORE_KEYS, group))  # the sums of one score pass
    decoded = local_array((MAX_ROWS, head_dim))  # a few stored rows, decoded
    codes = local_array((1, BLOCK))  # one block's codes
    seq = seq_ids[i]
    p = positions[i, t]
    length = positions[i, 0]
    migrated = tiers[i, 0]
    lo = first_visible(p, window)
    share_lo, share_hi = key_share(p + 1 - lo, part, parts)
    a = lo + share_lo  # this part's positions: a .. b - 1
    b = lo + share_hi
    softmax_start(acc, work)
    store_hi = min(migrated, b)
    if a < store_hi:  # the quantized store, dequantized a few rows at a time
        keys = store[layer, 0, seq, h]  # (S, row_bytes) uint8: each row is head_dim / 32 ggml blocks
        values = store[layer, 1, seq, h]  # (S, row_bytes)
        start, n_first, n_second = ring_run(a, store_hi, store.shape[4])
        for run in range(2):  # slots start .. start+n_first-1, then 0 .. n_second-1
            slot, count = (start, n_first) if run == 0 else (0, n_second)
            attend_quantized_rows(q_heads, keys[slot:slot + count], values[slot:slot + count], count, fmt, scale,
                                  acc, work, block, decoded, codes)
    tail_lo = max(a, migrated)
    tail_hi = min(length, b)
    if tail_lo < tail_hi:  # the tail, as stored
        keys = tail[layer, 0, seq, h]  # (R, D) the tail ring's rows, slot p % R
        values = tail[layer, 1, seq, h]  # (R, D)
        start, n_first, n_second = ring_run(tail_lo, tail_hi, tail.shape[4])
        for run in range(2):
            slot, count = (start, n_first) if run == 0 else (0, n_second)
            attend_rows(q_heads, keys[slot:slot + count], values[slot:slot + count], count, scale, acc, work, block)
    step_lo = max(a, length)  # the step's own tokens up to p, as given to write()
    step_hi = max(b, step_lo)
    attend_rows(q_heads, pending_k[i, step_lo - length:step_hi - length, h],
                pending_v[i, step_lo - length:step_hi - length, h], step_hi - step_lo, scale, acc, work, block)
    save_state(acc, work, part_acc, part_m_l)


@register_jitable
def attend_one(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q, scale, out,
               i, t, h, group, head_dim):
    """Attention of the G query heads of KV head h for new token t of step-sequence i: all its keys as one part."""
    part_acc = local_array((1, group, head_dim))
    part_m_l = local_array((1, group, 2))
    first = h * group
    attend_part(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt,
                q[i, t, first:first + group], scale, part_acc[0], part_m_l[0], i, t, h, 0, 1, group, head_dim)
    merge_parts(part_acc, part_m_l, out[i, t, first:first + group], group, head_dim)


@register_jitable
def attend_tokens(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q, scale, out,
                  group, head_dim):
    """Decode attention (T = 1) or chunked prefill (T > 1) of one layer for every new token.

    q, out: (n_seq, T, q_heads, D) float32;  window: M (max_tokens);  fmt: the store's ggml type number
    group, head_dim: G and D, constants when compiled (kvref/attention.py, "Specialisation")
    """
    n_seq, n_tokens = positions.shape
    for i in range(n_seq):
        for t in range(n_tokens):
            for h in range(tail.shape[3]):
                attend_one(tail, store, layer, seq_ids, positions, tiers, pending_k, pending_v, window, fmt, q, scale,
                           out, i, t, h, group, head_dim)


#: the materializing path's attention (teaching, cross-check): attention over gathered float32 rows
attend_materialized_tokens = attend_gathered_tokens


# ---------------------------------------------------------------------------------------------------------------
# The cache object: the lifecycle and the checks are kvref/cache.py's; the two-tier cache adds its tiers.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class TwoTierStep(Step):
    """A planned step of the two-tier cache. ``tiers``: (n_seq, 3) int64, per sequence the tokens migrated before
    the step, the migrated count after it and the evicted count after it, ``[m, m', e']``."""

    tiers: np.ndarray


class TwoTierCache(CacheBase):
    """A KV cache with a full-precision tail of the R most recent tokens and a ggml-quantized store of older ones.

    shape:           CacheShape; its dtype (float16 or float32) is the tail's; head_dim must be a multiple of 32
    batch:           number of sequences
    tail_tokens:     R, the tail's slots
    max_tokens:      M >= R, the most tokens held per sequence; older ones are evicted (a sliding window of M)
    store_format:    "q8_0" (default), "q4_0", "q4_1", "q5_0" or "q5_1"
    migration_batch: B, 1 <= B <= R, tokens moved to the store at a time (default min(64, R))
    backend:         "python", "cpu" or "cuda"

    Use it as the flat cache; it never overflows::

        step = cache.plan(num_tokens)
        for layer in range(shape.layers):
            cache.write(step, layer, k, v)         # held aside until advance; NaN/inf raise NonFiniteError
            o = cache.attend(step, layer, q)       # store + tail + the step's own K/V
        cache.advance(step)                        # migrate, quantize, store
    """

    variant = "two_tier"
    step_type = TwoTierStep
    holds_step_aside = True

    def __init__(self, shape, batch=1, tail_tokens=256, max_tokens=4096, store_format="q8_0", migration_batch=None,
                 backend="cpu"):
        if not isinstance(shape, CacheShape):  # checked here too: shape.head_dim is read before CacheBase checks it
            raise ShapeError("shape", "a kvref.CacheShape", type(shape).__name__)
        check_positive_int("tail_tokens", tail_tokens)
        check_positive_int("max_tokens", max_tokens)
        if not isinstance(store_format, str) or store_format not in quant.GGML_TYPES:  # quant.format_id says "fmt"
            raise DTypeError("store_format", f"one of {sorted(quant.FORMATS)}", repr(store_format))
        self.format_id = quant.format_id(store_format)
        if migration_batch is None:
            migration_batch = min(64, int(tail_tokens))
        check_positive_int("migration_batch", migration_batch)
        if migration_batch > tail_tokens:
            raise ShapeError("migration_batch", f"<= tail_tokens={int(tail_tokens)}", int(migration_batch))
        if max_tokens < tail_tokens:
            raise ShapeError("max_tokens", f">= tail_tokens={int(tail_tokens)}", int(max_tokens))
        if shape.head_dim % quant.BLOCK:
            raise ShapeError("shape.head_dim", "a multiple of 32 (ggml blocks run along head_dim)", shape.head_dim)
        self.tail_tokens = int(tail_tokens)
        self.max_tokens = int(max_tokens)
        self.store_format = store_format
        self.migration_batch = int(migration_batch)
        self.store_tokens = store_capacity(self.tail_tokens, self.max_tokens, self.migration_batch)
        super().__init__(shape, batch, self.tail_tokens, backend, size_argument="tail_tokens")
        self.row_bytes = quant.row_bytes(shape.head_dim, store_format)
        self._store = allocate(self._ops, "max_tokens", (shape.layers, 2, self.batch, shape.kv_heads,
                                                          self.store_tokens, self.row_bytes), np.uint8)
        self._migrated = np.zeros(self.batch, np.int64)

    # --- reading the state ---------------------------------------------------------------------------------
    @property
    def store(self):
        """The store array (layers, 2, batch, kv_heads, S, row_bytes) uint8 as NumPy (read-only view or copy)."""
        view = self._ops.to_host(self._store).view()
        view.setflags(write=False)
        return view

    @property
    def nbytes(self):
        """Bytes actually allocated for K/V: the tail plus the store."""
        return int(self._kv.nbytes) + int(self._store.nbytes)

    def get_max_cache_shape(self):
        """The most tokens held per sequence: max_tokens."""
        return self.max_tokens

    def remaining_capacity(self, seq=0):
        """Tokens sequence ``seq`` can take before eviction starts (M - length, at least 0)."""
        return max(0, self.max_tokens - self.get_seq_length(seq))

    def tiers(self, seq=0):
        """Position ranges of sequence ``seq``: {"evicted": (0, e), "store": (e, m), "tail": (m, L)}."""
        check_index("seq", seq, self.batch)
        length = int(self._lengths[seq])
        evicted = max(0, length - self.max_tokens)
        migrated = int(self._migrated[seq])
        return {"evicted": (0, evicted), "store": (evicted, migrated), "tail": (migrated, length)}

    def store_blocks(self, layer, seq=0):
        """The raw ggml bytes of the stored tokens of one layer and sequence, in position order:
        (2 = K|V, kv_heads, n_store, row_bytes) uint8."""
        check_index("layer", layer, self.shape.layers)
        lo, hi = self.tiers(seq)["store"]
        slots = [p % self.store_tokens for p in range(lo, hi)]
        return np.array(self._ops.to_host(self._store[layer, :, seq])[:, :, slots])

    def _stored(self, layer, seq, kv_index):
        """Held keys or values in position order as float32 (kv_heads, n, head_dim): store dequantized, tail widened."""
        check_index("layer", layer, self.shape.layers)
        check_index("seq", seq, self.batch)
        blocks = self.store_blocks(layer, seq)[kv_index]
        dims = blocks.shape[:2] + (self.shape.head_dim,)
        stored = quant.dequantize(blocks, self.store_format, dims, backend=self._host_backend())
        lo, hi = self.tiers(seq)["tail"]
        tail = self._rows(layer, seq, kv_index, [p % self.tail_tokens for p in range(lo, hi)])
        return np.concatenate([stored, tail.astype(np.float32)], axis=1)

    def _host_backend(self):
        """The backend that runs host-side helpers (dequantizing for keys()/values(), the materializing path)."""
        return "python" if self.backend == "python" else "cpu"

    def stats(self):
        """Tokens per tier and bytes from the real arrays; compression = original bytes / stored bytes."""
        s = self.shape
        lengths = self._lengths
        evicted = np.maximum(0, lengths - self.max_tokens)
        held = lengths - evicted
        tail_used = lengths - self._migrated
        store_used = self._migrated - evicted
        tail_token_bytes = self.token_bytes  # 2 * layers * kv_heads * head_dim * (2 or 4): the tail's real dtype
        store_token_bytes = 2 * s.layers * s.kv_heads * self.row_bytes
        fp16_token_bytes = 2 * s.layers * s.kv_heads * s.head_dim * 2
        used = int(tail_used.sum()) * tail_token_bytes + int(store_used.sum()) * store_token_bytes
        held_total = int(held.sum())
        return {
            **self._stats_head(),
            "store_format": self.store_format,
            "tail_tokens": self.tail_tokens,
            "max_tokens": self.max_tokens,
            "migration_batch": self.migration_batch,
            "store_slots": self.store_tokens,
            "lengths": lengths.tolist(),
            "tokens_held": held.tolist(),
            "tokens_evicted": evicted.tolist(),
            "tokens_in_tail": tail_used.tolist(),
            "tokens_in_store": store_used.tolist(),
            "tail_bytes": int(self._kv.nbytes),
            "store_bytes": int(self._store.nbytes),
            "nbytes": self.nbytes,
            "tail_bytes_used": int(tail_used.sum()) * tail_token_bytes,
            "store_bytes_used": int(store_used.sum()) * store_token_bytes,
            "bytes_used": used,
            "compression_vs_fp16": held_total * fp16_token_bytes / used if used else None,
            "compression_vs_fp32": held_total * 2 * fp16_token_bytes / used if used else None,
            "store_compression_vs_fp16": fp16_token_bytes / store_token_bytes,
            "store_compression_vs_fp32": 2 * fp16_token_bytes / store_token_bytes,
            "pending_bytes": self._pending_bytes(),
        }

    def state(self):
        """A deep snapshot of everything the cache holds (for tests: equal snapshots = identical caches)."""
        return {"tail": self.kv.copy(), "store": self.store.copy(), "lengths": self._lengths.copy(),
                "migrated": self._migrated.copy(), **self._tracking_state()}

    # --- the variant's part of the lifecycle (kvref/cache.py runs it) -----------------------------------------
    def _plan(self, ids, positions):
        """positions[i, t] = L_i + t;  slots[i, t] = tail slot p % R for tokens that end the step in the tail, else
        -1;  tiers[i] = [m, m', e'] (migrated before, migrated after, evicted after). Never overflows."""
        num_tokens = positions.shape[1]
        tiers = np.empty((ids.size, 3), np.int64)
        slots = np.full_like(positions, -1)
        for i, s in enumerate(ids.tolist()):
            length = int(self._lengths[s])
            tiers[i, 0] = self._migrated[s]
            tiers[i, 1] = migrate_to(length, int(self._migrated[s]), num_tokens, self.tail_tokens,
                                     self.migration_batch)
            tiers[i, 2] = max(0, length + num_tokens - self.max_tokens)
            in_tail = positions[i] >= tiers[i, 1]
            slots[i, in_tail] = positions[i, in_tail] % self.tail_tokens
        ids, positions, slots, tiers = freeze(ids, positions, slots, tiers)
        return TwoTierStep(ids, positions, slots, self._id, self._version, tiers)

    def _check_values(self, name, a):
        """NaN or inf raises NonFiniteError (it could not be quantized), before anything changes."""
        quant.check_finite(name, self._ops.to_host(a))

    def _write(self, step, layer, k_store, v_store):
        """Hold one layer's new K and V aside until ``advance``."""
        self._pending[layer] = (self._ops.copy(k_store), self._ops.copy(v_store))

    def _attend(self, step, layer, q, scale, out):
        """Reads the store block by block (no dequantized copy), the tail and the held-aside step."""
        pending_k, pending_v = self._pending[layer]
        self._ops.attend_tokens(self._kv, self._store, layer, step.seq_ids, step.positions, step.tiers, pending_k,
                                pending_v, self.max_tokens, self.format_id, q, scale, out, self.shape.group_size,
                                self.shape.head_dim)

    def materialize(self, step, layer):
        """Float32 copies of every key and value the step's queries may see, per step-sequence: (keys, values,
        positions) with keys/values (n_seq, kv_heads, N, head_dim) and positions (n_seq, N) (-1 pads)."""
        self._check_step(step)
        check_index("layer", layer, self.shape.layers)
        self._check_written(step, [layer], "materialize()")
        pending_k, pending_v = (self._ops.to_host(a) for a in self._pending[layer])
        kv_heads, head_dim = self.shape.kv_heads, self.shape.head_dim
        parts = []
        for i, s in enumerate(step.seq_ids.tolist()):
            lo = self.tiers(s)["evicted"][1]
            step_k = pending_k[i].view(self.shape.public_dtype).astype(np.float32).transpose(1, 0, 2)
            step_v = pending_v[i].view(self.shape.public_dtype).astype(np.float32).transpose(1, 0, 2)
            keys = np.concatenate([self._stored(layer, s, 0), step_k], axis=1)
            values = np.concatenate([self._stored(layer, s, 1), step_v], axis=1)
            parts.append((keys, values, np.arange(lo, int(step.positions[i, -1]) + 1)))
        n = max(p[2].size for p in parts)
        keys = np.zeros((len(parts), kv_heads, n, head_dim), np.float32)
        values = np.zeros_like(keys)
        positions = np.full((len(parts), n), -1, np.int64)
        for i, (k, v, pos) in enumerate(parts):
            keys[i, :, :pos.size], values[i, :, :pos.size], positions[i, :pos.size] = k, v, pos
        return keys, values, positions

    def attend_materialized(self, step, layer, q, scale=None, out=None):
        """The same attention as :meth:`attend`, computed over :meth:`materialize`'s float32 copies (teaching and
        cross-check; it runs on the host: the python backend runs the spec, the others its njit twin)."""
        out, scale = self._check_query(step, layer, q, scale, out)
        self._check_written(step, [layer], "attend()")
        keys, values, key_positions = self.materialize(step, layer)
        from .backends import backend_ops

        host_out = np.empty(out.shape, np.float32)
        backend_ops(self.variant, self._host_backend()).attend_materialized_tokens(
            keys, values, key_positions, step.positions, self.max_tokens, 0, np.asarray(self._ops.to_host(q)), scale,
            host_out, self.shape.group_size, self.shape.head_dim)
        if self._ops.is_device_array(out):
            out.copy_to_device(host_out)
        else:
            out[...] = host_out
        return out

    def _commit(self, step):
        """Every layer: migrate the tail tokens that leave, store the new tokens in their tiers; then ``m = m'``."""
        for layer in range(self.shape.layers):
            pending_k, pending_v = self._pending[layer]
            self._ops.commit_tokens(self._kv, self._store, layer, step.seq_ids, step.positions, step.tiers,
                                    pending_k, pending_v, self.format_id)
        self._migrated[step.seq_ids] = step.tiers[:, 1]

    def _reset(self, seqs):
        """O(1) per sequence: only the counters change."""
        self._lengths[seqs] = 0
        self._migrated[seqs] = 0

    def _check_crop(self, seq, length, target, max_length):
        """Exact only while nothing was evicted (length <= max_tokens); otherwise only a no-op crop is allowed."""
        if length > self.max_tokens and target < length:
            raise IndexOutOfRangeError(
                "max_length", f"{length} (no change) for sequence {seq}, which has evicted tokens", max_length,
                detail=f"positions 0 .. {length - self.max_tokens - 1} are gone and a cropped cache would need "
                       "some of them; nothing was changed")

    def _crop(self, targets):
        """Kept store tokens are not re-quantized (transformers #40099 left its quantized buffer untouched by crop); a
        crop into the store empties the tail."""
        for s, target in targets.items():
            self._lengths[s] = target
            self._migrated[s] = min(int(self._migrated[s]), target)
