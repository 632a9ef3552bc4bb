"""Obviously-correct float64 NumPy references for the kvref tests.

Attention has ONE float64 reference, :mod:`kvref.check` ("gather the visible K/V, softmax, matmul", written there on
its own without kvref's spec functions, and checked in tests/test_check.py against a per-element loop written out
in that test). ``python -m kvref.plots`` and ``python -m kvref.bench`` check every backend against it; the tests use
the same functions, re-exported here under the names they have always used: :func:`softmax`, :func:`attention`,
:func:`kv_head_of`, :func:`decode_attention_gqa`, :func:`window_keys`, and two thin wrappers for chunks,
:func:`causal_chunk_attention` and :func:`window_chunk_attention`.

Everything else here is independent of kvref: list models of each variant (:class:`FlatModel`, :class:`RingModel`,
:class:`TwoTierModel`, :class:`PooledModel`) restate its rules over Python lists of rows, the ggml bytes come from
the ``gguf`` package, and the gathers read raw storage with NumPy indexing.

Conventions (the shapes are those of the math, not of kvref's storage):

    q        (D,) one query head, or (Hq, D) all query heads of one token
    k, v     (n, D) one KV head's visible rows, or (Hkv, n, D)
    scale    the softmax scale, usually 1 / sqrt(D)
"""

import math

import numpy as np

# the attention reference, re-exported for the tests (``oracle.attention``, ``from oracle import window_keys``, ...)
from kvref.check import (attention, decode_attention_gqa, kv_head_of, reference_attention, softmax,  # noqa: F401
                         window_keys)


def causal_chunk_attention(q, k, v, positions, scale):
    """A chunk of T tokens: token t sits at absolute position positions[t] and sees keys 0 .. positions[t].

    q: (T, Hq, D); k, v: (Hkv, n, D) with n > max(positions) (the chunk's own keys included) -> (T, Hq, D).
    :func:`kvref.check.reference_attention` without a window."""
    return reference_attention(q, k, v, positions, scale)


def fp16_round(a):
    """What an fp16 cache stores for float values a: round to float16 (NumPy), back to float64."""
    return np.asarray(a).astype(np.float16).astype(np.float64)


class FlatModel:
    """A list-based model of a flat KV cache: rows[layer][seq] is a Python list of (k_row, v_row), each (Hkv, D).

    It knows nothing about slots or buffers: appending is list.append, reset is clear, crop is del.
    """

    def __init__(self, layers, batch, max_tokens):
        self.layers = layers
        self.batch = batch
        self.max_tokens = max_tokens
        self.rows = [[[] for _ in range(batch)] for _ in range(layers)]

    def length(self, seq):
        lengths = {len(self.rows[layer][seq]) for layer in range(self.layers)}
        assert len(lengths) == 1, "all layers of a sequence hold the same number of tokens"
        return lengths.pop()

    def lengths(self):
        return [self.length(s) for s in range(self.batch)]

    def would_overflow(self, num_tokens, seq_ids):
        return any(self.length(s) + num_tokens > self.max_tokens for s in seq_ids)

    def append(self, layer, seq, k_rows, v_rows):
        """k_rows, v_rows: (T, Hkv, D) new tokens of one sequence for one layer."""
        for k_row, v_row in zip(k_rows, v_rows):
            self.rows[layer][seq].append((np.array(k_row, dtype=np.float64), np.array(v_row, dtype=np.float64)))

    def keys(self, layer, seq):
        """(Hkv, n, D) float64, or None when the sequence is empty."""
        return self._stack(layer, seq, 0)

    def values(self, layer, seq):
        return self._stack(layer, seq, 1)

    def _stack(self, layer, seq, which):
        rows = [pair[which] for pair in self.rows[layer][seq]]
        if not rows:
            return None
        return np.stack(rows, axis=1)  # (Hkv, n, D)

    def reset(self, seq=None):
        for layer in range(self.layers):
            for s in range(self.batch) if seq is None else [seq]:
                self.rows[layer][s].clear()

    def crop(self, max_length, seq=None):
        """Hugging Face semantics: keep the first max_length tokens; a negative value drops that many."""
        for s in range(self.batch) if seq is None else [seq]:
            n = self.length(s)
            target = max_length if max_length >= 0 else n + max_length
            assert target >= 0
            for layer in range(self.layers):
                del self.rows[layer][s][target:]


# ---------------------------------------------------------------------------------------------------------------
# Sliding window (ring cache): the rule is kvref.check.window_keys, written there apart from kvref's spec
# ---------------------------------------------------------------------------------------------------------------
def window_chunk_attention(q, k, v, positions, window, scale, sinks=0):
    """A chunk of T tokens over the full, unwrapped K/V: token t at positions[t] sees ``window_keys(positions[t])``.

    q: (T, Hq, D); k, v: (Hkv, n, D) holding positions 0 .. n-1 (n > max(positions)) -> (T, Hq, D) float64.
    :func:`kvref.check.reference_attention` with the window."""
    return reference_attention(q, k, v, positions, scale, window, sinks)


class RingModel(FlatModel):
    """A list model of a ring cache: every row ever appended is kept (unwrapped), rows[layer][seq] a Python list of
    (k_row, v_row), each (Hkv, D). What a ring of W slots with S sinks *holds* is ``held(seq)``: the first S
    positions and the last W - S. Nothing here knows about slots."""

    def __init__(self, layers, batch, window, sinks=0):
        super().__init__(layers, batch, max_tokens=None)
        self.window, self.sinks = window, sinks

    def held(self, seq):
        """Positions the ring holds for ``seq`` (the keys the next query, at position length, sees minus itself)."""
        n = self.length(seq)
        if n <= self.window:
            return list(range(n))
        return list(range(self.sinks)) + list(range(n - (self.window - self.sinks), n))

    def keys(self, layer, seq, positions=None):
        """(Hkv, len(positions), D) float64 of the given positions (default: everything appended), or None."""
        return self._stack(layer, seq, 0, positions)

    def values(self, layer, seq, positions=None):
        return self._stack(layer, seq, 1, positions)

    def _stack(self, layer, seq, which, positions):
        rows = self.rows[layer][seq]
        chosen = range(len(rows)) if positions is None else positions
        picked = [rows[p][which] for p in chosen]
        if not picked:
            return None
        return np.stack(picked, axis=1)

    def crop_allowed(self, target, seq):
        """A ring can crop exactly only if it has not wrapped, or the target is the length, or keeps only sinks."""
        n = self.length(seq)
        return n <= self.window or target >= n or target <= self.sinks

    def crop(self, target, seq):
        for layer in range(self.layers):
            del self.rows[layer][seq][target:]


# ---------------------------------------------------------------------------------------------------------------
# Two-tier cache: a list model whose quantized tokens are ggml bytes from the gguf package (the independent oracle
# for kvref's byte compatibility), and a per-element quantization error bound for each format
# ---------------------------------------------------------------------------------------------------------------
def gguf_type(fmt):
    """gguf.GGMLQuantizationType for a format name ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")."""
    import gguf

    return getattr(gguf.GGMLQuantizationType, fmt.upper())


def gguf_quantize(x, fmt):
    """ggml blocks of float32 rows x (last dimension a multiple of 32), by gguf.quants.quantize: uint8."""
    from gguf import quants

    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    return quants.quantize(x, gguf_type(fmt))


def gguf_dequantize(blocks, fmt):
    """float32 values of ggml blocks, by gguf.quants.dequantize."""
    from gguf import quants

    return quants.dequantize(np.ascontiguousarray(blocks), gguf_type(fmt)).astype(np.float32)


#: fp16's relative rounding error (11 significant bits: half an ulp is 2^-11 of the value) and the smallest
#: subnormal step, the absolute error floor of rounding a scale to fp16
FP16_REL, FP16_ABS = 2.0**-11, 2.0**-24


def quant_error_bound(x, fmt):
    """Per-element bound on |x - dequantize(quantize(x))| for ggml format ``fmt``, x (..., n) with n % 32 == 0,
    derived from the formulas (../shared/reference/quant_and_ring_facts.md §1.1, §6). Per block of 32:

        q8_0        d = amax/127, codes rounded:             d/2 + 127 * |d - fp16(d)|
        q4_0/q5_0   d = M/-h (h = 8/16), codes truncated from x*id + h + 0.5, the opposite extreme clamped to
                    (h - 1) d:                                d   + h * |d - fp16(d)|          (= amax/8 or amax/16)
        q4_1/q5_1   d = range/L (L = 15/31), codes rounded:  d/2 + L * |d - fp16(d)| + |m - fp16(m)|

    with |v - fp16(v)| <= 2^-11 |v| + 2^-24 (relative rounding, plus the subnormal floor), and a float32 slack of a
    few ulps of the block's magnitude for the products and sums the formulas round (x*id, q*d + m).
    """
    x = np.asarray(x, dtype=np.float64)
    blocks = x.reshape(x.shape[:-1] + (x.shape[-1] // 32, 32))
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    lo, hi = blocks.min(axis=-1, keepdims=True), blocks.max(axis=-1, keepdims=True)

    def fp16_err(v):
        return FP16_REL * np.abs(v) + FP16_ABS

    if fmt == "q8_0":
        d = amax / 127
        bound = d / 2 + 127 * fp16_err(d)
    elif fmt in ("q4_0", "q5_0"):
        h = 8 if fmt == "q4_0" else 16
        d = amax / h
        bound = d + h * fp16_err(d)
    elif fmt in ("q4_1", "q5_1"):
        levels = 15 if fmt == "q4_1" else 31
        d = (hi - lo) / levels
        bound = d / 2 + levels * fp16_err(d) + fp16_err(lo)
    else:
        raise ValueError(fmt)
    bound = bound + 8 * np.finfo(np.float32).eps * (amax + np.abs(lo))
    return np.broadcast_to(bound, blocks.shape).reshape(x.shape)


def migrate_to(length, migrated, tail_tokens, migration_batch):
    """Migrated count after the sequence has grown to ``length`` tokens (kvref/two_tier.py's rule, restated):
    when more than R tokens would be in the tail, the oldest move to the store in whole batches of B."""
    overflow = length - migrated - tail_tokens
    if overflow <= 0:
        return migrated
    return migrated + math.ceil(overflow / migration_batch) * migration_batch


class TwoTierModel:
    """A list model of a two-tier cache. ``tokens[layer][seq]`` maps each *held* position to a dict:

        {"tier": "tail" | "store", "k", "v": (Hkv, D) float64 values as held (the tail: the values as given, in the
         cache's dtype; the store: gguf's dequantization of the bytes), "k_bytes", "v_bytes": (Hkv, row bytes)
         uint8 for stored tokens (gguf.quants.quantize of the tail values, computed once, at migration)}

    The tiers follow the rules of kvref/two_tier.py restated: e = max(0, L - M) evicted; migrated m grows by whole
    batches of B when the tail would exceed R; a token is quantized once, when it migrates, and kept as those bytes.
    Nothing here knows about slots or rings.
    """

    def __init__(self, layers, batch, tail_tokens, max_tokens, migration_batch, fmt):
        self.layers, self.batch = layers, batch
        self.tail_tokens, self.max_tokens, self.migration_batch, self.fmt = (tail_tokens, max_tokens,
                                                                            migration_batch, fmt)
        self.lengths = [0] * batch
        self.migrated = [0] * batch
        self.tokens = [[{} for _ in range(batch)] for _ in range(layers)]
        self.quantized_count = 0  # tokens x layers ever quantized (each with its K and V rows of every head)

    def length(self, seq):
        return self.lengths[seq]

    def evicted(self, seq):
        return max(0, self.lengths[seq] - self.max_tokens)

    def tiers(self, seq):
        length, migrated, evicted = self.lengths[seq], self.migrated[seq], self.evicted(seq)
        return {"evicted": (0, evicted), "store": (evicted, migrated), "tail": (migrated, length)}

    def advance(self, seq, k, v):
        """Commit a step of one sequence: k, v (layers, T, Hkv, D) as given to the cache (its public dtype)."""
        length = self.lengths[seq]
        new_length = length + k.shape[1]
        for layer in range(self.layers):
            held = self.tokens[layer][seq]
            for t in range(k.shape[1]):
                held[length + t] = {"tier": "tail", "k": np.asarray(k[layer, t], np.float64),
                                    "v": np.asarray(v[layer, t], np.float64)}
        old_migrated = self.migrated[seq]
        new_migrated = migrate_to(new_length, old_migrated, self.tail_tokens, self.migration_batch)
        new_evicted = max(0, new_length - self.max_tokens)
        for layer in range(self.layers):
            held = self.tokens[layer][seq]
            for p in [p for p in held if p < new_evicted]:
                del held[p]
            for p in range(max(old_migrated, new_evicted), new_migrated):
                token = held[p]
                assert token["tier"] == "tail"
                for name in ("k", "v"):
                    raw = gguf_quantize(token[name].astype(np.float32), self.fmt)
                    token[name + "_bytes"] = raw
                    token[name] = gguf_dequantize(raw, self.fmt).astype(np.float64)
                token["tier"] = "store"
                self.quantized_count += 1
        self.lengths[seq] = new_length
        self.migrated[seq] = new_migrated

    def positions(self, seq):
        evicted, length = self.evicted(seq), self.lengths[seq]
        return list(range(evicted, length))

    def keys(self, layer, seq):
        """(Hkv, n, D) float64 of every held position, in order (n may be 0: returns None)."""
        return self._stack(layer, seq, "k")

    def values(self, layer, seq):
        return self._stack(layer, seq, "v")

    def _stack(self, layer, seq, name):
        rows = [self.tokens[layer][seq][p][name] for p in self.positions(seq)]
        return np.stack(rows, axis=1) if rows else None

    def store_bytes(self, layer, seq):
        """(2, Hkv, n_store, row bytes) uint8: the gguf bytes of the stored positions, K then V; None if empty."""
        lo, hi = self.tiers(seq)["store"]
        if hi <= lo:
            return None
        held = self.tokens[layer][seq]
        return np.stack([np.stack([held[p][name] for p in range(lo, hi)], axis=1) for name in ("k_bytes", "v_bytes")])

    def attention(self, layer, seq, q, k_step, v_step, scale):
        """The float64 attention of a step *before* it is committed: q (T, Hq, D); k_step, v_step (T, Hkv, D) as
        given. Query t at p = L + t sees window_keys(p, M): held positions as held now, the step's own as given."""
        length = self.lengths[seq]
        held = self.tokens[layer][seq]
        out = np.zeros(np.asarray(q).shape, np.float64)
        for t in range(q.shape[0]):
            keys = window_keys(length + t, self.max_tokens)
            k_rows = [held[j]["k"] if j < length else np.asarray(k_step[j - length], np.float64) for j in keys]
            v_rows = [held[j]["v"] if j < length else np.asarray(v_step[j - length], np.float64) for j in keys]
            out[t] = decode_attention_gqa(q[t], np.stack(k_rows, axis=1), np.stack(v_rows, axis=1), scale)
        return out

    def reset(self, seq=None):
        for s in range(self.batch) if seq is None else [seq]:
            self.lengths[s] = self.migrated[s] = 0
            for layer in range(self.layers):
                self.tokens[layer][s].clear()

    def crop_allowed(self, target, seq):
        """Exact only while nothing was evicted, or as a no-op."""
        return target >= 0 and (self.lengths[seq] <= self.max_tokens or target >= self.lengths[seq])

    def crop(self, target, seq):
        """Keep positions < target (target clipped to the length); stored tokens kept stay as they are."""
        target = min(target, self.lengths[seq])
        for layer in range(self.layers):
            held = self.tokens[layer][seq]
            for p in [p for p in held if p >= target]:
                del held[p]
        self.lengths[seq] = target
        self.migrated[seq] = min(self.migrated[seq], target)


#: bytes per 32-element block, from ggml's structs (../shared/reference/quant_and_ring_facts.md §1.1)
GGML_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}


def assert_two_tier_matches_model(cache, model):
    """Assert that a two-tier cache object reports exactly what ``model`` (a TwoTierModel) holds: lengths, tiers(),
    store_blocks() bytes, keys()/values() (exactly: dequantizing the model's bytes is the cache's store), the token
    counts and used bytes of stats(), remaining_capacity() and is_full(). Uses only the cache's public methods."""
    s = cache.shape
    row = s.head_dim // 32 * GGML_BLOCK_BYTES[cache.store_format]
    lengths = [model.length(seq) for seq in range(cache.batch)]
    assert cache.lengths.tolist() == lengths
    for seq in range(cache.batch):
        assert cache.get_seq_length(seq) == lengths[seq]
        tiers = model.tiers(seq)
        assert cache.tiers(seq) == tiers, (seq, cache.tiers(seq), tiers)
        n_store = tiers["store"][1] - tiers["store"][0]
        n_held = len(model.positions(seq))
        for layer in range(s.layers):
            got = cache.store_blocks(layer, seq)
            assert got.dtype == np.uint8
            assert got.shape == (2, s.kv_heads, n_store, row)
            if n_store:
                assert np.array_equal(got, model.store_bytes(layer, seq)), f"store bytes, layer {layer} seq {seq}"
            for got, want in ((cache.keys(layer, seq), model.keys(layer, seq)),
                              (cache.values(layer, seq), model.values(layer, seq))):
                assert got.shape == (s.kv_heads, n_held, s.head_dim)
                if n_held:
                    assert np.array_equal(got.astype(np.float64), want), f"held values, layer {layer} seq {seq}"
        assert cache.remaining_capacity(seq) == max(0, model.max_tokens - lengths[seq])
        assert cache.is_full(seq) == (lengths[seq] >= model.max_tokens)
    stats = cache.stats()
    held = [min(n, model.max_tokens) for n in lengths]
    tail = [model.tiers(seq)["tail"][1] - model.tiers(seq)["tail"][0] for seq in range(cache.batch)]
    assert stats["lengths"] == lengths
    assert stats["tokens_held"] == held
    assert stats["tokens_evicted"] == [n - h for n, h in zip(lengths, held)]
    assert stats["tokens_in_tail"] == tail
    assert stats["tokens_in_store"] == [h - t for h, t in zip(held, tail)]
    tail_token_bytes = 2 * s.layers * s.kv_heads * s.head_dim * np.dtype(s.dtype).itemsize
    store_token_bytes = 2 * s.layers * s.kv_heads * row
    assert stats["tail_bytes_used"] == sum(tail) * tail_token_bytes
    assert stats["store_bytes_used"] == (sum(held) - sum(tail)) * store_token_bytes
    assert stats["bytes_used"] == stats["tail_bytes_used"] + stats["store_bytes_used"]


# ---------------------------------------------------------------------------------------------------------------
# Pooled (paged) cache: a list model of each sequence's tokens plus the pool's books, restated from the documented
# rules of kvref/pooled.py (FIFO free queue, ref counts, copy-on-write, exact eviction), and gathers that read a
# sequence's K/V straight out of the raw pool storage with NumPy indexing
# ---------------------------------------------------------------------------------------------------------------
def _storage_as_float(kv):
    """Raw pool storage as NumPy floats: fp16 caches store uint16 bit patterns."""
    kv = np.asarray(kv)
    return kv.view(np.float16) if kv.dtype == np.uint16 else kv


def gather_pooled(kv, layer, table, first, length, block_size):
    """K and V, each (Hkv, n, D) float64, of positions ``first .. length - 1`` of one sequence, read from the raw pool
    ``kv`` (layers, 2, num_blocks, Hkv, B, D) through its block table (held blocks, oldest first): position p is row
    ``p % B`` of block ``table[p // B - first // B]``."""
    kv = _storage_as_float(kv)
    positions = np.arange(first, length)
    blocks = np.asarray(table, dtype=np.int64)[positions // block_size - first // block_size]
    rows = positions % block_size
    out = []
    for which in (0, 1):
        picked = kv[layer, which][blocks, :, rows, :]  # advanced indices first: (n, Hkv, D)
        out.append(np.transpose(picked, (1, 0, 2)).astype(np.float64))
    return out[0], out[1]


def gather_page_table(kv, layer, kv_indptr, kv_indices, kv_last_page_len, i):
    """K and V (Hkv, n, D) float64 of request i of a FlashInfer page table, the way FlashInfer's tests gather them:
    every page of the request in order, all rows of the full pages, then the first ``last_page_len`` rows of the
    last page. Storage (layers, 2, num_pages, Hkv, page_size, D) is FlashInfer's HND layout per layer and K/V."""
    kv = _storage_as_float(kv)
    pages = np.asarray(kv_indices)[int(kv_indptr[i]):int(kv_indptr[i + 1])]
    out = []
    for which in (0, 1):
        parts = [kv[layer, which, int(p)] for p in pages[:-1]]  # (Hkv, page_size, D) each
        parts.append(kv[layer, which, int(pages[-1]), :, :int(kv_last_page_len[i])])
        out.append(np.concatenate(parts, axis=1).astype(np.float64))
    return out[0], out[1]


class PoolRefused(Exception):
    """The PooledModel refuses an operation; ``kind`` says why: "overflow" (max_tokens), "exhausted" (no free
    block), "max_seqs" (no free sequence row), "unknown" (sequence never added), "released" (already released),
    "range" (a count or crop target outside what the sequence holds). A refused operation changes nothing."""

    def __init__(self, kind):
        super().__init__(kind)
        self.kind = kind


class _PooledSeq:
    """One live sequence of a PooledModel: rows[layer] lists (k_row, v_row) of every position 0 .. length - 1 (the
    evicted ones too, never read), ``first`` = e (positions e .. length - 1 are held), ``table`` its held blocks."""

    def __init__(self, layers):
        self.rows = [[] for _ in range(layers)]
        self.length = 0
        self.first = 0
        self.table = []

    def copy(self):
        other = _PooledSeq(0)
        other.rows = [list(r) for r in self.rows]
        other.length, other.first, other.table = self.length, self.first, list(self.table)
        return other


def _ceil_div(a, b):
    return -(-a // b)


class PooledModel:
    """A list model of a pooled (paged) KV cache.

    Tokens: per live sequence a Python list of (k_row, v_row) per layer, each (Hkv, D) float64, its length L and its
    first held position e (it holds positions e .. L - 1). Books: each sequence's block table (held blocks, oldest
    first: ceil(L / B) - e // B of them), a ref count per block and a FIFO free queue (allocation pops the head,
    a block whose count reaches 0 joins the tail), restated from kvref/pooled.py's docstring:

    - a step of T tokens for ``ids`` (in that order): first every sequence that would hold more than ``max_tokens``
      drops its oldest tokens, ``e' = L + T - max_tokens`` (``evict="oldest"``; without it the step is refused). Then
      per sequence: if L % B != 0 and its last block was shared before the step (ref >= 2), a fresh block replaces it
      (copy-on-write, by every sharer that appends; the old one loses a reference), then one new block per block
      boundary crossed (logical blocks ceil(L/B) .. ceil((L+T)/B)-1).
      When no block is free and ``evict="oldest"``, the live sequence listing the most blocks whose oldest block is full
      and unshared (ties: lowest id) drops that block (e = (e // B + 1) * B) first; otherwise the step is refused;
    - fork: the child (lowest free row) lists the parent's blocks (ref + 1 each) and copies its tokens;
    - release / reset / crop: blocks past the kept ones freed last first; eviction frees fully evicted blocks oldest
      first, never a token more than asked.

    Every refused operation raises :class:`PoolRefused` and leaves the model as it was.
    """

    def __init__(self, layers, num_blocks, block_size, batch=1, max_seqs=None, max_tokens=None, evict=None,
                 reclaim_by="listed"):
        self.layers = layers
        #: how a reclaim counts a sequence's blocks: "listed" (its table now, blocks this step took included: the
        #: docstring's "listing the most blocks") or "length" (ceil(L / B) - e // B with L before the step)
        self.reclaim_by = reclaim_by
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_seqs = batch if max_seqs is None else max_seqs
        self.max_tokens = num_blocks * block_size if max_tokens is None else max_tokens
        self.policy = evict  # None or "oldest"
        self.seqs = {s: _PooledSeq(layers) for s in range(batch)}  # live sequences
        self.released = set()  # rows released and not re-used since
        self.refs = [0] * num_blocks
        self.free = list(range(num_blocks))  # the free queue, head first
        self.touched = [False] * num_blocks
        self.freed_before = [False] * num_blocks
        self.allocations = self.hits = self.reuses = self.high_water = 0
        self.cow_copies = 0
        self.evicted_tokens = 0
        self.reclaims = 0  # blocks reclaimed from a sequence because the pool ran dry

    # --- copies (a step is tried on one and committed only if it fits) ------------------------------------------
    def copy(self):
        other = PooledModel.__new__(PooledModel)
        other.__dict__.update(self.__dict__)
        other.seqs = {s: q.copy() for s, q in self.seqs.items()}
        other.released = set(self.released)
        for name in ("refs", "free", "touched", "freed_before"):
            setattr(other, name, list(getattr(self, name)))
        return other

    def _commit(self, other):
        self.__dict__.update(other.__dict__)

    def books(self):
        """A snapshot of everything but the token rows (to check that a refused operation changed nothing)."""
        return (sorted((s, q.length, q.first, tuple(q.table), tuple(len(r) for r in q.rows))
                       for s, q in self.seqs.items()), sorted(self.released), tuple(self.refs), tuple(self.free),
                tuple(self.touched), tuple(self.freed_before), self.allocations, self.hits, self.reuses,
                self.high_water, self.cow_copies, self.evicted_tokens, self.reclaims)

    # --- reading ---------------------------------------------------------------------------------------------
    def live(self):
        return sorted(self.seqs)

    def length(self, seq):
        return self.seqs[seq].length

    def first(self, seq):
        return self.seqs[seq].first

    def table(self, seq):
        return list(self.seqs[seq].table)

    def held(self, seq):
        return self.seqs[seq].length - self.seqs[seq].first

    def blocks_used(self):
        return self.num_blocks - len(self.free)

    def keys(self, layer, seq, lo=None, hi=None):
        """(Hkv, n, D) float64 of positions lo .. hi - 1 (default: the held ones, e .. L - 1); None when empty."""
        return self._stack(layer, seq, 0, lo, hi)

    def values(self, layer, seq, lo=None, hi=None):
        return self._stack(layer, seq, 1, lo, hi)

    def _stack(self, layer, seq, which, lo, hi):
        q = self.seqs[seq]
        lo = q.first if lo is None else lo
        hi = q.length if hi is None else hi
        rows = [q.rows[layer][p][which] for p in range(lo, hi)]
        return np.stack(rows, axis=1) if rows else None

    def slots_filled(self):
        """Distinct (block, row) pairs holding a token some live sequence holds."""
        B = self.block_size
        filled = set()
        for q in self.seqs.values():
            for p in range(q.first, q.length):
                filled.add((q.table[p // B - q.first // B], p % B))
        return len(filled)

    # --- the pool --------------------------------------------------------------------------------------------
    def _allocate(self):
        block = self.free.pop(0)
        self.refs[block] = 1
        self.allocations += 1
        self.hits += int(self.touched[block])
        self.reuses += int(self.freed_before[block])
        self.touched[block] = True
        self.high_water = max(self.high_water, self.blocks_used())
        return block

    def _free(self, block):
        assert self.refs[block] >= 1
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free.append(block)
            self.freed_before[block] = True

    def _evict_to(self, seq, new_first):
        q = self.seqs[seq]
        B = self.block_size
        for _ in range(new_first // B - q.first // B):  # fully evicted blocks, oldest first
            self._free(q.table.pop(0))
        self.evicted_tokens += new_first - q.first
        q.first = new_first

    def _reclaim(self):
        B = self.block_size
        victim, most = None, 0
        for s in self.live():
            q = self.seqs[s]
            full = (q.first // B + 1) * B <= q.length
            held = len(q.table) if self.reclaim_by == "listed" else _ceil_div(q.length, B) - q.first // B
            if held > most and full and self.refs[q.table[0]] == 1:
                victim, most = s, held
        if victim is not None:
            self._evict_to(victim, (self.seqs[victim].first // B + 1) * B)
            self.reclaims += 1

    def _take(self):
        if not self.free and self.policy is not None:
            self._reclaim()
        if not self.free:
            raise PoolRefused("exhausted")
        return self._allocate()

    def _drop_tail(self, seq, length):
        q = self.seqs[seq]
        B = self.block_size
        keep = max(0, _ceil_div(length, B) - q.first // B)  # 0 when everything goes (length 0, e > 0)
        for block in reversed(q.table[keep:]):  # last block first
            self._free(block)
        del q.table[keep:]
        for rows in q.rows:
            del rows[length:]
        q.length = length
        if length == 0:
            q.first = 0

    def _check_live(self, seq):
        if seq not in self.seqs:
            raise PoolRefused("released" if seq in self.released else "unknown")

    def _new_row(self):
        for s in range(self.max_seqs):
            if s not in self.seqs:
                return s
        raise PoolRefused("max_seqs")

    # --- operations ------------------------------------------------------------------------------------------
    def add(self):
        seq = self._new_row()
        self.seqs[seq] = _PooledSeq(self.layers)
        self.released.discard(seq)
        return seq

    def fork(self, parent):
        self._check_live(parent)
        child = self._new_row()
        q = self.seqs[parent]
        for block in q.table:
            self.refs[block] += 1
        self.seqs[child] = q.copy()
        self.released.discard(child)
        return child

    def release(self, seq):
        self._check_live(seq)
        self._drop_tail(seq, 0)
        del self.seqs[seq]
        self.released.add(seq)

    def evict(self, seq, num_tokens):
        """Evict exactly num_tokens oldest held tokens; returns the number of blocks that went back to the pool."""
        self._check_live(seq)
        if not 0 <= num_tokens <= self.held(seq):
            raise PoolRefused("range")
        free_before = len(self.free)
        self._evict_to(seq, self.seqs[seq].first + num_tokens)
        return len(self.free) - free_before

    def crop(self, max_length, seq=None):
        seqs = self.live() if seq is None else [seq]
        for s in seqs:
            self._check_live(s)
        targets = {}
        for s in seqs:
            q = self.seqs[s]
            target = max_length if max_length >= 0 else q.length + max_length
            if target < q.first:
                raise PoolRefused("range")
            targets[s] = min(target, q.length)
        for s, target in targets.items():
            self._drop_tail(s, target)

    def reset(self, seq=None):
        for s in self.live() if seq is None else [seq]:
            self._check_live(s)
            self._drop_tail(s, 0)

    def prewarm(self, num_blocks=None):
        count = len(self.free) if num_blocks is None else num_blocks
        if not 0 <= count <= len(self.free):
            raise PoolRefused("range")
        warmed = [b for b in self.free[:count] if not self.touched[b]]
        for b in warmed:
            self.touched[b] = True
        return len(warmed)

    def step(self, ids, k, v):
        """Append T tokens to each sequence of ``ids`` (in that order): k, v (layers, len(ids), T, Hkv, D) as given to
        the cache. Returns {"copies": [(source, target)], "first": {seq: e after the step}, "positions": {seq: [L..]}}.
        Raises PoolRefused ("overflow", "exhausted", "unknown", "released") and then changes nothing."""
        k, v = np.asarray(k), np.asarray(v)
        T = k.shape[2]
        new = self.copy()
        for s in ids:
            new._check_live(s)
        B, M = self.block_size, self.max_tokens
        if T > M:
            raise PoolRefused("overflow")
        for s in ids:  # sliding window of max_tokens
            q = new.seqs[s]
            if q.length + T - q.first > M:  # at most M held tokens
                if self.policy is None:
                    raise PoolRefused("overflow")
                new._evict_to(s, q.length + T - M)
        copies = []
        for s in ids:
            q = new.seqs[s]
            if q.length % B and self.refs[q.table[-1]] > 1:  # copy-on-write of a partial last block shared before
                fresh = new._take()
                source = q.table[-1]
                new._free(source)
                q.table[-1] = fresh
                copies.append((source, fresh))
                new.cow_copies += 1
            for _ in range(_ceil_div(q.length, B), _ceil_div(q.length + T, B)):
                q.table.append(new._take())
        positions = {}
        for i, s in enumerate(ids):
            q = new.seqs[s]
            positions[s] = list(range(q.length, q.length + T))
            for layer in range(self.layers):
                for t in range(T):
                    q.rows[layer].append((np.asarray(k[layer, i, t], np.float64),
                                          np.asarray(v[layer, i, t], np.float64)))
            q.length += T
        self._commit(new)
        return {"copies": copies, "first": {s: self.seqs[s].first for s in ids}, "positions": positions}

    def attention(self, layer, seq, q, positions, scale):
        """Float64 attention of a committed step's queries q (T, Hq, D) at ``positions``: the query at p sees the
        sequence's held positions e .. p (e as after the step)."""
        first = self.seqs[seq].first
        out = np.zeros(np.asarray(q).shape, np.float64)
        for t, p in enumerate(positions):
            out[t] = decode_attention_gqa(q[t], self.keys(layer, seq, first, p + 1),
                                          self.values(layer, seq, first, p + 1), scale)
        return out


def assert_pooled_matches_model(cache, model):
    """Everything a pooled cache reports equals ``model`` (a PooledModel): live sequences, lengths, e, block tables,
    ref counts, the free queue, counters, and every held K/V row (exactly: keys()/values() and a raw gather through
    the table). Uses only the cache's public methods and properties."""
    B = cache.block_size
    assert cache.live_sequences() == model.live()
    for s in model.live():
        assert cache.get_seq_length(s) == model.length(s)
        assert cache.first_position(s) == model.first(s)
        assert cache.held_positions(s).tolist() == list(range(model.first(s), model.length(s)))
        table = model.table(s)
        assert cache.block_table(s).tolist() == table
        assert len(table) == _ceil_div(model.length(s), B) - model.first(s) // B
        n = model.held(s)
        for layer in range(cache.shape.layers):
            got_k, got_v = cache.keys(layer, s), cache.values(layer, s)
            assert got_k.dtype == cache.shape.public_dtype
            assert got_k.shape == got_v.shape == (cache.shape.kv_heads, n, cache.shape.head_dim)
            if n:
                assert np.array_equal(got_k.astype(np.float64), model.keys(layer, s)), f"keys seq {s} layer {layer}"
                assert np.array_equal(got_v.astype(np.float64), model.values(layer, s)), f"values seq {s}"
                keys, values = gather_pooled(cache.kv, layer, table, model.first(s), model.length(s), B)
                assert np.array_equal(keys, model.keys(layer, s)) and np.array_equal(values, model.values(layer, s))
    pool = cache.pool
    assert pool.ref_counts.tolist() == model.refs
    assert list(pool.free_queue) == model.free
    st = cache.stats()
    assert st["blocks_used"] == model.blocks_used() and st["blocks_free"] == len(model.free)
    assert (st["allocations"], st["hits"], st["reuses"], st["high_water_blocks"]) == (
        model.allocations, model.hits, model.reuses, model.high_water)
    assert st["cow_copies"] == model.cow_copies and st["evicted_tokens"] == model.evicted_tokens
    assert st["lengths"] == [model.length(s) for s in model.live()]
    assert st["tokens_held"] == sum(model.held(s) for s in model.live())
    assert st["slots_filled"] == model.slots_filled()
    assert st["internal_fragmentation"] == model.blocks_used() * B - model.slots_filled()
    assert_pooled_stats_consistent(cache)


def assert_pooled_stats_consistent(cache):
    """stats() fields against each other and against the storage actually allocated (computed here)."""
    st = cache.stats()
    s = cache.shape
    block_bytes = cache.block_size * 2 * s.layers * s.kv_heads * s.head_dim * np.dtype(s.public_dtype).itemsize
    assert st["blocks_used"] + st["blocks_free"] == st["num_blocks"] == cache.num_blocks
    assert st["bytes_per_block"] == block_bytes
    assert st["bytes_used"] == st["blocks_used"] * block_bytes
    assert st["nbytes"] == cache.nbytes == cache.kv.nbytes == cache.num_blocks * block_bytes
    assert st["allocated_slots"] == st["blocks_used"] * cache.block_size
    assert st["internal_fragmentation"] == st["allocated_slots"] - st["slots_filled"] >= 0
    assert st["live_sequences"] == len(cache.live_sequences())
    assert st["high_water_blocks"] >= st["blocks_used"]
    assert st["hits"] <= st["allocations"] and st["reuses"] <= st["allocations"]


def assert_pool_invariants(cache):
    """The pool's invariants, from the cache's public block tables alone (no model): every block is either in the
    free queue exactly once with ref count 0, or has ref count >= 1; each ref count equals the number of table
    entries listing the block (so the counts are conserved); a block listed by two sequences has ref >= 2; no
    sequence lists a block twice."""
    pool = cache.pool
    refs = np.asarray(pool.ref_counts)
    queue = list(pool.free_queue)
    listed = np.zeros(cache.num_blocks, np.int64)
    owners = [set() for _ in range(cache.num_blocks)]
    for s in cache.live_sequences():
        table = cache.block_table(s).tolist()
        assert len(set(table)) == len(table), f"sequence {s} lists a block twice: {table}"
        for b in table:
            assert 0 <= b < cache.num_blocks
            listed[b] += 1
            owners[b].add(s)
    assert len(queue) == len(set(queue)), f"a block is queued twice: {queue}"
    for b in range(cache.num_blocks):
        if b in queue:
            assert refs[b] == 0 and listed[b] == 0, f"free block {b} has ref {refs[b]}, listed {listed[b]} times"
        else:
            assert refs[b] >= 1, f"block {b} is neither free nor referenced"
        assert refs[b] == listed[b], f"block {b}: ref {refs[b]} but listed by {listed[b]} tables"
        if len(owners[b]) >= 2:
            assert refs[b] >= 2
    assert int(refs.sum()) == int(listed.sum())
    assert pool.num_free == len(queue) and pool.num_used == cache.num_blocks - len(queue)
