"""The one independent float64 reference of kvref, and the check of every backend against it.

**The reference** is attention as a textbook states it, in float64 NumPy: gather the visible K/V, softmax, matmul.
It is written here on its own and calls none of kvref's spec functions (no ``kvref.attention``, nor the spec of a
variant), so a mistake in the spec cannot hide in it. Its rules, restated:

* GQA: query head qh reads KV head ``qh // (q_heads // kv_heads)`` (:func:`kv_head_of`);
* causal: a query at position i sees keys 0 .. i;
* sliding window of W keys with S sinks: key j is seen iff ``j <= i`` and (``j < S`` or ``j > i - (W - S)``), i.e.
  ``i - W < j <= i`` when S = 0 (:func:`window_keys`);
* softmax with its maximum subtracted first (:func:`softmax`), no scale other than the one given.

:func:`softmax`, :func:`attention`, :func:`decode_attention_gqa` and :func:`reference_attention` are the whole
reference; the test suite's ``tests/oracle.py`` uses these same functions rather than a second copy.
:func:`nmse` is llama.cpp's error metric against a reference.

**The backend check** (:func:`check_backends`) runs a small scripted workload through a real cache of each variant
(flat, ring, two-tier, pooled) on each backend ("python", "cpu", "cuda" where it runs) and compares every layer's
attention of every step with the reference computed from the K/V fed to the cache, kept here (:class:`Fed`), never
read back from it: every row fed to a flat cache or a ring (unwrapped), for the two-tier cache the store's values
after a quantize / dequantize round trip (:func:`round_trip`, via :mod:`kvref.quant`, whose bytes the tests check
against ggml's), and each pooled sequence's rows across forks, copy-on-write, reused blocks and eviction. The caches
come from the top-level ``kvref`` package; :func:`checked_step` runs one step of such a script.
``python -m kvref.plots`` and ``python -m kvref.bench`` run the check before they time anything.
"""

import time
from dataclasses import dataclass, field

import numpy as np

from . import CacheShape, FlatCache, PooledCache, RingCache, TwoTierCache, quant
from .backends import backends

#: largest accepted max |error| of a backend's attention against the float64 reference. The python backend is the
#: float32 spec; cpu and cuda may use a polynomial exp and re-associated sums (kvref/cpu/fast_math.py).
TOLERANCES = {"python": 1e-5, "cpu": 1e-4, "cuda": 1e-4}


# ---------------------------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------------------------
def softmax(scores):
    """Softmax along the last axis in float64, its maximum subtracted first (large scores do not overflow)."""
    scores = np.asarray(scores, np.float64)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def kv_head_of(q_head, q_heads, kv_heads):
    """GQA: query head qh reads KV head ``qh // (q_heads // kv_heads)``."""
    return q_head // (q_heads // kv_heads)


def decode_attention_gqa(q, k, v, scale):
    """One token's attention for every query head: q (Hq, D), k and v (Hkv, n, D) of the visible keys -> (Hq, D)
    float64: ``softmax(scale * k @ q) @ v`` per query head, over its KV head (:func:`kv_head_of`). With n == 0
    there is nothing to attend to and the output is zeros."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    q_heads, kv_heads = q.shape[0], k.shape[0]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads do not split into {kv_heads} KV heads")
    if k.shape[1] == 0:
        return np.zeros(q.shape, np.float64)
    heads = [kv_head_of(qh, q_heads, kv_heads) for qh in range(q_heads)]
    weights = softmax(np.einsum("hd,hnd->hn", q, k[heads]) * float(scale))  # (Hq, n)
    return np.einsum("hn,hnd->hd", weights, v[heads])


def attention(q, k, v, scale):
    """Attention of one query head over n visible rows: ``softmax(scale * k @ q) @ v`` in float64.

    q: (D,), k: (n, D), v: (n, D) -> (D,); zeros when n == 0."""
    return decode_attention_gqa(np.asarray(q)[None], np.asarray(k)[None], np.asarray(v)[None], scale)[0]


def window_keys(i, window=0, sinks=0):
    """Key positions a query at position i sees: 0 .. i, cut (W = ``window`` > 0) to the first ``sinks`` and the
    last ``W - sinks`` of them, i.e. ``i - W < j <= i`` without sinks. A list of ints in increasing order."""
    everything = list(range(int(i) + 1))
    if window <= 0 or len(everything) <= window:
        return everything
    return everything[:sinks] + everything[len(everything) - (window - sinks):]


def reference_attention(q, keys, values, positions, scale, window=0, sinks=0):
    """Float64 causal attention of a chunk from the full K/V: gather the visible rows, softmax, matmul.

    q: (T, q_heads, D); keys, values: (kv_heads, n, D) holding positions 0 .. n-1 in order (``FlatCache.keys()``, or
    every row ever fed to a ring, unwrapped), n > max(positions); positions: (T,) absolute positions. Token t sees
    :func:`window_keys` (positions[t], window, sinks): keys 0 .. positions[t], or a sliding window of W = ``window``
    keys with ``sinks`` sinks. Returns (T, q_heads, D).
    """
    q = np.asarray(q, np.float64)
    keys = np.asarray(keys)
    values = np.asarray(values)
    out = np.empty(q.shape, np.float64)
    for t, p in enumerate(np.asarray(positions).tolist()):
        seen = window_keys(p, window, sinks)
        out[t] = decode_attention_gqa(q[t], keys[:, seen], values[:, seen], scale)
    return out


def nmse(reference, got):
    """llama.cpp's normalized mean squared error ``sum (a - b)^2 / sum a^2`` (a = the reference); its square root is
    the relative RMS error."""
    a = np.asarray(reference, np.float64)
    return float(np.sum((a - np.asarray(got, np.float64)) ** 2) / np.sum(a * a))


# ---------------------------------------------------------------------------------------------------------------
# The backend check: each variant's scripted run against the reference
# ---------------------------------------------------------------------------------------------------------------
def random_step_inputs(rng, shape, n_seq, num_tokens):
    """Random k, v (n_seq, T, kv_heads, head_dim) in the cache's dtype and q (n_seq, T, q_heads, head_dim) float32."""
    kv_dims = (n_seq, num_tokens, shape.kv_heads, shape.head_dim)
    k = rng.standard_normal(kv_dims).astype(shape.public_dtype)
    v = rng.standard_normal(kv_dims).astype(shape.public_dtype)
    q = rng.standard_normal((n_seq, num_tokens, shape.q_heads, shape.head_dim)).astype(np.float32)
    return k, v, q


class Fed:
    """Every K/V row fed to one layer of one sequence, in position order, as float64: ``keys`` and ``values``
    (kv_heads, n, head_dim), position p at index p. Written out here from what was fed, never read from a cache."""

    def __init__(self, kv_heads, head_dim):
        self.keys = self.values = np.zeros((kv_heads, 0, head_dim))

    def add(self, k, v):
        """Append the rows of one step: k, v (T, kv_heads, head_dim) in the cache's dtype."""
        self.keys = np.concatenate([self.keys, np.asarray(k, np.float64).transpose(1, 0, 2)], axis=1)
        self.values = np.concatenate([self.values, np.asarray(v, np.float64).transpose(1, 0, 2)], axis=1)

    def copy(self):
        """An independent copy (a forked sequence inherits its parent's rows)."""
        other = Fed.__new__(Fed)
        other.__dict__.update(self.__dict__)
        return other


def checked_step(cache, rng, num_tokens, seq_ids, expected):
    """One step of a scripted check on ``cache``: plan; for every layer random K/V/Q (:func:`random_step_inputs`),
    write, attend, and compare each sequence's output with ``expected(layer, seq, i, k, v, q, step)`` (its rows k,
    v, q of the step, before advance); advance. Returns (the max |attend - expected|, the step)."""
    step = cache.plan(num_tokens, seq_ids)
    worst = 0.0
    for layer in range(cache.shape.layers):
        k, v, q = random_step_inputs(rng, cache.shape, len(seq_ids), num_tokens)
        cache.write(step, layer, k, v)
        out = cache.attend(step, layer, q)
        for i, seq in enumerate(seq_ids):
            reference = expected(layer, seq, i, k[i], v[i], q[i], step)
            worst = max(worst, float(np.max(np.abs(out[i] - reference))))
    cache.advance(step)
    return worst, step


def _small_shape(dtype, head_dim=16):
    return CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=head_dim, dtype=dtype)


def backend_max_error(backend, dtype="float32", seed=0):
    """Max |attend - reference| over a small run of a FlatCache on one backend: two sequences of different lengths,
    a chunked prefill, a step for one sequence only, then decode steps; every layer, every step. The reference is
    :func:`reference_attention` over every K/V row fed to the sequence. Returns a float."""
    rng = np.random.default_rng(seed)
    shape = _small_shape(dtype)
    cache = FlatCache(shape, batch=2, max_tokens=40, backend=backend)
    scale = 1.0 / np.sqrt(shape.head_dim)
    fed = [[Fed(shape.kv_heads, shape.head_dim) for _ in range(2)] for _ in range(shape.layers)]

    def expected(layer, seq, i, k, v, q, step):
        rows = fed[layer][seq]
        rows.add(k, v)
        return reference_attention(q, rows.keys, rows.values, step.positions[i], scale)

    return max(checked_step(cache, rng, num_tokens, seq_ids, expected)[0]
               for num_tokens, seq_ids in [(7, [0, 1]), (5, [1]), (1, [0, 1]), (1, [1, 0]), (3, [0])])


def ring_backend_max_error(backend, dtype="float32", seed=0, window=6, sinks_options=(0, 2)):
    """Max |attend - reference| over a small run of a RingCache on one backend, once per number of sinks: two
    sequences, a prefill, a step for one sequence that wraps (deferred), decode steps past the wrap, and a chunk
    longer than the ring; every layer, every step. The reference is :func:`reference_attention` with the window
    rule over every K/V row ever fed (unwrapped), so it also checks that the ring kept the right keys. Returns a
    float."""
    rng = np.random.default_rng(seed)
    shape = _small_shape(dtype)
    scale = 1.0 / np.sqrt(shape.head_dim)
    worst = 0.0
    for sinks in sinks_options:
        cache = RingCache(shape, batch=2, window=window, sinks=sinks, backend=backend)
        fed = [[Fed(shape.kv_heads, shape.head_dim) for _ in range(2)] for _ in range(shape.layers)]

        def expected(layer, seq, i, k, v, q, step):
            rows = fed[layer][seq]
            rows.add(k, v)
            return reference_attention(q, rows.keys, rows.values, step.positions[i], scale, window, sinks)

        for num_tokens, seq_ids in [(4, [0, 1]), (5, [1]), (1, [0, 1]), (1, [1, 0]), (1, [0, 1]), (9, [0]),
                                    (1, [0, 1])]:
            worst = max(worst, checked_step(cache, rng, num_tokens, seq_ids, expected)[0])
    return worst


def round_trip(x, fmt, backend="python"):
    """``x`` (float32, last dimension a multiple of 32) as format ``fmt`` holds it: quantized and dequantized by
    :func:`kvref.quant.quantize` / :func:`kvref.quant.dequantize`, or rounded to fp16 (the tail) for ``"f16"``."""
    x = np.ascontiguousarray(x, np.float32)
    if fmt == "f16":
        return x.astype(np.float16).astype(np.float32)
    return quant.dequantize(quant.quantize(x, fmt, backend=backend), fmt, x.shape, backend=backend)


class TwoTierHistory:
    """Every K/V row fed to one layer and sequence of a two-tier cache, in position order, twice: as fed (what the
    tail holds, ``fed``: a :class:`Fed`) and as the store would hold it (``stored``: :func:`round_trip` of the same
    values, python backend). Both are written out here from what was fed, never read back from the cache.

    A token is quantized once, from the value it was written with, so the store of a correct cache holds exactly
    ``stored`` for its positions. :meth:`expected` is the float64 attention of a step over the tiers as they were
    before it: positions below m (the tokens migrated before the step) from ``stored``, the rest from ``fed``.
    """

    def __init__(self, kv_heads, head_dim, fmt):
        self.fmt = fmt
        self.fed = Fed(kv_heads, head_dim)
        self.stored = Fed(kv_heads, head_dim)

    def add(self, k, v):
        """Append the rows of one step: k, v (T, kv_heads, head_dim) in the cache's dtype."""
        self.fed.add(k, v)
        self.stored.add(*(round_trip(np.asarray(rows, np.float32), self.fmt) for rows in (k, v)))

    def expected(self, q, positions, migrated, window, scale):
        """Float64 attention of the step's queries q (T, q_heads, D) at ``positions`` with the window rule
        ``i - M < j <= i`` (M = ``window``), reading positions below ``migrated`` from the store."""
        keys, values = (np.concatenate([s[:, :migrated], f[:, migrated:]], axis=1)
                        for s, f in ((self.stored.keys, self.fed.keys), (self.stored.values, self.fed.values)))
        return reference_attention(q, keys, values, positions, scale, window)


#: steps of :func:`two_tier_backend_max_error`: (tokens, sequences). Sequence 0: a prefill longer than R (straight
#: to both tiers), decode steps that migrate a batch, then a chunk longer than M (evicts, stores some new tokens
#: directly, never stores others); sequence 1 on its own schedule
TWO_TIER_CHECK_STEPS = ((8, [0, 1]), (4, [1]), (1, [0, 1]), (1, [1, 0]), (2, [0]), (14, [0]), (1, [0, 1]),
                        (3, [1]), (1, [1, 0]))


def two_tier_backend_max_error(backend, dtype="float32", seed=0, formats=None, tail_tokens=6, max_tokens=12,
                               migration_batch=3):
    """Max |attend - reference| over small runs of a TwoTierCache on one backend, once per store format: two
    sequences through :data:`TWO_TIER_CHECK_STEPS` (both rings wrap), every layer, every step. The reference is
    :meth:`TwoTierHistory.expected`: float64 attention over the cache's dequantized store and its tail, computed from
    the K/V fed. ``formats`` defaults to every format on the compiled backends and to q8_0, q4_0 and q5_1 (each
    kind of block: int8 codes, nibbles, nibbles with a 5th bit and a minimum) on the slow python spec. Returns a
    float."""
    if formats is None:
        formats = ("q8_0", "q4_0", "q5_1") if backend == "python" else tuple(quant.FORMATS)
    rng = np.random.default_rng(seed)
    shape = _small_shape(dtype, head_dim=32)
    scale = 1.0 / np.sqrt(shape.head_dim)
    worst = 0.0
    for fmt in formats:
        cache = TwoTierCache(shape, batch=2, tail_tokens=tail_tokens, max_tokens=max_tokens, store_format=fmt,
                             migration_batch=migration_batch, backend=backend)
        history = [[TwoTierHistory(shape.kv_heads, shape.head_dim, fmt) for _ in range(2)]
                   for _ in range(shape.layers)]

        def expected(layer, seq, i, k, v, q, step):
            h = history[layer][seq]
            h.add(k, v)
            return h.expected(q, step.positions[i], int(step.tiers[i, 0]), max_tokens, scale)

        for num_tokens, seq_ids in TWO_TIER_CHECK_STEPS:
            worst = max(worst, checked_step(cache, rng, num_tokens, seq_ids, expected)[0])
    return worst


#: operations of :func:`pooled_backend_max_error` on a pool of B = 4 token blocks: ("step", tokens, sequences),
#: ("fork", parent), ("release", seq) or ("add",). A prefill that ends mid-block; a fork of that sequence, then a step
#: in which the fork and its parent both append into their shared partial block (copy-on-write); a chunk crossing two
#: block boundaries; a release; a new sequence in the released row that reuses freed blocks (the pool has 8 blocks,
#: so the free queue reaches them)
POOLED_CHECK_OPS = (("step", 6, [0, 1]), ("fork", 0), ("step", 1, [2, 0]), ("step", 5, [1]), ("step", 1, [0, 1, 2]),
                    ("release", 1), ("add",), ("step", 3, [1]), ("step", 2, [2, 1, 0]), ("step", 1, [0, 1, 2]))


def pooled_backend_max_error(backend, dtype="float32", seed=0, block_size=4, ops=POOLED_CHECK_OPS,
                             evict_options=(None, 7)):
    """Max |attend - reference| over small runs of a PooledCache (8 blocks of ``block_size`` tokens) on one backend:
    three sequences through ``ops`` (copy-on-write, block boundaries, release and reuse), once for each entry M of
    ``evict_options``: None, no eviction; an int, ``max_tokens=M`` with ``evict="oldest"`` (a sliding window of M
    tokens that starts mid-block). Every layer, every step. The reference is :func:`reference_attention` over every
    K/V row fed to the sequence (a fork inherits its parent's), from the first held position
    ``e' = max(0, L + T - M)``, written out here: so it also checks the block tables, the copies and that evicted rows
    are skipped. Returns a float."""
    rng = np.random.default_rng(seed)
    shape = _small_shape(dtype)
    scale = 1.0 / np.sqrt(shape.head_dim)
    worst = 0.0
    for max_tokens in evict_options:
        cache = PooledCache(shape, num_blocks=8, block_size=block_size, batch=2, max_seqs=3, max_tokens=max_tokens,
                            evict=None if max_tokens is None else "oldest", backend=backend)
        fed = {seq: [Fed(shape.kv_heads, shape.head_dim) for _ in range(shape.layers)] for seq in (0, 1)}

        def expected(layer, seq, i, k, v, q, step):
            rows = fed[seq][layer]
            rows.add(k, v)
            n = rows.keys.shape[1]
            first = 0 if max_tokens is None else max(0, n - max_tokens)  # e' after the step
            return reference_attention(q, rows.keys[:, first:], rows.values[:, first:], step.positions[i] - first,
                                       scale)

        for op in ops:
            if op[0] == "fork":
                fed[cache.fork(op[1])] = [rows.copy() for rows in fed[op[1]]]
            elif op[0] == "release":
                cache.release(op[1])
                del fed[op[1]]
            elif op[0] == "add":
                fed[cache.add_sequence()] = [Fed(shape.kv_heads, shape.head_dim) for _ in range(shape.layers)]
            else:
                worst = max(worst, checked_step(cache, rng, op[1], op[2], expected)[0])
    return worst


#: the backend check of each cache variant: variant -> function(backend, dtype) returning the max |error|
VARIANT_CHECKS = {"flat": backend_max_error, "ring": ring_backend_max_error, "two_tier": two_tier_backend_max_error,
                  "pooled": pooled_backend_max_error}


def check_backends(names=None, dtypes=("float32", "float16"), variants=("flat", "ring", "two_tier", "pooled"),
                   progress=None):
    """Check every available backend, for every cache variant, against :func:`reference_attention`.

    Returns a list of dicts, one per (backend, variant, dtype): backend, variant, dtype, available, reason,
    max_error, tolerance, ok, seconds (compiling included). A backend that is not available is listed with ok=None
    (skipped), never as a failure. ``progress``, when given, is told about every row once it is done: a tqdm bar
    (or anything with ``update``) gets ``update(1)`` (and ``set_postfix_str`` names the row while it runs), any
    other callable is called with the row's dict.
    """
    status = backends()
    results = []
    for name in names or ("python", "cpu", "cuda"):
        available, reason = status[name]
        for variant in variants:
            for dtype in dtypes:
                row = {"backend": name, "variant": variant, "dtype": dtype, "available": available,
                       "reason": reason, "max_error": None, "tolerance": TOLERANCES[name], "ok": None,
                       "seconds": 0.0}
                if available:
                    if hasattr(progress, "set_postfix_str"):
                        progress.set_postfix_str(f"{name} {variant} {dtype}")
                    start = time.perf_counter()
                    row["max_error"] = VARIANT_CHECKS[variant](name, dtype)
                    row["seconds"] = time.perf_counter() - start
                    row["ok"] = row["max_error"] <= row["tolerance"]
                results.append(row)
                if hasattr(progress, "update"):
                    progress.update(1)
                elif progress is not None:
                    progress(row)
    return results


# ---------------------------------------------------------------------------------------------------------------
# compare(): one tensor against its expected value (the golden checker's verdict, kvref/golden)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """What :func:`compare` found for one tensor.

    ok: every compared element satisfies ``|actual - expected| <= atol + rtol * |expected|`` (and the shapes
    agree); max_abs, max_rel: the largest absolute error and relative error ``|a - e| / |e|`` (over elements with
    e != 0); nmse: :func:`nmse` (0 when the expected tensor is all zeros and matched); worst: up to ``n_worst``
    elements that exceed their tolerance most (or, when all pass, the largest errors) as (index tuple, actual,
    expected); compared, skipped: element counts (skipped = masked out); message: a one-line reason when not ok.
    """

    name: str
    ok: bool
    max_abs: float = 0.0
    max_rel: float = 0.0
    nmse: float = 0.0
    worst: list = field(default_factory=list)
    compared: int = 0
    skipped: int = 0
    atol: float = 0.0
    rtol: float = 0.0
    message: str = ""
    ratio: float = 0.0  # max over elements of error / tolerance (inf where the tolerance is 0 and the error is not)


def compare(actual, expected, name="tensor", atol=0.0, rtol=0.0, mask=None, n_worst=5):
    """Compare ``actual`` with ``expected`` element by element: returns a :class:`Comparison`.

    An element passes iff ``|actual - expected| <= atol + rtol * |expected|`` (NumPy's ``allclose`` rule; with
    atol = rtol = 0 the values must be equal, as for integer tensors and quantized bytes). Both are read as float64
    (integers up to 2**53 exactly). ``mask`` (bool, broadcastable from the left to expected's shape) selects the
    elements to compare; masked-out elements and empty tensors are skipped, not failed. A shape that differs, or a
    NaN or inf in ``actual`` where ``expected`` is finite, fails.
    """
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    result = Comparison(name=name, ok=False, atol=float(atol), rtol=float(rtol))
    if actual.shape != expected.shape:
        result.message = f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
        return result
    e = expected.astype(np.float64)
    a = actual.astype(np.float64)
    keep = np.ones(e.shape, bool)
    if mask is not None:
        mask = np.asarray(mask, bool)
        keep = np.broadcast_to(mask.reshape(mask.shape + (1,) * (e.ndim - mask.ndim)), e.shape).copy()
    result.compared = int(keep.sum())
    result.skipped = int(keep.size - result.compared)
    if result.compared == 0:
        result.ok = True
        return result
    with np.errstate(all="ignore"):  # inf and NaN are handled below, element by element
        error = np.where(keep, np.abs(a - e), 0.0)
        error[keep & ~np.isfinite(a) & np.isfinite(e)] = np.inf
        same_special = keep & ~np.isfinite(e) & ((a == e) | (np.isnan(a) & np.isnan(e)))  # inf or NaN matched
        error[same_special] = 0.0
        error[keep & np.isnan(e) & ~np.isnan(a)] = np.inf  # an expected NaN is matched only by a NaN
        allowed = np.where(np.isnan(e), 0.0, atol + rtol * np.abs(e))
        ratio = np.where(error == 0, 0.0, error / allowed)
        relative = np.where(keep & (e != 0), error / np.abs(e), 0.0)
    ratio[~keep] = 0.0
    result.max_abs = float(error.max())
    result.max_rel = float(relative.max())
    result.ratio = float(ratio.max())
    finite = keep & np.isfinite(e)
    energy = float(np.sum(e[finite] ** 2))
    squared = float(np.sum(np.where(finite, error, 0.0) ** 2))
    result.nmse = squared / energy if energy > 0 else (0.0 if squared == 0 else np.inf)
    order = np.argsort(-ratio, axis=None, kind="stable")[:n_worst]
    for flat in order.tolist():
        if ratio.flat[flat] == 0 and result.worst:
            break
        index = tuple(int(i) for i in np.unravel_index(flat, e.shape))
        result.worst.append((index, actual[index].item(), expected[index].item()))
    bad = int(np.sum(keep & (error > allowed)))
    result.ok = bad == 0
    if not result.ok:
        index, got, want = result.worst[0]
        result.message = (f"{bad} of {result.compared} elements exceed atol={atol:g} + rtol={rtol:g}*|expected|; "
                          f"worst at {list(index)}: got {got!r}, expected {want!r}")
    return result
