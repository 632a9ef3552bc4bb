"""Your own attention, checked against kvref's golden suite: a dense (decode or chunked-prefill) attention in plain
NumPy, written from the calling convention in docs/golden-format.md and nothing else. Run::

    python3 -m kvref.golden check golden/v1 --impl examples/python/numpy_attention.py:NumpyAttention

It passes the attention cases; every other case is skipped (it has no cache, paged or quantization methods).
"""

import numpy as np


class NumpyAttention:
    name = "NumPy example (examples/python/numpy_attention.py)"

    def attention(self, q, k, v, q_positions, k_positions, scale, window, sinks):
        """q (T, q_heads, D) float32; k, v (n, kv_heads, D); positions int64 -> out (T, q_heads, D)."""
        q_pos, k_pos = q_positions[:, None], k_positions[None, :]
        seen = k_pos <= q_pos  # causal; then the window of W keys, of which the first S positions are sinks
        if window:
            seen &= (k_pos < sinks) | (k_pos > q_pos - (window - sinks))
        group = q.shape[1] // k.shape[1]  # GQA: query head h reads KV head h // group
        k = np.repeat(k.astype(np.float32), group, axis=1)
        v = np.repeat(v.astype(np.float32), group, axis=1)
        scores = np.where(seen, np.einsum("thd,nhd->htn", q, k) * scale, -np.inf)  # (q_heads, T, n)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        return np.einsum("htn,nhd->thd", weights, v)
