"""Obviously-correct float64 NumPy references for the kvref tests.

Nothing here imports kvref or copies its spec: attention is "gather the visible K/V, softmax, matmul" in float64,
and the flat-cache model is a Python list of rows per (layer, sequence). Every backend of every variant is checked
against these functions.

Conventions (the shapes are those of the math, not of kvref's storage):

    q        (D,) one query head, or (Hq, D) all query heads of one token
    k, v     (n, D) one KV head's visible rows, or (Hkv, n, D)
    scale    the softmax scale, usually 1 / sqrt(D)
"""

import math

import numpy as np


def softmax(scores):
    """Softmax of a 1-D float64 array (max subtracted first, so large scores do not overflow)."""
    scores = np.asarray(scores, dtype=np.float64)
    e = np.exp(scores - scores.max())
    return e / e.sum()


def attention(q, k, v, scale):
    """Attention of one query head over n visible rows: softmax(scale * k @ q) @ v, all float64.

    q: (D,), k: (n, D), v: (n, D). With n == 0 there is nothing to attend to and the output is zeros.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if k.shape[0] == 0:
        return np.zeros(q.shape[-1], dtype=np.float64)
    weights = softmax(float(scale) * (k @ q))
    return weights @ v


def kv_head_of(q_head, q_heads, kv_heads):
    """GQA: query head qh reads KV head qh // (q_heads // kv_heads)."""
    return q_head // (q_heads // kv_heads)


def decode_attention_gqa(q, k, v, scale):
    """One token's attention for every query head: q (Hq, D), k and v (Hkv, n, D) -> (Hq, D) float64."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    q_heads, kv_heads = q.shape[0], k.shape[0]
    assert q_heads % kv_heads == 0
    out = np.zeros(q.shape, dtype=np.float64)
    for qh in range(q_heads):
        h = kv_head_of(qh, q_heads, kv_heads)
        out[qh] = attention(q[qh], k[h], v[h], scale)
    return out


def causal_chunk_attention(q, k, v, positions, scale):
    """A chunk of T tokens: token t sits at absolute position positions[t] and sees keys 0 .. positions[t].

    q: (T, Hq, D); k, v: (Hkv, n, D) with n > max(positions) (the chunk's own keys included) -> (T, Hq, D).
    """
    q = np.asarray(q, dtype=np.float64)
    out = np.zeros(q.shape, dtype=np.float64)
    for t, p in enumerate(positions):
        p = int(p)
        out[t] = decode_attention_gqa(q[t], k[:, : p + 1], v[:, : p + 1], scale)
    return out


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
# Sliding window (ring cache): the rule written out again here, independently of kvref.attention.visible
# ---------------------------------------------------------------------------------------------------------------
def window_keys(i, window, sinks=0):
    """Key positions query position i may see: 0..i, cut to the first ``sinks`` and the last ``window - sinks``
    positions (window <= 0: all of 0..i). A list of ints in increasing order."""
    everything = list(range(i + 1))
    if window <= 0 or len(everything) <= window:
        return everything
    return everything[:sinks] + everything[len(everything) - (window - sinks):]


def window_chunk_attention(q, k, v, positions, window, scale, sinks=0):
    """A chunk of T tokens over the full, unwrapped K/V: token t at positions[t] sees ``window_keys(positions[t])``.

    q: (T, Hq, D); k, v: (Hkv, n, D) holding positions 0 .. n-1 (n > max(positions)) -> (T, Hq, D) float64.
    """
    q = np.asarray(q, dtype=np.float64)
    out = np.zeros(q.shape, dtype=np.float64)
    for t, p in enumerate(positions):
        keys = window_keys(int(p), window, sinks)
        out[t] = decode_attention_gqa(q[t], np.asarray(k)[:, keys], np.asarray(v)[:, keys], scale)
    return out


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
