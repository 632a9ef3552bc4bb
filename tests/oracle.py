"""Obviously-correct float64 NumPy references for the kvref tests.

Nothing here imports kvref or copies its spec: attention is "gather the visible K/V, softmax, matmul" in float64,
and the flat-cache model is a Python list of rows per (layer, sequence). Every backend of every variant is checked
against these functions.

Conventions (the shapes are those of the math, not of kvref's storage):

    q        (D,) one query head, or (Hq, D) all query heads of one token
    k, v     (n, D) one KV head's visible rows, or (Hkv, n, D)
    scale    the softmax scale, usually 1 / sqrt(D)
"""

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
