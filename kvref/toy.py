"""A tiny random-weight decoder-only transformer, to generate text with and without a KV cache.

The model is a Llama-style decoder written in NumPy float32, small enough to read in one sitting (like nanoGPT)::

    x = embed[tokens]                                           (T, d_model)
    for each layer:
        h = rms_norm(x) ;  q = rope(h @ Wq) ;  k = rope(h @ Wk) ;  v = h @ Wv
        x = x + attention(q, k, v) @ Wo                          causal (optionally windowed), GQA
        h = rms_norm(x) ;  x = x + (silu(h @ W_gate) * (h @ W_up)) @ W_down
    logits = rms_norm(x) @ W_head                               (T, vocab)

It has two forward paths that share every line except where attention gets its keys and values:

* :meth:`ToyModel.forward_full` recomputes the whole sequence with a mask (:func:`attention_mask`), in plain NumPy
  float64. It does not touch kvref's caches: it is the no-cache path, and an independent check of the cached one.
* :meth:`ToyModel.forward_cached` runs only the *new* tokens through the layers. Each layer writes their K/V into a
  :class:`kvref.FlatCache` (or a :class:`kvref.RingCache`) and attends over what the cache holds (plan / write /
  attend / advance, see ``kvref/flat.py``). The same call does prefill (T > 1, in one chunk or several) and decode
  (T = 1).

**Sliding-window attention** (``ToyConfig.sliding_window = W``, optionally ``attention_sinks = S``): a query at
position i sees key j iff :func:`kvref.attention.visible` ``(i, j, W, S)``, the one window rule of every cache. The
no-cache path builds its mask from that function; the cached path uses a :class:`kvref.RingCache` of W slots, which
wraps as often as the sequence needs. Keys are rotated (RoPE) once, at their *absolute* positions, before they are
stored, and queries use their absolute positions too (the ring's sink convention, ``kvref/ring.py``): a sink at
position 0 seen from position 1000 is 1000 positions away in both paths, so the recompute with the same mask gives
the same tokens and logits as the ring, however many times it has wrapped.

:func:`generate` decodes greedily through either path and counts the work exactly, so that seed 002's claim can be
checked: generating 100 tokens after a 50-token prompt costs 9,950 token-computations without a cache and 150 with
one, about 66x, not the 33x of the seed (which counted 1 + 2 + ... + 100 = 5,050 and left out the prompt). The
convention is stated in :func:`token_computations`; :func:`attention_dot_products` counts the attention side
(both, with :class:`Work`, live in ``kvref/toy_counts.py`` and are importable from here).

Weights are random (``np.random.default_rng(seed)``), so the text is gibberish; what matters is that both paths
produce the same tokens and the same logits, and how much work each does.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np

from .attention import visible
from .errors import CacheOverflowError, DTypeError, IndexOutOfRangeError, ShapeError
from .flat import FlatCache
from .ring import RingCache
from .shapes import CacheShape, check_positive_int
from .toy_counts import Work, attention_dot_products, check_window, keys_read, token_computations


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToyConfig:
    """Hyper-parameters of the toy model (the names follow a Hugging Face config.json where one exists).

    vocab:      vocabulary size (token ids are 0 .. vocab-1)
    d_model:    width of the residual stream (``hidden_size``)
    layers:     decoder layers (``num_hidden_layers``)
    q_heads:    query heads (``num_attention_heads``)
    kv_heads:   key/value heads (``num_key_value_heads``); must divide q_heads. kv_heads < q_heads is GQA: query
                head ``qh`` uses KV head ``qh // (q_heads // kv_heads)``
    head_dim:   elements per head; must be even (RoPE rotates pairs). q_heads * head_dim need not equal d_model
    d_ff:       hidden width of the SiLU-gated MLP (``intermediate_size``)
    max_tokens: longest sequence the model accepts (``max_position_embeddings``); also the cache size
                :func:`generate` allocates
    seed:       seed of ``np.random.default_rng`` that draws every weight
    rope_theta: RoPE base (``rope_theta``)
    norm_eps:   epsilon of RMSNorm (``rms_norm_eps``)
    sliding_window:  W, keys a query sees, itself included (``sliding_window``): key j is visible from query i iff
                     ``i - W < j <= i`` (:func:`kvref.attention.visible`). 0 (the default) is full causal attention.
                     With W > 0 the cache is a :class:`kvref.RingCache` of W slots (:meth:`ToyModel.new_cache`)
    attention_sinks: S, 0 <= S < W: the first S positions stay visible to every query (StreamingLLM sinks); the
                     rest of the window is the last W - S positions. Must be 0 when sliding_window is 0
    """

    vocab: int = 64
    d_model: int = 32
    layers: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    d_ff: int = 64
    max_tokens: int = 256
    seed: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    sliding_window: int = 0
    attention_sinks: int = 0

    def __post_init__(self):
        for name in ("vocab", "d_model", "layers", "q_heads", "kv_heads", "head_dim", "d_ff", "max_tokens"):
            check_positive_int(name, getattr(self, name))
        if self.q_heads % self.kv_heads:
            raise ShapeError("kv_heads", f"a divisor of q_heads={self.q_heads}", self.kv_heads)
        if self.head_dim % 2:
            raise ShapeError("head_dim", "an even number (RoPE rotates pairs of elements)", self.head_dim)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ShapeError("seed", "an integer >= 0", repr(self.seed))
        if not self.rope_theta > 1.0:
            raise ShapeError("rope_theta", "a number > 1", repr(self.rope_theta))
        if not self.norm_eps > 0.0:
            raise ShapeError("norm_eps", "a number > 0", repr(self.norm_eps))
        check_window(self.sliding_window, self.attention_sinks, "sliding_window", "attention_sinks")

    @property
    def group_size(self):
        """G = q_heads // kv_heads: query heads that share one KV head."""
        return self.q_heads // self.kv_heads

    def cache_shape(self, dtype="float32"):
        """The :class:`kvref.CacheShape` of this model's KV cache: (layers, q_heads, kv_heads, head_dim, dtype)."""
        return CacheShape(self.layers, self.q_heads, self.kv_heads, self.head_dim, dtype)


# ---------------------------------------------------------------------------------------------------------------
# The building blocks, as free functions over NumPy arrays
# ---------------------------------------------------------------------------------------------------------------
def rms_norm(x, gain, eps):
    """RMSNorm over the last axis: ``x / sqrt(mean(x**2) + eps) * gain`` (float32 in, float32 out)."""
    rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))
    return (x / rms * gain).astype(np.float32)


def silu(x):
    """SiLU (swish): ``x * sigmoid(x) = x / (1 + exp(-x))``."""
    return (x / (np.float32(1.0) + np.exp(-x))).astype(np.float32)


def rope_angles(positions, head_dim, theta):
    """cos and sin of the RoPE angles, each (T, head_dim // 2) float64.

    angle[t, i] = positions[t] * theta ** (-2 i / head_dim),    i = 0 .. head_dim/2 - 1
    """
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles), np.sin(angles)


def apply_rope(x, positions, theta):
    """Rotary position embedding, "rotate-half" form (Llama / Hugging Face ``rotate_half``).

    x: (T, heads, D) float32; positions: (T,) absolute positions of the T tokens. With ``h = D / 2``, the pairs
    (x[i], x[i + h]) are rotated by angle[t, i] (see :func:`rope_angles`):

        out[i]     = x[i] * cos - x[i + h] * sin
        out[i + h] = x[i + h] * cos + x[i] * sin

    so q(p) . k(p') depends only on p - p'. Computed in float64, returned as float32. The rotation depends on the
    absolute position only, so a token rotated once and cached never needs rotating again.
    """
    half = x.shape[-1] // 2
    cos, sin = rope_angles(positions, x.shape[-1], theta)
    cos = cos[:, None, :]  # broadcast over heads
    sin = sin[:, None, :]
    x1 = x[..., :half].astype(np.float64)
    x2 = x[..., half:].astype(np.float64)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(np.float32)


def causal_attention(q, k, v, scale=None, mask=None):
    """Masked attention in float64, the no-cache path (masks the scores; uses no cache).

    q: (T, q_heads, D); k, v: (T, kv_heads, D). Query head qh uses KV head qh // G (GQA, G = q_heads // kv_heads).
    mask: (T, T) bool, True where key j is visible from query i; default :func:`causal_mask` (j <= i). A windowed
    model passes ``attention_mask(T, window, sinks)``. Every row needs at least one visible key.
    out[i, qh] = sum_{j: mask[i, j]} softmax_j(scale * q[i, qh] . k[j, qh//G]) v[j, qh//G],
    scale = 1 / sqrt(D) by default. Returns (T, q_heads, D) float32.
    """
    T, q_heads, D = q.shape
    if mask is None:
        mask = causal_mask(T)
    elif not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != (T, T):
        raise ShapeError("mask", f"a ({T}, {T}) bool array", getattr(mask, "shape", type(mask).__name__))
    elif not mask.any(axis=1).all():
        raise ShapeError("mask", "at least one visible key per query row", "a row with none")
    group = q_heads // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    k_rep = np.repeat(k.astype(np.float64), group, axis=1)  # (T, q_heads, D): KV head h serves q heads h*G .. h*G+G-1
    v_rep = np.repeat(v.astype(np.float64), group, axis=1)
    scores = np.einsum("ihd,jhd->hij", q.astype(np.float64), k_rep) * scale  # (q_heads, T, T)
    scores = np.where(mask[None], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hij,jhd->ihd", p, v_rep).astype(np.float32)


@functools.lru_cache(maxsize=256)
def attention_mask(T, window=0, sinks=0):
    """(T, T) bool, read-only: ``mask[i, j] = kvref.attention.visible(i, j, window, sinks)``, the one window rule.

    window = 0: causal (j <= i). window = W > 0: ``i - W < j <= i``; with S = ``sinks`` > 0, ``j <= i`` and
    (``j < S`` or ``i - (W - S) < j``): the S sinks plus the last W - S positions. Either way row i has
    min(i + 1, W) True entries. Built by calling :func:`kvref.attention.visible` for every (i, j), so the no-cache
    path and every cache share one definition. Cached (functools.lru_cache): the array is shared, hence read-only.
    """
    check_positive_int("T", T)
    check_window(window, sinks)
    T, window, sinks = int(T), int(window), int(sinks)
    mask = np.array([[visible(i, j, window, sinks) for j in range(T)] for i in range(T)], dtype=bool)
    mask.setflags(write=False)
    return mask


def causal_mask(T):
    """(T, T) bool, read-only: True where key j is visible from query i, i.e. j <= i (``attention_mask(T)``). It has
    T (T + 1) / 2 True entries."""
    return attention_mask(T)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------
class ToyModel:
    """A random-weight decoder-only transformer (see the module docstring for the forward pass).

    Weights, drawn in this order from ``np.random.default_rng(config.seed)``, all float32, ``x @ W`` convention:

        embed                   (vocab, d_model)              N(0, 1)
        per layer l:
          attn_norm             (d_model,)                    ones (RMSNorm gain)
          wq                    (d_model, q_heads*head_dim)   N(0, 1/d_model)
          wk, wv                (d_model, kv_heads*head_dim)  N(0, 1/d_model)
          wo                    (q_heads*head_dim, d_model)   N(0, 1/(q_heads*head_dim * 2*layers))
          mlp_norm              (d_model,)                    ones
          w_gate, w_up          (d_model, d_ff)               N(0, 1/d_model)
          w_down                (d_ff, d_model)               N(0, 1/(d_ff * 2*layers))
        final_norm              (d_model,)                    ones
        head                    (d_model, vocab)              N(0, 1/d_model)   (not tied to embed)

    The variances keep every projection's output near unit scale (RMSNorm feeds each block unit-RMS rows), and the
    residual branches are scaled by 1/(2*layers) in variance so the residual stream stays O(1); logits come out with
    a standard deviation near 1.
    """

    def __init__(self, config=None):
        self.config = ToyConfig() if config is None else config
        if not isinstance(self.config, ToyConfig):
            raise ShapeError("config", "a kvref.toy.ToyConfig", type(self.config).__name__)
        c = self.config
        rng = np.random.default_rng(c.seed)

        def normal(shape, variance):
            return (rng.standard_normal(shape) * math.sqrt(variance)).astype(np.float32)

        branch = 2 * c.layers
        self.embed = normal((c.vocab, c.d_model), 1.0)
        self.blocks = []
        for _ in range(c.layers):
            self.blocks.append({
                "attn_norm": np.ones(c.d_model, np.float32),
                "wq": normal((c.d_model, c.q_heads * c.head_dim), 1.0 / c.d_model),
                "wk": normal((c.d_model, c.kv_heads * c.head_dim), 1.0 / c.d_model),
                "wv": normal((c.d_model, c.kv_heads * c.head_dim), 1.0 / c.d_model),
                "wo": normal((c.q_heads * c.head_dim, c.d_model), 1.0 / (c.q_heads * c.head_dim * branch)),
                "mlp_norm": np.ones(c.d_model, np.float32),
                "w_gate": normal((c.d_model, c.d_ff), 1.0 / c.d_model),
                "w_up": normal((c.d_model, c.d_ff), 1.0 / c.d_model),
                "w_down": normal((c.d_ff, c.d_model), 1.0 / (c.d_ff * branch)),
            })
        self.final_norm = np.ones(c.d_model, np.float32)
        self.head = normal((c.d_model, c.vocab), 1.0 / c.d_model)

    def parameters(self):
        """Every weight by name ("embed", "layers.0.wq", ..., "final_norm", "head"), in drawing order."""
        params = {"embed": self.embed}
        for layer, block in enumerate(self.blocks):
            for name, w in block.items():
                params[f"layers.{layer}.{name}"] = w
        params["final_norm"] = self.final_norm
        params["head"] = self.head
        return params

    @property
    def num_parameters(self):
        """Number of scalar weights."""
        return int(sum(w.size for w in self.parameters().values()))

    # --- the pieces both paths share ------------------------------------------------------------------------
    def _check_tokens(self, tokens):
        a = np.asarray(tokens)
        if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
            raise ShapeError("tokens", "a non-empty 1-D sequence of integer token ids", repr(tokens))
        if a.min() < 0 or a.max() >= self.config.vocab:
            raise IndexOutOfRangeError("tokens", f"ids in [0, {self.config.vocab})",
                                       f"ids in [{a.min()}, {a.max()}]")
        return a.astype(np.int64)

    def qkv(self, layer, x, positions):
        """Attention inputs of one layer for the rows of x (T, d_model) at absolute ``positions`` (T,).

        Returns q (T, q_heads, D), k (T, kv_heads, D), v (T, kv_heads, D), float32, RoPE applied to q and k.
        """
        c, w = self.config, self.blocks[layer]
        h = rms_norm(x, w["attn_norm"], c.norm_eps)
        T = x.shape[0]
        q = (h @ w["wq"]).reshape(T, c.q_heads, c.head_dim)
        k = (h @ w["wk"]).reshape(T, c.kv_heads, c.head_dim)
        v = (h @ w["wv"]).reshape(T, c.kv_heads, c.head_dim)
        return apply_rope(q, positions, c.rope_theta), apply_rope(k, positions, c.rope_theta), v.astype(np.float32)

    def finish_layer(self, layer, x, attn):
        """The rest of a layer: ``x += attn @ Wo``, then ``x += MLP(rms_norm(x))``. attn: (T, q_heads, D)."""
        c, w = self.config, self.blocks[layer]
        x = x + attn.reshape(x.shape[0], c.q_heads * c.head_dim) @ w["wo"]
        h = rms_norm(x, w["mlp_norm"], c.norm_eps)
        return (x + (silu(h @ w["w_gate"]) * (h @ w["w_up"])) @ w["w_down"]).astype(np.float32)

    def lm_head(self, x):
        """Logits (T, vocab) float32 of the final residual stream x (T, d_model): ``rms_norm(x) @ W_head``."""
        return (rms_norm(x, self.final_norm, self.config.norm_eps) @ self.head).astype(np.float32)

    # --- the two forward paths ------------------------------------------------------------------------------
    def forward_full(self, tokens, work=None):
        """Logits (T, vocab) for every position of ``tokens`` (T,), recomputing everything; no cache is involved.

        Token t sits at position t. Attention is :func:`causal_attention` (float64 NumPy) with the mask
        ``attention_mask(T, config.sliding_window, config.attention_sinks)`` (plain causal when sliding_window = 0).
        If ``work`` (a :class:`Work`) is given, records T token-computations and ``layers * q_heads * mask.sum()``
        dot products (the visible pairs of the mask actually used: T (T + 1) / 2 without a window).
        """
        tokens = self._check_tokens(tokens)
        c = self.config
        T = tokens.size
        if T > c.max_tokens:
            raise ShapeError("tokens", f"at most max_tokens={c.max_tokens} tokens", T)
        positions = np.arange(T, dtype=np.int64)
        mask = attention_mask(T, c.sliding_window, c.attention_sinks)
        x = self.embed[tokens]
        dots = 0
        for layer in range(c.layers):
            q, k, v = self.qkv(layer, x, positions)
            x = self.finish_layer(layer, x, causal_attention(q, k, v, mask=mask))
            dots += int(mask.sum()) * c.q_heads
        if work is not None:
            work.record(T, dots)
        return self.lm_head(x)

    def forward_cached(self, tokens, cache, seq=0, work=None):
        """Logits (T, vocab) for the T new ``tokens`` of sequence ``seq``, reusing the K/V already in ``cache``.

        The tokens continue the sequence: they sit at positions ``cache.get_seq_length(seq) + t``. Per call::

            step = cache.plan(T, [seq])                      # positions, slots; overflow raises, nothing changes
            for each layer:
                q, k, v = qkv(layer, x, step.positions[0])   # new tokens only; RoPE at their absolute positions
                cache.write(step, layer, k[None], v[None])   # (1, T, kv_heads, D) in the cache's dtype
                o = cache.attend(step, layer, q[None])       # (1, T, q_heads, D) float32: causal over the cache
                x = finish_layer(layer, x, o[0])
            cache.advance(step)                              # length[seq] += T

        T > 1 is (a chunk of) prefill, T = 1 a decode step. An fp16 cache stores K/V rounded to fp16
        (``k.astype(np.float16)``); attention still accumulates in float32. If ``work`` is given, records T
        token-computations and ``layers * q_heads * sum_t keys_t`` dot products, keys_t = the keys query t reads:
        position_t + 1, or min(position_t + 1, W) with a ring of W slots (sinks included).

        The cache: with ``config.sliding_window = W > 0`` it must be a :class:`kvref.RingCache` with ``window = W``
        and ``sinks = config.attention_sinks`` (any chunk size works; the ring defers a chunk that would overwrite
        keys its own queries need). With ``sliding_window = 0`` it is a :class:`kvref.FlatCache`, or a RingCache of
        any window, which makes the attention windowed: that equals the full model only while the sequence fits in
        the ring's window. Positions must stay below ``config.max_tokens`` (a ring never overflows, so this is its
        only limit). A call that raises changes nothing.
        """
        tokens = self._check_tokens(tokens)
        c = self.config
        window = self._check_cache(cache)
        T = tokens.size
        step = cache.plan(T, [seq])  # a flat cache's overflow raises here; nothing has changed
        positions = step.positions[0]
        if positions[-1] >= c.max_tokens:
            raise IndexOutOfRangeError("tokens", f"positions below max_tokens={c.max_tokens}",
                                       f"positions {positions[0]}..{positions[-1]}", detail="nothing was written")
        dtype = cache.shape.public_dtype
        x = self.embed[tokens]
        for layer in range(c.layers):
            q, k, v = self.qkv(layer, x, positions)
            cache.write(step, layer, k[None].astype(dtype), v[None].astype(dtype))
            o = cache.attend(step, layer, np.ascontiguousarray(q[None]))
            x = self.finish_layer(layer, x, o[0])
        cache.advance(step)
        if work is not None:
            work.record(T, c.layers * c.q_heads * int(keys_read(positions, window).sum()))
        return self.lm_head(x)

    def _check_cache(self, cache):
        """ShapeError unless ``cache`` fits this model (see :meth:`forward_cached`); returns its window (0: flat)."""
        c = self.config
        if c.sliding_window > 0:
            expected = (f"a kvref.RingCache with window={c.sliding_window}, sinks={c.attention_sinks} "
                        "(config.sliding_window, config.attention_sinks)")
            if not isinstance(cache, RingCache):
                raise ShapeError("cache", expected, type(cache).__name__)
            if (cache.window, cache.sinks) != (c.sliding_window, c.attention_sinks):
                raise ShapeError("cache", expected, f"a RingCache with window={cache.window}, sinks={cache.sinks}")
        elif not isinstance(cache, (FlatCache, RingCache)):
            raise ShapeError("cache", "a kvref.FlatCache (or a kvref.RingCache)", type(cache).__name__)
        s = cache.shape
        if (s.layers, s.q_heads, s.kv_heads, s.head_dim) != (c.layers, c.q_heads, c.kv_heads, c.head_dim):
            raise ShapeError("cache", f"a cache of shape {c.cache_shape(s.dtype)}", s)
        return cache.window if isinstance(cache, RingCache) else 0

    def new_cache(self, backend="cpu", dtype="float32", batch=1, max_tokens=None):
        """An empty cache for this model: a :class:`kvref.FlatCache` of ``max_tokens`` slots per sequence (default
        ``config.max_tokens``), or, when ``config.sliding_window = W > 0``, a :class:`kvref.RingCache` with
        ``window = W`` and ``sinks = config.attention_sinks`` (W slots; ``max_tokens`` must then be None)."""
        c = self.config
        if c.sliding_window > 0:
            if max_tokens is not None:
                raise ShapeError("max_tokens", f"None for a windowed model (its ring has W={c.sliding_window} slots)",
                                 repr(max_tokens))
            return RingCache(c.cache_shape(dtype), batch=batch, window=c.sliding_window, sinks=c.attention_sinks,
                             backend=backend)
        max_tokens = c.max_tokens if max_tokens is None else max_tokens
        return FlatCache(c.cache_shape(dtype), batch=batch, max_tokens=max_tokens, backend=backend)

    # --- generation -----------------------------------------------------------------------------------------
    def generate(self, prompt, new_tokens, use_cache=True, backend="cpu", dtype="float32", prefill_chunk=None,
                 commit_last=True, cache=None, seq=0):
        """Greedy decoding of ``new_tokens`` tokens after ``prompt``; returns a :class:`GenerationResult`.

        use_cache=False: new token n = argmax of the last row of ``forward_full(prompt + new tokens 1..n-1)``.
        use_cache=True:  prefill the prompt with ``forward_cached`` (in chunks of ``prefill_chunk`` tokens if given;
                         new token 1 = argmax of the last row), then decode step n feeds new token n alone and
                         new token n + 1 = argmax of its logits. With ``commit_last`` the step for the last token
                         runs too (the cache ends with all P + N tokens; its logits are ``final_logits``).
                         ``cache`` (a FlatCache or RingCache whose sequence ``seq`` is empty, accepted by
                         :meth:`forward_cached`) is used if given, otherwise :meth:`new_cache` makes one with
                         ``backend`` and ``dtype`` ("float32" or "float16"): a FlatCache of ``config.max_tokens``
                         slots, or a RingCache of ``config.sliding_window`` slots for a windowed model.
        backend and dtype do not affect the no-cache path. The counts follow :func:`token_computations` and
        :func:`attention_dot_products` exactly (with ``window`` = the ring's window, if any).

        Length: the sequence never goes past ``config.max_tokens`` positions (P + N - 1 tokens are fed without a
        cache, P + N - 1 + commit_last with one); a flat cache must also hold them. A ring cache never overflows.
        Both are checked before anything runs (ShapeError / CacheOverflowError; a given cache is left unchanged).
        """
        prompt = self._check_tokens(prompt)
        check_positive_int("new_tokens", new_tokens)
        if prefill_chunk is not None:
            check_positive_int("prefill_chunk", prefill_chunk)
        fed = prompt.size + new_tokens - 1 + (int(bool(commit_last)) if use_cache else 0)
        if not use_cache:
            cache = None
        else:
            if cache is None:
                cache = self.new_cache(backend=backend, dtype=dtype)
            self._check_cache(cache)
            if cache.get_seq_length(seq) != 0:
                raise ShapeError("cache", f"an empty sequence {seq}", f"{cache.get_seq_length(seq)} tokens stored")
            if isinstance(cache, FlatCache) and fed > cache.max_tokens:
                raise CacheOverflowError("new_tokens", f"P + N - 1 + commit_last <= max_tokens={cache.max_tokens} "
                                         "of the cache", f"{fed} tokens to store", detail="nothing was run")
        if fed > self.config.max_tokens:
            raise ShapeError("new_tokens", f"a generation feeding at most max_tokens={self.config.max_tokens} tokens",
                             f"{new_tokens} (P + N - 1{' + commit_last' if use_cache else ''} = {fed} tokens)")
        work = Work()
        generated, logits_rows = [], []
        final_logits = None
        if not use_cache:
            for _ in range(new_tokens):
                logits = self.forward_full(np.concatenate([prompt, np.asarray(generated, np.int64)]), work)
                logits_rows.append(logits[-1])
                generated.append(int(np.argmax(logits[-1])))
        else:
            chunk = prompt.size if prefill_chunk is None else prefill_chunk
            for start in range(0, prompt.size, chunk):
                logits = self.forward_cached(prompt[start:start + chunk], cache, seq, work)
            while True:
                logits_rows.append(logits[-1])
                generated.append(int(np.argmax(logits[-1])))
                if len(generated) == new_tokens and not commit_last:
                    break
                logits = self.forward_cached(generated[-1:], cache, seq, work)
                if len(generated) == new_tokens:
                    final_logits = logits[-1]
                    break
        return GenerationResult(
            prompt=prompt, tokens=np.asarray(generated, np.int64), logits=np.stack(logits_rows),
            use_cache=bool(use_cache), step_tokens=work.step_tokens, step_dot_products=work.step_dot_products,
            final_logits=final_logits, cache=cache)


@dataclass(kw_only=True)
class GenerationResult(Work):
    """What :meth:`ToyModel.generate` returns: the tokens, and the :class:`Work` its forward calls recorded.

    prompt:             (P,) int64 the prompt
    tokens:             (N,) int64 the new tokens
    logits:             (N, vocab) float32; tokens[n] = argmax(logits[n])
    use_cache:          which path produced them
    step_tokens:        token-computations of each forward call (prefill chunks, then decode steps; or the N full
                        passes without a cache); their sum equals :func:`token_computations`
    step_dot_products:  query-key dot products of each forward call (all layers and query heads); their sum equals
                        :func:`attention_dot_products`
    final_logits:       (vocab,) logits after the last new token (the commit step), or None
    cache:              the FlatCache or RingCache used (P + N tokens seen after a commit; a ring holds its S
                        sinks and the last W - S of them), or None
    """

    prompt: np.ndarray
    tokens: np.ndarray
    logits: np.ndarray
    use_cache: bool
    final_logits: np.ndarray = None
    cache: FlatCache | RingCache = None

    @property
    def sequence(self):
        """Prompt followed by the new tokens, (P + N,) int64."""
        return np.concatenate([self.prompt, self.tokens])


def generate(model, prompt, new_tokens, use_cache=True, backend="cpu", dtype="float32", **options):
    """Module-level shorthand for ``model.generate(prompt, new_tokens, use_cache, backend, dtype, **options)``."""
    if not isinstance(model, ToyModel):
        raise DTypeError("model", "a kvref.toy.ToyModel", type(model).__name__)
    return model.generate(prompt, new_tokens, use_cache=use_cache, backend=backend, dtype=dtype, **options)


__all__ = [
    "GenerationResult", "ToyConfig", "ToyModel", "Work", "apply_rope", "attention_dot_products", "attention_mask",
    "causal_attention", "causal_mask", "generate", "rms_norm", "rope_angles", "silu", "token_computations",
]
