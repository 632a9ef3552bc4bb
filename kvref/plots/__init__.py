"""Figures of kvref, one function per figure, shared by ``python -m kvref.plots`` and the notebooks.

Every ``*_figure`` function takes parameters and returns a :class:`matplotlib.figure.Figure`. The figures are built
with the object-oriented API (``Figure(...)``, never ``pyplot``), so building one touches no global state, needs no
``plt.close``, and never shows a window: ``python -m kvref.plots`` renders them with Agg (PNG) and the SVG backend,
and a notebook displays them inline. :func:`save` writes a figure as PNG and SVG.

Figures of the flat cache:

* :func:`memory_figure`         KV-cache bytes vs context for the presets; seed 003's query-head formula next to the
                                correct KV-head one; bytes per tensor-parallel rank for Llama-3-8B
* :func:`cost_figure`           exact work counts of cached vs no-cache generation (seed 002: 9,950 vs 150), and
                                measured wall time per generated token (:func:`measure_decode_times`)
* :func:`flat_timeline_figure`  the length of a real FlatCache across append, rejected overflow, crop and reset
                                (:func:`flat_timeline_events`), next to seed 001's corrupted position
* :func:`layouts_figure`        element offsets of the head-major and token-major layouts

Figures of the ring cache (``kvref/ring.py``):

* :func:`ring_timeline_figure`  the position each slot of a real RingCache holds after each step, with and without
                                attention sinks (:func:`ring_timeline_events`)
* :func:`ring_memory_figure`    bytes vs tokens generated: flat cache vs ring (Mistral-7B, W = 4096), and a small real
                                ring's measured ``nbytes`` (:func:`ring_memory_samples`)
* :func:`window_conventions_figure`  the masks of one window W in kvref, FlashAttention, llama.cpp / HF and Mistral's
                                reference (:func:`window_masks`)
* :func:`chunked_prefill_figure`  the keys a chunk's queries need vs those a write-first ring still holds
                                (:func:`chunked_prefill_events`)

Figures of the two-tier cache (``kvref/two_tier.py``) and ggml's quantized blocks (``kvref/quant.py``):

* :func:`quant_blocks_figure`   the bytes of one q8_0 and one q4_0 block of a real vector: the fp16 scale d, the
                                codes, and the nibble order (element j low, j + 16 high) (:func:`quant_block_layout`)
* :func:`quant_error_figure`    true RMSE and max |error| of every format against bits per element, the worst error
                                per block against its bound, and llama.cpp's own metric against its 0.002 threshold
                                (:func:`quant_error_rows`)
* :func:`two_tier_timeline_figure`  the tier (evicted / store / tail) of every position of a real TwoTierCache after
                                each step: batched migration, a prefill straight into its tiers, exact eviction
                                (:func:`two_tier_timeline_events`)
* :func:`two_tier_memory_figure`  bytes vs tokens generated: flat fp16 vs two-tier q8_0 / q4_0 (Llama-3-8B), and a
                                small real cache's measured ``stats()["bytes_used"]`` (:func:`two_tier_memory_samples`)
* :func:`two_tier_error_figure`  attention-output error of a real TwoTierCache against an fp32 FlatCache vs the tail
                                length R (:func:`two_tier_error_rows`), and after a prefill, kvref's tiers vs quantizing
                                the whole prompt as Hugging Face does (:func:`prefill_tier_rows`)

Figures of the pooled (paged) cache (``kvref/pooled.py``):

* :func:`pooled_tables_figure`  the pool of a real PooledCache after a prefill, a fork, appends (copy-on-write) and
                                a release: block tables, ref counts, the free queue, the positions stored in each
                                slot read back from the pool (:func:`pooled_tables_events`)
* :func:`pooled_memory_figure`  bytes of a batch of mixed lengths: a FlatCache sized for the longest vs PooledCaches
                                of block size 1 .. 128, measured from real caches, on the formula
                                :func:`kvref.memory.pooled_used_bytes` (:func:`pooled_memory_samples`,
                                :func:`request_lengths`)

:func:`check_backends` compares every available backend, flat, ring, two-tier and pooled, with
:func:`reference_attention`, a float64 NumPy attention computed from the K/V fed to the cache (for the two-tier cache:
its store's dequantized values, computed here from what was fed; for the pooled cache: over forks, copy-on-write,
reused blocks and eviction), before anything is timed.
"""

import os
import time

import numpy as np
from matplotlib.figure import Figure

from .. import memory, quant
from ..backends import backends
from ..errors import CacheOverflowError
from ..flat import FlatCache
from ..pooled import PooledCache, pooled_slot, validate_page_table
from ..ring import RingCache
from ..shapes import PRESETS, CacheShape, element_offset, preset
from ..two_tier import TwoTierCache, migrate_to

#: the figures ``python -m kvref.plots`` writes, in order (file stem -> what it shows)
FIGURE_NAMES = ("memory", "cost", "flat_timeline", "layouts", "ring_timeline", "ring_memory", "window_conventions",
                "chunked_prefill", "quant_blocks", "quant_error", "two_tier_timeline", "two_tier_memory",
                "two_tier_error", "pooled_tables", "pooled_memory")

#: one-line caption of each figure (index.html)
FIGURE_CAPTIONS = {
    "memory": "KV-cache bytes vs context for published models; seed 003's query-head formula; bytes per "
              "tensor-parallel rank.",
    "cost": "Work and measured time per generated token with and without a cache (seed 002's count corrected).",
    "flat_timeline": "A real FlatCache's length across append, rejected overflow, crop and reset (seed 001's "
                     "position beside it).",
    "layouts": "Element offsets of the head-major and token-major layouts, and what one head's attention reads.",
    "ring_timeline": "Which position each slot of a real RingCache holds after each step: slot p % W, overwrites "
                     "at p >= W, a deferred chunk, and S = 2 attention sinks.",
    "ring_memory": "Ring memory stays flat in n once past W (Mistral-7B, W = 4096, formulas), checked by a small "
                   "real RingCache's measured nbytes.",
    "window_conventions": "One window W in kvref, FlashAttention, llama.cpp / HF and Mistral's reference: W keys, "
                          "or W + 1 where the parameter is misread.",
    "chunked_prefill": "Why kvref defers a chunk that wraps the ring: written first, it overwrites keys its own "
                       "earlier queries need (LLMs-from-scratch #1013).",
    "quant_blocks": "The bytes of one q8_0 and one q4_0 block of a real vector (kvref.quant.quantize): the fp16 "
                    "scale d, then the codes; q4_0 packs element j in the low nibble of byte j and element j + 16 in "
                    "its high nibble.",
    "quant_error": "True RMSE and max |error| of each ggml format vs bits per element (llama.cpp's test data "
                   "0.1 + 2 cos(i) and N(0, 1)); the worst error per block vs its bound (q4_0: amax/8, the clamp); "
                   "llama.cpp's array_rmse = sqrt(sum e^2)/n, i.e. true RMSE / sqrt(n), vs its 0.002 threshold.",
    "two_tier_timeline": "The tier of every position of a real TwoTierCache (R = 8, B = 4, M = 24, q4_0) after each "
                         "step: a prefill longer than R goes straight to its tiers, migration moves B tokens at a "
                         "time, eviction keeps exactly M.",
    "two_tier_memory": "Bytes vs tokens generated, Llama-3-8B: flat fp16 vs two-tier q8_0 / q4_0 with an fp16 tail "
                       "of 256 (formulas), checked by a small real TwoTierCache's measured stats()['bytes_used'].",
    "two_tier_error": "Attention-output error (NMSE) of a real TwoTierCache against an fp32 FlatCache fed the same "
                      "random K/V/Q, vs the tail length R; and after a prefill, kvref's tiers vs quantizing the whole "
                      "prompt (transformers #35185).",
    "pooled_tables": "The pool of a real PooledCache (8 blocks of B = 4) after a prefill, a fork, appends and a "
                     "release: block tables, ref counts, the copy-on-write copy of the shared partial block, and the "
                     "free queue (freed blocks join its tail; stale values stay until reused).",
    "pooled_memory": "K/V bytes of 32 requests of mixed lengths (Llama-3-8B): a FlatCache sized for the longest vs "
                     "PooledCaches of block size B, measured from real caches (stats()['bytes_used']) on the formula "
                     "sum ceil(L / B) · B · bytes_per_token; the waste is at most B - 1 slots per sequence.",
}

#: largest accepted max |error| of a backend's attention against the float64 reference. The python backend is the
#: float32 spec; cpu and cuda may use a polynomial exp and re-associated sums (kvref/cpu/fast_math.py).
TOLERANCES = {"python": 1e-5, "cpu": 1e-4, "cuda": 1e-4}

#: the four GQA presets (kv_heads < q_heads), where the query-head formula of seed 003 is wrong
GQA_PRESETS = ("tinyllama-1.1b", "llama-3-8b", "mistral-7b", "phi-4")

MODEL_COLORS = {
    "gpt2": "#7f7f7f", "tinyllama-1.1b": "#17becf", "llama-2-7b": "#1f77b4", "llama-3-8b": "#d62728",
    "mistral-7b": "#ff7f0e", "phi-2": "#9467bd", "phi-4": "#2ca02c",
}
CACHED_COLOR = "#1f77b4"
RECOMPUTE_COLOR = "#d62728"
SEED_COLOR = "#7f7f7f"


# ---------------------------------------------------------------------------------------------------------------
# Saving and formatting
# ---------------------------------------------------------------------------------------------------------------
def save(fig, name, out_dir):
    """Write ``fig`` as ``out_dir/name.png`` and ``out_dir/name.svg``; returns the two paths.

    The PNG's draw runs the figure's layout engine (constrained layout); the SVG reuses the positions it found
    instead of running it again (a third of an SVG's drawing time), and the engine is restored afterwards."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    engine = fig.get_layout_engine()
    try:
        for ext in ("png", "svg"):
            path = os.path.join(out_dir, f"{name}.{ext}")
            fig.savefig(path, format=ext, dpi=110 if ext == "png" else None)
            paths.append(path)
            fig.set_layout_engine("none")
    finally:
        fig.set_layout_engine(engine)
    return paths


def format_bytes(n):
    """Bytes in binary units: ``1.00 GiB`` from 1 GiB up, ``88.0 MiB`` below, ``512 B`` under 1 KiB."""
    if n >= memory.GIB:
        return f"{n / memory.GIB:.2f} GiB"
    if n >= memory.MIB:
        return f"{n / memory.MIB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


def short_bytes(n):
    """Bytes in binary units without trailing zeros: ``128 MiB``, ``1 GiB``, ``1.56 GiB``."""
    for unit, size in (("GiB", memory.GIB), ("MiB", memory.MIB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{int(n)} B"


def _bytes_axis(ax, axis="y"):
    """Label an axis of byte counts with binary units."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: short_bytes(v) if v >= 1 else "0")
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


def _context_label(n):
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


# ---------------------------------------------------------------------------------------------------------------
# The float64 reference and the backend check
# ---------------------------------------------------------------------------------------------------------------
def reference_attention(q, keys, values, positions, scale, window=0, sinks=0):
    """Float64 causal attention from stored K/V: gather, softmax, matmul.

    q: (T, q_heads, D); keys, values: (kv_heads, n, D) holding positions 0 .. n-1 in order (``FlatCache.keys()``, or
    every row ever fed to a ring, unwrapped); positions: (T,) absolute positions (token t sees keys 0 .. positions[t]).
    Query head qh reads KV head qh // G. Returns (T, q_heads, D).

    window: W > 0 keeps only the keys of a sliding window, written out here on its own (not with
    :func:`kvref.attention.visible`): key j takes part iff ``j <= p`` and (``j < sinks`` or ``j > p - (W - sinks)``).
    """
    q = np.asarray(q, np.float64)
    group = q.shape[1] // keys.shape[0]
    k = np.repeat(np.asarray(keys, np.float64), group, axis=0)  # (q_heads, n, D)
    v = np.repeat(np.asarray(values, np.float64), group, axis=0)
    out = np.empty(q.shape, np.float64)
    for t, p in enumerate(np.asarray(positions).tolist()):
        keep = np.arange(p + 1)
        if window > 0:
            keep = keep[(keep < sinks) | (keep > p - (window - sinks))]
        scores = np.einsum("hd,hnd->hn", q[t], k[:, keep]) * float(scale)
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        out[t] = np.einsum("hn,hnd->hd", weights, v[:, keep])
    return out


def random_step_inputs(rng, shape, n_seq, num_tokens):
    """Random k, v (n_seq, T, kv_heads, head_dim) in the cache's dtype and q (n_seq, T, q_heads, head_dim) float32."""
    kv_dims = (n_seq, num_tokens, shape.kv_heads, shape.head_dim)
    k = rng.standard_normal(kv_dims).astype(shape.public_dtype)
    v = rng.standard_normal(kv_dims).astype(shape.public_dtype)
    q = rng.standard_normal((n_seq, num_tokens, shape.q_heads, shape.head_dim)).astype(np.float32)
    return k, v, q


def backend_max_error(backend, dtype="float32", seed=0):
    """Max |attend - reference| over a small run of one backend: two sequences of different lengths, a chunked
    prefill, a step for one sequence only, then decode steps; every layer, every step. Returns a float."""
    rng = np.random.default_rng(seed)
    shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=16, dtype=dtype)
    cache = FlatCache(shape, batch=2, max_tokens=40, backend=backend)
    scale = 1.0 / np.sqrt(shape.head_dim)
    worst = 0.0
    for num_tokens, seq_ids in [(7, [0, 1]), (5, [1]), (1, [0, 1]), (1, [1, 0]), (3, [0])]:
        step = cache.plan(num_tokens, seq_ids)
        n = len(seq_ids)
        outs = []
        for layer in range(shape.layers):
            k, v, q = random_step_inputs(rng, shape, n, num_tokens)
            cache.write(step, layer, k, v)
            outs.append((layer, q, cache.attend(step, layer, q)))
        cache.advance(step)  # keys()/values() return the stored rows up to the (new) length
        for layer, q, out in outs:
            for i, seq in enumerate(seq_ids):
                expected = reference_attention(q[i], cache.keys(layer, seq), cache.values(layer, seq),
                                               step.positions[i], scale)
                worst = max(worst, float(np.max(np.abs(out[i] - expected))))
    return worst


def ring_backend_max_error(backend, dtype="float32", seed=0, window=6, sinks_options=(0, 2)):
    """Max |attend - reference| over a small run of a RingCache on one backend, once per number of sinks: two
    sequences, a prefill, a step for one sequence that wraps (deferred), decode steps past the wrap, and a chunk
    longer than the ring; every layer, every step. The reference is :func:`reference_attention` with the window
    rule over every K/V row ever fed (unwrapped), so it also checks that the ring kept the right keys. Returns a
    float."""
    rng = np.random.default_rng(seed)
    shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=16, dtype=dtype)
    scale = 1.0 / np.sqrt(shape.head_dim)
    worst = 0.0
    for sinks in sinks_options:
        cache = RingCache(shape, batch=2, window=window, sinks=sinks, backend=backend)
        fed = [[[np.zeros((shape.kv_heads, 0, shape.head_dim))] * 2 for _ in range(2)] for _ in range(shape.layers)]
        for num_tokens, seq_ids in [(4, [0, 1]), (5, [1]), (1, [0, 1]), (1, [1, 0]), (1, [0, 1]), (9, [0]),
                                    (1, [0, 1])]:
            step = cache.plan(num_tokens, seq_ids)
            n = len(seq_ids)
            for layer in range(shape.layers):
                k, v, q = random_step_inputs(rng, shape, n, num_tokens)
                cache.write(step, layer, k, v)
                out = cache.attend(step, layer, q)
                for i, seq in enumerate(seq_ids):
                    rows = fed[layer][seq]
                    rows[0] = np.concatenate([rows[0], k[i].transpose(1, 0, 2).astype(np.float64)], axis=1)
                    rows[1] = np.concatenate([rows[1], v[i].transpose(1, 0, 2).astype(np.float64)], axis=1)
                    expected = reference_attention(q[i], rows[0], rows[1], step.positions[i], scale, window, sinks)
                    worst = max(worst, float(np.max(np.abs(out[i] - expected))))
            cache.advance(step)
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
    tail holds) and as the store would hold it (:func:`round_trip` of the same values, python backend). Both are
    written out here from what was fed, never read back from the cache.

    A token is quantized once, from the value it was written with, so the store of a correct cache holds exactly
    ``stored`` for its positions. :meth:`expected` is the float64 attention of a step over the tiers as they were
    before it: positions below m (the tokens migrated before the step) from ``stored``, the rest from ``fed``.
    """

    def __init__(self, kv_heads, head_dim, fmt):
        self.fmt = fmt
        empty = np.zeros((kv_heads, 0, head_dim))
        self.fed = [empty, empty]
        self.stored = [empty, empty]

    def add(self, k, v):
        """Append the rows of one step: k, v (T, kv_heads, head_dim) in the cache's dtype."""
        for kv_index, rows in enumerate((k, v)):
            rows = np.asarray(rows).astype(np.float32).transpose(1, 0, 2)
            self.fed[kv_index] = np.concatenate([self.fed[kv_index], rows.astype(np.float64)], axis=1)
            self.stored[kv_index] = np.concatenate([self.stored[kv_index],
                                                    round_trip(rows, self.fmt).astype(np.float64)], axis=1)

    def expected(self, q, positions, migrated, window, scale):
        """Float64 attention of the step's queries q (T, q_heads, D) at ``positions`` with the window rule
        ``i - M < j <= i`` (M = ``window``), reading positions below ``migrated`` from the store."""
        keys, values = (np.concatenate([s[:, :migrated], f[:, migrated:]], axis=1)
                        for s, f in zip(self.stored, self.fed))
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
    shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=32, dtype=dtype)
    scale = 1.0 / np.sqrt(shape.head_dim)
    worst = 0.0
    for fmt in formats:
        cache = TwoTierCache(shape, batch=2, tail_tokens=tail_tokens, max_tokens=max_tokens, store_format=fmt,
                             migration_batch=migration_batch, backend=backend)
        history = [[TwoTierHistory(shape.kv_heads, shape.head_dim, fmt) for _ in range(2)]
                   for _ in range(shape.layers)]
        for num_tokens, seq_ids in TWO_TIER_CHECK_STEPS:
            step = cache.plan(num_tokens, seq_ids)
            for layer in range(shape.layers):
                k, v, q = random_step_inputs(rng, shape, len(seq_ids), num_tokens)
                cache.write(step, layer, k, v)
                out = cache.attend(step, layer, q)
                for i, seq in enumerate(seq_ids):
                    h = history[layer][seq]
                    h.add(k[i], v[i])
                    expected = h.expected(q[i], step.positions[i], int(step.tiers[i, 0]), max_tokens, scale)
                    worst = max(worst, float(np.max(np.abs(out[i] - expected))))
            cache.advance(step)
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
    shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=16, dtype=dtype)
    scale = 1.0 / np.sqrt(shape.head_dim)
    worst = 0.0
    empty = np.zeros((shape.kv_heads, 0, shape.head_dim))
    for max_tokens in evict_options:
        cache = PooledCache(shape, num_blocks=8, block_size=block_size, batch=2, max_seqs=3, max_tokens=max_tokens,
                            evict=None if max_tokens is None else "oldest", backend=backend)
        fed = {seq: [[empty, empty] for _ in range(shape.layers)] for seq in (0, 1)}
        for op in ops:
            if op[0] == "fork":
                fed[cache.fork(op[1])] = [list(rows) for rows in fed[op[1]]]
                continue
            if op[0] == "release":
                cache.release(op[1])
                del fed[op[1]]
                continue
            if op[0] == "add":
                fed[cache.add_sequence()] = [[empty, empty] for _ in range(shape.layers)]
                continue
            _, num_tokens, seq_ids = op
            step = cache.plan(num_tokens, seq_ids)
            for layer in range(shape.layers):
                k, v, q = random_step_inputs(rng, shape, len(seq_ids), num_tokens)
                cache.write(step, layer, k, v)
                out = cache.attend(step, layer, q)
                for i, seq in enumerate(seq_ids):
                    rows = fed[seq][layer]
                    rows[0] = np.concatenate([rows[0], k[i].transpose(1, 0, 2).astype(np.float64)], axis=1)
                    rows[1] = np.concatenate([rows[1], v[i].transpose(1, 0, 2).astype(np.float64)], axis=1)
                    n = rows[0].shape[1]
                    first = 0 if max_tokens is None else max(0, n - max_tokens)  # e' after the step
                    expected = reference_attention(q[i], rows[0][:, first:], rows[1][:, first:],
                                                   step.positions[i] - first, scale)
                    worst = max(worst, float(np.max(np.abs(out[i] - expected))))
            cache.advance(step)
    return worst


#: the backend check of each cache variant: variant -> function(backend, dtype) returning the max |error|
VARIANT_CHECKS = {"flat": backend_max_error, "ring": ring_backend_max_error, "two_tier": two_tier_backend_max_error,
                  "pooled": pooled_backend_max_error}


def check_backends(names=None, dtypes=("float32", "float16"), variants=("flat", "ring", "two_tier", "pooled")):
    """Check every available backend, for every cache variant, against :func:`reference_attention`.

    Returns a list of dicts: backend, variant, dtype, available, reason, max_error, tolerance, ok, seconds. A
    backend that is not available is listed with ok=None (skipped), never as a failure.
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
                    start = time.perf_counter()
                    row["max_error"] = VARIANT_CHECKS[variant](name, dtype)
                    row["seconds"] = time.perf_counter() - start
                    row["ok"] = row["max_error"] <= row["tolerance"]
                results.append(row)
    return results


# ---------------------------------------------------------------------------------------------------------------
# 1. Memory
# ---------------------------------------------------------------------------------------------------------------
def memory_figure(contexts=None, dtype="float16", wrong_context=8192, tp_model="llama-3-8b", tp_context=8192,
                  tp_sizes=(1, 2, 4, 8, 16, 32)):
    """Three panels: cache bytes vs context (every preset, log-log); seed 003's query-head formula vs the KV-head
    formula for the GQA presets at ``wrong_context``; bytes per rank vs tensor-parallel size for ``tp_model``."""
    contexts = contexts or [2 ** e for e in range(9, 18)]  # 512 .. 128k
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    ax_ctx, ax_wrong, ax_tp = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.15, 1, 1]})

    # (a) bytes vs context
    same = {}  # presets with identical cache geometry share one line (llama-3-8b and mistral-7b)
    for name in PRESETS:
        s = preset(name, dtype)
        same.setdefault((s.layers, s.kv_heads, s.head_dim), []).append(name)
    for names in sorted(same.values(), key=lambda ms: -memory.bytes_per_token(preset(ms[0], dtype))):
        shape = preset(names[0], dtype)
        ys = [memory.cache_bytes(shape, 1, n) for n in contexts]
        ax_ctx.plot(contexts, ys, "o-", ms=3, color=MODEL_COLORS.get(names[0]), label=(
            f"{' = '.join(names)} ({shape.layers}L, {shape.kv_heads} KV heads x {shape.head_dim}: "
            f"{memory.bytes_per_token(shape) // 1024} KiB/token)"))
    ax_ctx.set_xscale("log", base=2)
    ax_ctx.set_yscale("log", base=2)
    ax_ctx.set_xticks(contexts, [_context_label(n) for n in contexts])
    _bytes_axis(ax_ctx)
    ax_ctx.set_xlabel("context length (tokens), batch 1")
    ax_ctx.set_ylabel(f"KV-cache bytes ({dtype})")
    ax_ctx.set_title("(a) bytes = 2 · layers · kv_heads · head_dim · bytes · tokens", fontsize=10)
    ax_ctx.grid(True, which="major", alpha=0.3)
    ax_ctx.legend(fontsize=7, loc="lower right")

    # (b) the query-head formula of seed 003 vs the KV-head formula
    names = list(GQA_PRESETS)
    x = np.arange(len(names))
    right = [memory.cache_bytes(preset(m, dtype), 1, wrong_context) for m in names]
    wrong = [memory.wrong_heads_bytes(preset(m, dtype), 1, wrong_context) for m in names]
    ax_wrong.bar(x - 0.2, right, 0.4, color=CACHED_COLOR, label="correct: KV heads")
    ax_wrong.bar(x + 0.2, wrong, 0.4, color=SEED_COLOR, hatch="//", label="seed 003: query heads (n_heads)")
    for i, m in enumerate(names):
        s = preset(m, dtype)
        ax_wrong.text(x[i] - 0.2, right[i], short_bytes(right[i]), ha="center", va="bottom", fontsize=7)
        ax_wrong.text(x[i] + 0.2, wrong[i], f"{short_bytes(wrong[i])}\n{s.q_heads // s.kv_heads}x too big",
                      ha="center", va="bottom", fontsize=7)
    ax_wrong.set_xticks(x, [f"{m}\n{preset(m).q_heads} q / {preset(m).kv_heads} kv" for m in names], fontsize=8)
    ax_wrong.set_ylabel(f"bytes at {_context_label(wrong_context)} tokens ({dtype})")
    top = max(wrong) * 1.2
    step = memory.GIB if top > 2 * memory.GIB else memory.GIB // 4
    ax_wrong.set_yticks(np.arange(0, top, step))
    _bytes_axis(ax_wrong)
    ax_wrong.set_ylim(0, top)
    ax_wrong.set_title("(b) GQA models: a cache is sized by KV heads", fontsize=10)
    ax_wrong.legend(fontsize=8, loc="upper left")

    # (c) tensor parallelism: bytes per rank
    shape = preset(tp_model, dtype)
    per_rank = [memory.cache_bytes(shape, 1, tp_context, tp) for tp in tp_sizes]
    ideal = [memory.cache_bytes(shape, 1, tp_context) / tp for tp in tp_sizes]
    xs = np.arange(len(tp_sizes))
    colors = [CACHED_COLOR if tp <= shape.kv_heads else "#ff7f0e" for tp in tp_sizes]
    ax_tp.bar(xs, per_rank, 0.6, color=colors)
    ax_tp.plot(xs, ideal, "k:", lw=1, label="total / tp_size (if a head could be split)")
    for i, tp in enumerate(tp_sizes):
        local = memory.local_kv_heads(shape.kv_heads, tp)
        ax_tp.text(xs[i], per_rank[i] * 1.08, f"{short_bytes(per_rank[i])}\n{local} KV head{'s' if local > 1 else ''}",
                   ha="center", va="bottom", fontsize=7)
    from matplotlib.patches import Patch

    handles = [Patch(color=CACHED_COLOR, label=f"kv_heads / tp_size heads per rank (tp <= {shape.kv_heads})"),
               Patch(color="#ff7f0e", label=f"replicated: 1 head per rank (tp > {shape.kv_heads})")]
    ax_tp.set_xticks(xs, [str(tp) for tp in tp_sizes])
    ax_tp.set_yscale("log", base=2)
    _bytes_axis(ax_tp)
    ax_tp.set_ylim(min(ideal) / 2, max(per_rank) * 4)
    ax_tp.set_xlabel("tp_size (GPUs)")
    ax_tp.set_ylabel(f"bytes per rank at {_context_label(tp_context)} tokens")
    ax_tp.set_title(f"(c) {tp_model} ({shape.kv_heads} KV heads) with tensor parallelism", fontsize=10)
    ax_tp.legend(handles=handles + ax_tp.get_legend_handles_labels()[0], fontsize=7, loc="upper right")
    fig.suptitle(f"KV-cache memory of published models ({dtype}, batch 1)", fontsize=12)
    return fig


def memory_rows(contexts=(2048, 4096, 8192, 32768), dtype="float16"):
    """``{model: [bytes at each context]}`` from :func:`kvref.memory.memory_table`, in preset order."""
    rows = {}
    for name, _, nbytes in memory.memory_table(contexts=contexts, dtype=dtype):
        rows.setdefault(name, []).append(nbytes)
    return rows


def tinyllama_row():
    """Seed 003's TinyLlama row against the published config, fp32, 2048 tokens, batch 1 (bytes)."""
    claimed_shape = CacheShape(layers=12, q_heads=12, kv_heads=12, head_dim=64)  # the seed's "12 layers, 12 heads"
    real = preset("tinyllama-1.1b", "float32")
    return {
        "claimed_text": "144 MB",
        "claimed_config": "12 layers, 12 heads, head_dim 64",
        "claimed_bytes": memory.cache_bytes(claimed_shape, 1, 2048),
        "correct_bytes": memory.cache_bytes(real, 1, 2048),
        "query_heads_bytes": memory.wrong_heads_bytes(real, 1, 2048),
        "config": f"{real.layers} layers, {real.q_heads} query heads, {real.kv_heads} KV heads, head_dim "
                  f"{real.head_dim}",
    }


# ---------------------------------------------------------------------------------------------------------------
# 2. Cost of decoding with and without a cache
# ---------------------------------------------------------------------------------------------------------------
def generation_counts(prompt_len=50, new_tokens=100, backend="cpu", seed=0):
    """Run the toy model both ways and return its recorded per-call work, checked against the closed forms.

    Returns a dict with ``cached`` and ``recompute`` (:class:`kvref.toy.GenerationResult`), ``same_tokens`` and
    the totals of :func:`kvref.toy.token_computations` and :func:`kvref.toy.attention_dot_products`.
    """
    from ..toy import ToyConfig, ToyModel, attention_dot_products, token_computations

    config = ToyConfig(max_tokens=max(256, prompt_len + new_tokens + 1))
    model = ToyModel(config)
    prompt = np.random.default_rng(seed).integers(0, config.vocab, prompt_len)
    cached = model.generate(prompt, new_tokens, use_cache=True, backend=backend)
    recompute = model.generate(prompt, new_tokens, use_cache=False)
    per_model = dict(layers=config.layers, q_heads=config.q_heads)
    totals = {
        "tokens_cached": token_computations(prompt_len, new_tokens, True),
        "tokens_recompute": token_computations(prompt_len, new_tokens, False),
        "dots_cached": attention_dot_products(prompt_len, new_tokens, True, **per_model),
        "dots_recompute": attention_dot_products(prompt_len, new_tokens, False, **per_model),
    }
    if (cached.token_computations, recompute.token_computations, cached.dot_products, recompute.dot_products) != (
            totals["tokens_cached"], totals["tokens_recompute"], totals["dots_cached"], totals["dots_recompute"]):
        raise AssertionError(f"recorded work differs from kvref.toy's closed forms: {totals}")
    return {"cached": cached, "recompute": recompute, "config": config, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "same_tokens": bool(np.array_equal(cached.tokens, recompute.tokens)),
            **totals}


def measure_decode_times(contexts=(16, 32, 64, 128, 256, 512), reps=3, backend="cpu", threads=1, seed=0,
                         max_seconds=1.0):
    """Wall time of one decode step of the toy model at each context length, cached vs full recompute.

    For context n: the cached step feeds token n to a cache already holding n tokens (``forward_cached``; the cache
    is cropped back to n between repetitions); the recompute step runs ``forward_full`` over all n + 1 tokens.
    The minimum over ``reps`` rounds is kept; a round visits every context once, so a burst of load from elsewhere
    hits one round rather than every repeat of one point, and a context whose recompute has already taken
    ``max_seconds`` is not repeated. ``threads`` sets Numba's thread count while measuring (restored afterwards):
    the toy's attention is far too small to gain from threads, and on a busy machine the pool only adds waiting.
    Returns a dict of lists (seconds) and the settings.
    """
    import numba

    from ..toy import ToyConfig, ToyModel

    contexts = [int(n) for n in contexts]
    config = ToyConfig(max_tokens=max(contexts) + 1)
    model = ToyModel(config)
    tokens = np.random.default_rng(seed).integers(0, config.vocab, max(contexts) + 1)
    caches = [model.new_cache(backend=backend, max_tokens=n + 1) for n in contexts]
    old_threads = numba.get_num_threads()
    if threads:
        numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
    cached = [np.inf] * len(contexts)
    recompute = [np.inf] * len(contexts)
    spent = [0.0] * len(contexts)
    try:
        for n, cache in zip(contexts, caches):
            model.forward_cached(tokens[:n], cache)  # prefill (and compile) outside the timed region
        for _ in range(reps):
            for i, (n, cache) in enumerate(zip(contexts, caches)):
                start = time.perf_counter()
                model.forward_cached(tokens[n:n + 1], cache)
                cached[i] = min(cached[i], time.perf_counter() - start)
                cache.crop(n)
                if spent[i] <= max_seconds:
                    start = time.perf_counter()
                    model.forward_full(tokens[:n + 1])
                    elapsed = time.perf_counter() - start
                    recompute[i] = min(recompute[i], elapsed)
                    spent[i] += elapsed
    finally:
        numba.set_num_threads(old_threads)
    return {"contexts": contexts, "cached_s": cached, "recompute_s": recompute, "backend": backend,
            "threads": threads or old_threads, "reps": reps, "config": config}


def cost_figure(counts=None, timings=None, prompt_len=50, new_tokens=100):
    """O(n) vs O(n^2) decode cost.

    (a) cumulative token-computations, (b) attention dot products per forward call and (c) cumulative, for
    ``prompt_len`` + ``new_tokens`` with and without the cache, as recorded by the toy model
    (:func:`generation_counts`), annotated with seed 002's numbers; (d) measured seconds per generated token
    (``timings`` from :func:`measure_decode_times`; the panel is left out when None).
    """
    counts = counts or generation_counts(prompt_len, new_tokens)
    P, N = counts["prompt_len"], counts["new_tokens"]
    cached, recompute = counts["cached"], counts["recompute"]
    per_dot = counts["config"].layers * counts["config"].q_heads
    fig = Figure(figsize=(13, 9) if timings else (15, 4.6), layout="constrained")
    axes = fig.subplots(2, 2).ravel() if timings else fig.subplots(1, 3)

    # x positions: recompute pass n (1..N) produces new token n; the cached calls are the prefill (x=0, it also
    # produces token 1) and decode step n (x=n) that feeds token n.
    x_re = np.arange(1, len(recompute.step_tokens) + 1)
    x_ca = np.arange(len(cached.step_tokens))
    ratio = counts["tokens_recompute"] / counts["tokens_cached"]

    seed_claim = N * (N + 1) // 2
    ax = axes[0]
    ax.plot(x_re, np.cumsum(recompute.step_tokens), color=RECOMPUTE_COLOR, label="no cache: pass n reruns P + n - 1")
    ax.plot(x_ca, np.cumsum(cached.step_tokens), color=CACHED_COLOR, label="cache: prefill P, then 1 per step")
    ax.plot(x_re, np.cumsum(x_re), ":", color=SEED_COLOR,
            label=f"seed 002: 1 + 2 + ... + n = {seed_claim:,} at n = {N} (prompt left out, \"33x\")")
    ax.annotate(f"{counts['tokens_recompute']:,}", (x_re[-1], counts["tokens_recompute"]), xytext=(-10, 0),
                textcoords="offset points", ha="right", va="center", color=RECOMPUTE_COLOR, fontweight="bold")
    ax.annotate(f"{counts['tokens_cached']:,}", (x_ca[-1], counts["tokens_cached"]), xytext=(0, 8),
                textcoords="offset points", ha="right", va="bottom", color=CACHED_COLOR, fontweight="bold")
    ax.set_xlabel("new tokens generated")
    ax.set_ylabel("token-computations, cumulative")
    ax.set_title(f"(a) P = {P} prompt + N = {N} new tokens: {counts['tokens_recompute']:,} vs "
                 f"{counts['tokens_cached']:,} = {ratio:.1f}x", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)

    ax = axes[1]
    ax.plot(x_re, np.asarray(recompute.step_dot_products) / per_dot, color=RECOMPUTE_COLOR,
            label="no cache: T(T+1)/2 per pass, O(n²)")
    ax.plot(x_ca[1:], np.asarray(cached.step_dot_products[1:]) / per_dot, color=CACHED_COLOR,
            label="cache: P + n per decode step, O(n)")
    ax.set_yscale("log")
    ax.set_xlabel("new tokens generated")
    ax.set_ylabel("q·k dot products per step (per layer & query head)")
    ax.set_title("(b) attention work per step", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    ax = axes[2]
    ax.plot(x_re, np.cumsum(recompute.step_dot_products) / per_dot, color=RECOMPUTE_COLOR, label="no cache: O(n³)")
    ax.plot(x_ca, np.cumsum(cached.step_dot_products) / per_dot, color=CACHED_COLOR,
            label="cache: O(n²), each causal pair once")
    for total, color in ((counts["dots_recompute"], RECOMPUTE_COLOR), (counts["dots_cached"], CACHED_COLOR)):
        ax.annotate(f"{total // per_dot:,}", (N, total / per_dot), xytext=(-4, -18), textcoords="offset points",
                    ha="right", va="top", color=color, fontweight="bold")
    ax.set_yscale("log")
    ax.set_xlabel("new tokens generated")
    ax.set_ylabel("q·k dot products, cumulative (per layer & query head)")
    ax.set_title(f"(c) total attention work: {counts['dots_recompute'] / counts['dots_cached']:.0f}x", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")

    if timings:
        ax = axes[3]
        n = np.asarray(timings["contexts"]) + 1
        ax.plot(n, np.asarray(timings["recompute_s"]) * 1e3, "o-", color=RECOMPUTE_COLOR,
                label="no cache: forward_full over n tokens")
        ax.plot(n, np.asarray(timings["cached_s"]) * 1e3, "o-", color=CACHED_COLOR,
                label=f"cache: forward_cached of 1 token (backend {timings['backend']!r}, "
                      f"{timings['threads']} Numba thread{'s' if timings['threads'] != 1 else ''})")
        # an n² line through the recompute points of the upper half (geometric mean of time / n²)
        upper = slice(len(n) // 2, None)
        c2 = np.exp(np.mean(np.log(np.asarray(timings["recompute_s"])[upper] * 1e3 / n[upper] ** 2.0)))
        ax.plot(n, c2 * n ** 2.0, ":", color=SEED_COLOR, label="slope of n²")
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [str(v) for v in n])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("context length n (tokens, the new one included)")
        ax.set_ylabel("ms per generated token (min of repeats)")
        c = timings["config"]
        ax.set_title(f"(d) measured: toy model, {c.layers} layers, d_model {c.d_model}, {c.q_heads} q / "
                     f"{c.kv_heads} kv heads x {c.head_dim}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3, which="both")
        ax.text(0.98, 0.2, "the cached step still reads all n cached K/V rows (O(n));\n"
                "at toy size its fixed per-step cost hides that", transform=ax.transAxes, ha="right",
                va="bottom", fontsize=8, color=CACHED_COLOR)
    fig.suptitle("Generating with and without a KV cache (kvref.toy)", fontsize=12)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 3. A FlatCache's length across append, overflow, crop and reset
# ---------------------------------------------------------------------------------------------------------------
def flat_timeline_events(max_tokens=16, backend="python", seed=0):
    """Drive a real FlatCache and record its length after every operation.

    Returns a list of dicts: op (label), kind (append|rejected|crop|reset), tokens (asked for), length (after),
    seed001 (the position seed 001's cache would hold after the same call: for a rejected append it has already
    added before checking). Rejected appends and resets are verified against the cache's full state.
    """
    rng = np.random.default_rng(seed)
    shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8)
    cache = FlatCache(shape, batch=1, max_tokens=max_tokens, backend=backend)
    events = [{"op": "new", "kind": "reset", "tokens": 0, "length": 0, "seed001": 0}]

    def append(n):
        dims = (shape.layers, 1, n, shape.kv_heads, shape.head_dim)
        before = cache.state()
        try:
            cache.append(rng.standard_normal(dims).astype(np.float32), rng.standard_normal(dims).astype(np.float32))
        except CacheOverflowError:
            after = cache.state()
            if not (np.array_equal(before["kv"], after["kv"]) and np.array_equal(before["lengths"], after["lengths"])
                    and before["version"] == after["version"]):
                raise AssertionError("a rejected append changed the cache") from None
            events.append({"op": f"append {n} (rejected)", "kind": "rejected", "tokens": n,
                           "length": cache.get_seq_length(), "seed001": int(before["lengths"][0]) + n})
            return
        events.append({"op": "prefill" if n > 1 and before["lengths"][0] == 0 else f"append {n}", "kind": "append",
                       "tokens": n, "length": cache.get_seq_length(), "seed001": cache.get_seq_length()})

    def shrink(kind, arg=None):
        before = cache.kv.copy()
        prefix = cache.keys(0)
        if kind == "crop":
            cache.crop(arg)
            if not np.array_equal(cache.keys(0), prefix[:, :cache.get_seq_length()]):
                raise AssertionError("crop changed the kept tokens")
            label = f"crop({arg})"
        else:
            cache.reset()
            label = "reset()"
        if not np.array_equal(before, cache.kv):  # O(1): only the length changes, no slot is zeroed
            raise AssertionError(f"{label} touched the K/V buffer")
        events.append({"op": label, "kind": kind, "tokens": 0, "length": cache.get_seq_length(),
                       "seed001": cache.get_seq_length()})

    append(6)
    for _ in range(3):
        append(1)
    append(4)
    append(1)
    append(4)  # 14 + 4 > 16: rejected, nothing changes
    append(1)
    append(1)  # full
    append(1)  # rejected
    shrink("crop", max_tokens - 6)
    append(1)
    append(1)
    shrink("crop", -4)
    shrink("reset")
    append(5)
    append(1)
    append(1)
    return events


def flat_timeline_figure(events=None, max_tokens=16):
    """Length of a FlatCache after each operation (:func:`flat_timeline_events`), with seed 001's position after
    the same rejected calls."""
    events = events or flat_timeline_events(max_tokens)
    fig = Figure(figsize=(15, 5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(events))
    lengths = [e["length"] for e in events]
    ax.step(x, lengths, where="post", color=CACHED_COLOR, lw=1.5, alpha=0.6)
    ax.axhline(max_tokens, color="k", ls="--", lw=1)
    ax.text(0, max_tokens + 0.2, f"max_tokens = {max_tokens}", va="bottom", fontsize=9)
    styles = {"append": ("o", CACHED_COLOR, "append (plan / write / advance)"),
              "rejected": ("s", "#ff7f0e", "overflow: plan() raises first, length unchanged"),
              "crop": ("v", "#2ca02c", "crop: keeps a prefix, O(1)"),
              "reset": ("D", "#9467bd", "reset: length = 0, O(1), no slot zeroed")}
    for kind, (marker, color, label) in styles.items():
        idx = [i for i, e in enumerate(events) if e["kind"] == kind]
        ax.plot(x[idx], [lengths[i] for i in idx], marker, color=color, ms=8, ls="none", label=label, zorder=3)
    first = True
    for i, e in enumerate(events):
        if e["kind"] == "rejected":
            ax.plot([x[i], x[i]], [e["length"], e["seed001"]], ":", color=RECOMPUTE_COLOR)
            ax.plot(x[i], e["seed001"], "x", color=RECOMPUTE_COLOR, ms=10, mew=2,
                    label="seed 001: position_ after the exception (past the end)" if first else None)
            ax.annotate(f"seed 001: {e['seed001']}", (x[i], e["seed001"]), xytext=(6, 0),
                        textcoords="offset points", va="center", fontsize=8, color=RECOMPUTE_COLOR)
            first = False
    ax.set_xticks(x, [e["op"] for e in events], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(-0.5, max(e["seed001"] for e in events) + 1.5)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("tokens stored (length)")
    ax.set_xlabel("operation, in order (a real FlatCache, recorded after each call)")
    ax.set_title("FlatCache: slot = position; overflow is rejected before any change; crop and reset move only the "
                 "length", fontsize=11)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 4. Head-major vs token-major layout
# ---------------------------------------------------------------------------------------------------------------
def layouts_figure(kv_heads=3, max_tokens=6, head_dim=4, read_head=1, read_tokens=4):
    """Element offsets of one layer's K block in both layouts (``kvref.shapes.element_offset``).

    Top: the offset of element 0 of every (head, slot). Bottom: memory in address order, each cell coloured by its
    head and labelled with its token; outlined cells are what decode attention of head ``read_head`` reads
    (tokens 0 .. read_tokens-1): one contiguous run in head-major, ``read_tokens`` strided pieces in token-major.
    """
    shape = CacheShape(layers=1, q_heads=kv_heads, kv_heads=kv_heads, head_dim=head_dim)
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(13, 5.6), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[2.2, 1])
    head_colors = ["#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94"]
    n_elems = kv_heads * max_tokens * head_dim
    for col, layout in enumerate(("head_major", "token_major")):
        offsets = np.array([[element_offset(shape, 1, max_tokens, 0, 0, 0, h, s, 0, layout) // shape.element_bytes
                             for s in range(max_tokens)] for h in range(kv_heads)])
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(offsets, cmap="viridis", aspect="auto", vmin=0, vmax=n_elems)
        for h in range(kv_heads):
            for s in range(max_tokens):
                ax.text(s, h, str(offsets[h, s]), ha="center", va="center", fontsize=9,
                        color="white" if offsets[h, s] < n_elems * 0.6 else "black")
        ax.set_xticks(range(max_tokens), [f"t{s}" for s in range(max_tokens)])
        ax.set_yticks(range(kv_heads), [f"head {h}" for h in range(kv_heads)])
        ax.set_xlabel("token slot (number: element offset of dim 0 of that head and slot)")
        stride = head_dim if layout == "head_major" else kv_heads * head_dim
        formula = ("(head·max_tokens + slot)·head_dim + dim" if layout == "head_major"
                   else "(slot·kv_heads + head)·head_dim + dim")
        ax.set_title(f"{layout.replace('_', '-')}: offset = {formula}\n"
                     f"next token of a head is {stride} elements further", fontsize=10)

        ax = fig.add_subplot(grid[1, col])
        read = set()
        for s in range(read_tokens):
            start = element_offset(shape, 1, max_tokens, 0, 0, 0, read_head, s, 0, layout) // shape.element_bytes
            read.update(range(start, start + head_dim))
        for h in range(kv_heads):
            for s in range(max_tokens):
                start = element_offset(shape, 1, max_tokens, 0, 0, 0, h, s, 0, layout) // shape.element_bytes
                ax.add_patch(Rectangle((start, 0), head_dim, 1, facecolor=head_colors[h % len(head_colors)],
                                       edgecolor="white", lw=1.5))
                ax.text(start + head_dim / 2, 0.5, f"h{h}\nt{s}", ha="center", va="center", fontsize=7, zorder=5)
        for d in range(n_elems):
            ax.plot([d, d], [0, 0.12], color="white", lw=0.5)
        runs = _runs(sorted(read))
        for first, last in runs:
            ax.add_patch(Rectangle((first, 0), last - first + 1, 1, fill=False, edgecolor="black", lw=2.2, zorder=4))
        ax.set_xlim(0, n_elems)
        ax.set_ylim(-0.05, 1.05)
        ax.set_yticks([])
        ax.set_xticks(range(0, n_elems + 1, head_dim * kv_heads))
        ax.set_xlabel(f"memory: element offset in address order ({head_dim} elements per head and token)")
        ax.set_title(f"reading head {read_head}, tokens 0..{read_tokens - 1} (outlined): "
                     f"{len(runs)} contiguous run{'s' if len(runs) > 1 else ''} of "
                     f"{(runs[0][1] - runs[0][0] + 1)} elements", fontsize=10)
    fig.suptitle(f"K block of one layer: {kv_heads} KV heads x {max_tokens} slots x head_dim {head_dim} "
                 "(kvref stores head-major; seed 001 was token-major)", fontsize=12)
    return fig


def _runs(addrs):
    runs = []
    for a in addrs:
        if runs and a == runs[-1][1] + 1:
            runs[-1][1] = a
        else:
            runs.append([a, a])
    return runs


# ---------------------------------------------------------------------------------------------------------------
# 5. A RingCache's slots across decode steps and a chunked prefill that wraps
# ---------------------------------------------------------------------------------------------------------------
#: token counts of the steps :func:`ring_timeline_events` feeds by default: a prefill of 3, decode steps up to
#: p = W + 1, a chunked prefill of 6 that wraps (deferred), then decode steps at p = 2W and 2W + 1 (W = 8)
RING_TIMELINE_STEPS = (3, 1, 1, 1, 1, 1, 1, 1, 6, 1, 1)


def ring_timeline_events(window=8, sinks=0, steps=RING_TIMELINE_STEPS, backend="python", seed=0):
    """Drive a real RingCache (1 sequence) through ``steps`` (tokens per step) and record its slots after each.

    Returns a list of dicts: op (label), tokens, positions (of the step), slots (from plan; -1: not stored),
    deferred, length (after), slot_positions (layer 0, after: the position each slot holds, -1 empty),
    overwritten (list of (slot, old position, new position)) and max_error (the step's attention, every layer,
    against :func:`reference_attention` with the window rule over everything fed). The first entry is the new,
    empty cache. Every layer's slots are checked to agree, and the held positions to be the first S and the last
    W - S positions fed.
    """
    rng = np.random.default_rng(seed)
    shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8)
    cache = RingCache(shape, batch=1, window=window, sinks=sinks, backend=backend)
    scale = 1.0 / np.sqrt(shape.head_dim)
    fed = [[np.zeros((shape.kv_heads, 0, shape.head_dim))] * 2 for _ in range(shape.layers)]
    events = [{"op": "new", "tokens": 0, "positions": [], "slots": [], "deferred": False, "length": 0,
               "slot_positions": cache.slot_positions[0, 0].tolist(), "overwritten": [], "max_error": 0.0}]
    for num_tokens in steps:
        before = cache.slot_positions[0, 0].tolist()
        step = cache.plan(num_tokens)
        worst = 0.0
        for layer in range(shape.layers):
            dims = (1, num_tokens, shape.kv_heads, shape.head_dim)
            k = rng.standard_normal(dims).astype(np.float32)
            v = rng.standard_normal(dims).astype(np.float32)
            q = rng.standard_normal((1, num_tokens, shape.q_heads, shape.head_dim)).astype(np.float32)
            cache.write(step, layer, k, v)
            out = cache.attend(step, layer, q)
            fed[layer] = [np.concatenate([fed[layer][0], k[0].transpose(1, 0, 2)], axis=1),
                          np.concatenate([fed[layer][1], v[0].transpose(1, 0, 2)], axis=1)]
            expected = reference_attention(q[0], fed[layer][0], fed[layer][1], step.positions[0], scale, window, sinks)
            worst = max(worst, float(np.max(np.abs(out[0] - expected))))
        cache.advance(step)
        after = cache.slot_positions
        n = cache.get_seq_length()
        expected_held = list(range(n)) if n <= window else list(range(sinks)) + list(range(n - (window - sinks), n))
        if not (after == after[0]).all():
            raise AssertionError("the layers of the ring hold different positions")
        if cache.held_positions().tolist() != expected_held:
            raise AssertionError(f"the ring holds {cache.held_positions().tolist()}, expected {expected_held}")
        now = after[0, 0].tolist()
        positions = step.positions[0].tolist()
        label = f"p {positions[0]}" if num_tokens == 1 else f"p {positions[0]}..{positions[-1]}"
        kind = "decode" if num_tokens == 1 else ("prefill" if positions[0] == 0 else "chunk")
        events.append({"op": f"{kind} {label}" + (" (deferred)" if step.deferred else ""), "tokens": num_tokens,
                       "positions": positions, "slots": step.slots[0].tolist(), "deferred": bool(step.deferred),
                       "length": n, "slot_positions": now, "max_error": worst,
                       "overwritten": [(s, before[s], now[s]) for s in range(window) if 0 <= before[s] != now[s]]})
    return events


def _lap_colors():
    return ["#c6dbef", "#fdd0a2", "#c7e9c0", "#dadaeb", "#fcbba1"]


def ring_timeline_figure(window=8, sinks=2, steps=RING_TIMELINE_STEPS):
    """Which position each slot of a real RingCache holds after each step (:func:`ring_timeline_events`): (a)
    without sinks, slot = p % W; (b) with ``sinks`` attention sinks. Overwritten slots are outlined in red; the
    steps reaching p = W - 1, W, W + 1 and 2W are marked."""
    from matplotlib.patches import Rectangle

    panels = [(0, ring_timeline_events(window, 0, steps)), (sinks, ring_timeline_events(window, sinks, steps))]
    fig = Figure(figsize=(15, 9.5), layout="constrained")
    axes = fig.subplots(2, 1)
    marks = {window - 1: "W-1", window: "W", window + 1: "W+1", 2 * window: "2W"}
    laps = _lap_colors()
    for ax, (s, events) in zip(axes, panels):
        ring = window - s
        x_count = len(events)
        for x, e in enumerate(events):
            written = {slot for slot in e["slots"] if slot >= 0}
            overwritten = {slot: old for slot, old, _ in e["overwritten"]}
            for slot, p in enumerate(e["slot_positions"]):
                if p < 0:
                    color, text = "white", "·"
                elif p < s:
                    color, text = "#bdbdbd", f"{p}\nsink"
                else:
                    color, text = laps[((p - s) // ring) % len(laps)], str(p)
                if slot in overwritten:
                    text += f"\nwas {overwritten[slot]}"
                edge, lw = ("#d62728", 2.6) if slot in overwritten else (("black", 1.4) if slot in written
                                                                       else ("#dddddd", 0.8))
                ax.add_patch(Rectangle((x - 0.5, slot - 0.5), 1, 1, facecolor=color, edgecolor=edge, lw=lw,
                                       zorder=3 if edge != "#dddddd" else 2))
                ax.text(x, slot, text, ha="center", va="center", fontsize=8 if "\n" not in text else 7, zorder=4)
            hit = [f"p = {marks[p]} = {p}" for p in e["positions"] if p in marks]
            if hit:
                ax.annotate("\n".join(hit), (x, -0.5), xytext=(0, 4), textcoords="offset points", ha="center",
                            va="bottom", fontsize=8, color="#d62728" if e["overwritten"] else "black",
                            fontweight="bold")
        ax.set_xlim(-0.5, x_count - 0.5)
        ax.set_ylim(window - 0.5, -0.5)
        ax.set_xticks(range(x_count), [e["op"].replace(" (deferred)", "\n(deferred)") for e in events],
                      rotation=0, fontsize=7.5)
        ax.set_yticks(range(window), [f"slot {i}" for i in range(window)], fontsize=8)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        worst = max(e["max_error"] for e in events)
        if s == 0:
            title = f"(a) W = {window}, no sinks: position p goes to slot p % {window} (colour: lap p // {window})"
        else:
            title = (f"(b) W = {window}, S = {s} sinks: positions 0..{s - 1} keep slots 0..{s - 1}; "
                     f"slot = {s} + (p - {s}) % {ring} for the rest")
        ax.set_title(f"{title}    attention vs float64 window reference: max |error| {worst:.1e}", fontsize=10,
                     pad=30)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="white", edgecolor="black", lw=1.4, label="written by this step"),
               Patch(facecolor="white", edgecolor="#d62728", lw=2.6,
                     label="overwritten: the old position has just left the window"),
               Patch(facecolor="white", edgecolor="#dddddd", label="· empty (stored position -1)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=9)
    fig.suptitle("RingCache slots after each step (a real cache, python backend, recorded from slot_positions)",
                 fontsize=12)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 6. Ring memory: flat in n past W
# ---------------------------------------------------------------------------------------------------------------
def ring_memory_samples(window=16, total=64, chunk_at=40, chunk=6, backend="python", dtype="float16"):
    """Drive a small real RingCache one token at a time (with one deferred chunk of ``chunk`` tokens from length
    ``chunk_at``) and sample its memory after every step.

    Returns a dict: shape, window, and lists n (tokens fed), nbytes (``cache.nbytes``), position_bytes, held_bytes
    (slots holding a position, from ``slot_positions``, times the bytes of one token), flat_nbytes (``nbytes`` of a
    FlatCache allocated for n tokens), and pending (n before, bytes held aside while the deferred chunk is written).
    """
    shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8, dtype=dtype)
    cache = RingCache(shape, batch=1, window=window, backend=backend)
    rng = np.random.default_rng(0)
    samples = {"shape": shape, "window": window, "n": [], "nbytes": [], "position_bytes": [], "held_bytes": [],
               "flat_nbytes": [], "pending": None}
    while cache.get_seq_length() < total:
        num_tokens = chunk if cache.get_seq_length() == chunk_at else 1
        step = cache.plan(num_tokens)
        dims = (1, num_tokens, shape.kv_heads, shape.head_dim)
        for layer in range(shape.layers):
            k = rng.standard_normal(dims).astype(shape.public_dtype)
            cache.write(step, layer, k, k)
        if step.deferred:
            samples["pending"] = (cache.get_seq_length(), cache.stats()["pending_bytes"])
        cache.advance(step)
        n = cache.get_seq_length()
        stats = cache.stats()
        samples["n"].append(n)
        samples["nbytes"].append(cache.nbytes)
        samples["position_bytes"].append(stats["position_bytes"])
        samples["held_bytes"].append(int((cache.slot_positions[0, 0] >= 0).sum()) * cache.token_bytes)
        samples["flat_nbytes"].append(FlatCache(shape, batch=1, max_tokens=n, backend=backend).nbytes)
    return samples


def ring_memory_figure(model="mistral-7b", window=4096, dtype="float16", max_tokens=32768, samples=None):
    """(a) K/V bytes of ``model`` vs tokens generated n: a flat cache needs n slots, a ring of W = ``window`` slots
    stays at ``kvref.memory.ring_bytes`` (formulas, nothing allocated); (b) a small real RingCache's measured
    ``nbytes`` sampled while it is fed past W (:func:`ring_memory_samples`), over the same formulas."""
    shape = preset(model, dtype)
    fig = Figure(figsize=(15, 5.2), layout="constrained")
    ax_model, ax_small = fig.subplots(1, 2)

    n = np.linspace(0, max_tokens, 257).astype(int)
    per_token = memory.bytes_per_token(shape)
    ring_total = memory.ring_bytes(shape, 1, window)
    positions = memory.ring_position_bytes(shape, 1, window)
    ax_model.plot(n, n * per_token, color=RECOMPUTE_COLOR, lw=2,
                  label="flat cache: n slots, cache_bytes(n) = n · bytes_per_token")
    ax_model.plot(n, np.minimum(n, window) * per_token, color=CACHED_COLOR, lw=2,
                  label=f"ring: slots in use, min(n, W) · bytes_per_token")
    ax_model.axhline(ring_total, color=CACHED_COLOR, ls="--", lw=1,
                     label=f"ring allocated: ring_bytes(W) = {short_bytes(ring_total)} "
                           f"(+ {short_bytes(positions)} int64 slot positions)")
    ax_model.axvline(window, color="k", ls=":", lw=1)
    ax_model.text(window, max_tokens * per_token * 0.6, f"  n = W = {window}", fontsize=9, va="top")
    flat_end = max_tokens * per_token
    ax_model.annotate(f"{short_bytes(flat_end)}", (max_tokens, flat_end), xytext=(-6, 0), textcoords="offset points",
                      ha="right", va="center", color=RECOMPUTE_COLOR, fontweight="bold")
    ax_model.annotate(f"{short_bytes(ring_total)} ({flat_end / ring_total:.0f}x less at n = "
                      f"{_context_label(max_tokens)})", (max_tokens, ring_total), xytext=(-6, 8),
                      textcoords="offset points", ha="right", va="bottom", color=CACHED_COLOR, fontweight="bold")
    ax_model.set_xticks(np.arange(0, max_tokens + 1, max_tokens // 8),
                        [_context_label(int(v)) for v in np.arange(0, max_tokens + 1, max_tokens // 8)])
    memory_ticks = np.arange(0, flat_end * 1.05, max(memory.GIB // 2, flat_end // 8))
    ax_model.set_yticks(memory_ticks)
    _bytes_axis(ax_model)
    ax_model.set_ylim(0, flat_end * 1.05)
    ax_model.set_xlabel("tokens generated n (batch 1)")
    ax_model.set_ylabel(f"K/V bytes ({dtype})")
    ax_model.set_title(f"(a) {model} ({shape.layers}L, {shape.kv_heads} KV heads x {shape.head_dim}), "
                       f"sliding window W = {window}: formulas", fontsize=10)
    ax_model.legend(fontsize=8, loc="upper left")
    ax_model.grid(alpha=0.3)

    samples = samples or ring_memory_samples()
    small, w = samples["shape"], samples["window"]
    ns = np.asarray(samples["n"])
    line = np.arange(0, ns.max() + 1)
    ax_small.plot(line, [memory.cache_bytes(small, 1, int(v)) if v else 0 for v in line], color=RECOMPUTE_COLOR,
                  lw=1.5, label="flat formula: cache_bytes(n)")
    ax_small.plot(ns, samples["flat_nbytes"], "o", color=RECOMPUTE_COLOR, ms=3.5, mfc="none",
                  label="measured: FlatCache(max_tokens=n).nbytes")
    ax_small.plot(line, np.full(line.shape, memory.ring_bytes(small, 1, w)), color=CACHED_COLOR, lw=1.5,
                  label=f"ring formula: ring_bytes(W = {w})")
    ax_small.plot(ns, samples["nbytes"], "o", color=CACHED_COLOR, ms=4, label="measured: RingCache.nbytes")
    ax_small.plot(ns, samples["held_bytes"], "s", color="#2ca02c", ms=3, mfc="none",
                  label="measured: slots holding a position (slot_positions >= 0) · bytes per token")
    if samples["pending"]:
        at, extra = samples["pending"]
        ax_small.plot([at], [samples["nbytes"][0] + extra], "^", color="#ff7f0e", ms=9,
                      label=f"during the deferred chunk at n = {at}: nbytes + {short_bytes(extra)} held aside")
    ax_small.axvline(w, color="k", ls=":", lw=1)
    ax_small.text(w, max(samples["flat_nbytes"]) * 0.6, f"  n = W = {w}", fontsize=9, va="top")
    top = max(samples["flat_nbytes"])
    tick = 1024 if top > 4096 else 256
    ax_small.set_yticks(np.arange(0, top * 1.05, tick))
    _bytes_axis(ax_small)
    ax_small.set_xlabel("tokens fed n (decode steps and one chunk)")
    ax_small.set_ylabel(f"bytes ({small.dtype})")
    ax_small.set_title(f"(b) measured: a real RingCache ({small.layers}L, {small.kv_heads} KV heads x "
                       f"{small.head_dim}, {small.dtype}, W = {w}) fed past W\nplus "
                       f"{short_bytes(samples['position_bytes'][-1])} of int64 slot positions = ring_position_bytes "
                       f"(stats()['position_bytes'])", fontsize=10)
    ax_small.legend(fontsize=8, loc="upper left")
    ax_small.grid(alpha=0.3)
    fig.suptitle("Ring cache memory stays flat in n once past W; a flat cache grows with n", fontsize=12)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 7. One window, several conventions
# ---------------------------------------------------------------------------------------------------------------
def window_masks(T=10, window=4, sinks=2):
    """Visibility masks (T x T, query row i, key column j) of the same nominal window W in several conventions.

    ``kvref`` and ``kvref_sinks`` come from :func:`kvref.attention.visible`; the others are computed here from each
    system's own definition (``kvref/ring.py`` tabulates them). Returns a dict name -> dict(mask, title, keys
    (most keys any row sees)). The sink mask is also checked against StreamingLLM's cache
    ``[0:start_size] + [seq_len - recent_size : seq_len]``.
    """
    from ..attention import visible

    i, j = np.indices((T, T))
    W, S = window, sinks
    kvref_mask = np.array([[visible(a, b, W) for b in range(T)] for a in range(T)])
    sink_mask = np.array([[visible(a, b, W, S) for b in range(T)] for a in range(T)])
    streaming = np.zeros((T, T), bool)
    for a in range(T):
        seq_len = a + 1  # the query's own key is in the cache when it attends
        kept = set(range(min(S, seq_len))) | set(range(max(0, seq_len - (W - S)), seq_len))
        streaming[a, sorted(kept)] = True
    if not np.array_equal(sink_mask, streaming):
        raise AssertionError("kvref's sink rule differs from StreamingLLM's cache")
    masks = {
        "kvref": (kvref_mask, f"kvref: window = {W}\ni - W < j <= i"),
        # FlashAttention: key j is attended iff i - window_size_left <= j <= i + window_size_right (causal: right 0)
        "flash_left": ((j >= i - (W - 1)) & (j <= i), f"FlashAttention window_size_left = W - 1 = {W - 1}\n"
                                                      "i - left <= j <= i"),
        # llama.cpp SWA: masked iff pos - cell.pos >= n_swa; HF sliding_window_overlay: kv_idx > q_idx - W
        "llama_cpp": ((j <= i) & (i - j < W), f"llama.cpp n_swa = {W} / HF sliding_window = {W}\n"
                                              "masked iff i - j >= n_swa"),
        # transformers#39408: window_size=(W, W) with causal=True
        "flash_misuse": ((j >= i - W) & (j <= i + W) & (j <= i), f"FlashAttention window_size = (W, W) = ({W}, {W}),"
                                                                 " causal\nthe misuse of transformers #39408"),
        # mistral-src one_file_ref.py: mask = triu(tril(ones, 0), diagonal=-sliding_window)
        "mistral_ref": (np.triu(np.tril(np.ones((T, T)), 0), -W) > 0, f"Mistral reference prefill mask\n"
                                                                      f"triu(tril(1), diagonal=-{W})"),
        "kvref_sinks": (sink_mask, f"kvref: window = {W}, sinks = {S} (StreamingLLM\nstart_size = {S}, "
                                   f"recent_size = {W - S})"),
    }
    return {name: {"mask": m, "title": title, "keys": int(m.sum(axis=1).max())} for name, (m, title) in masks.items()}


def window_conventions_figure(T=10, window=4, sinks=2):
    """The masks of :func:`window_masks` side by side; keys outside kvref's W-key window are red, sink keys grey."""
    masks = window_masks(T, window, sinks)
    reference = masks["kvref"]["mask"]
    fig = Figure(figsize=(14, 9.6), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["white", CACHED_COLOR, "#d62728", "#7f7f7f"])
    for ax, (name, m) in zip(axes, masks.items()):
        mask = m["mask"]
        image = np.where(mask, 1, 0)
        image[mask & ~reference] = 2  # a key kvref's window (and a W-slot ring) does not have
        if name == "kvref_sinks":
            rows, cols = np.indices((T, T))
            image[mask & (cols < sinks) & (rows - cols >= window - sinks)] = 3  # kept only because it is a sink
        ax.imshow(image, cmap=cmap, vmin=0, vmax=3)
        ax.set_xticks(np.arange(-0.5, T, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, T, 1), minor=True)
        ax.grid(which="minor", color="#cccccc", lw=0.6)
        ax.tick_params(which="minor", length=0)
        ax.set_xticks(range(T))
        ax.set_yticks(range(T))
        ax.tick_params(labelsize=7)
        counts = mask.sum(axis=1)
        for row, c in enumerate(counts):
            ax.text(T - 0.3, row, str(c), va="center", ha="left", fontsize=7,
                    color="#d62728" if c > window else "black")
        ax.set_xlabel("key position j", fontsize=8)
        ax.set_ylabel("query position i", fontsize=8)
        bad = m["keys"] > window
        ax.set_title(f"{m['title']}\nkeys per row: {m['keys']} = W{' + 1' if m['keys'] == window + 1 else ''}"
                     f"{'  (a W-slot ring holds W)' if bad else ''}", fontsize=9,
                     color="#d62728" if bad else "black")
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=CACHED_COLOR, label="visible, inside kvref's window"),
                        Patch(color="#d62728", label="visible here but not in kvref's W keys (j = i - W)"),
                        Patch(color="#7f7f7f", label="sink: kept although older than the last W - S")],
               loc="outside lower center", ncol=3, fontsize=9)
    fig.suptitle(f"The same window W = {window} in different conventions (T = {T} tokens; numbers at the right: "
                 "keys per row)", fontsize=12)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 8. Chunked prefill through a ring (rasbt/LLMs-from-scratch #1013)
# ---------------------------------------------------------------------------------------------------------------
def chunked_prefill_events(window=4, prefix=3, chunk=3, backend="python", seed=0):
    """A ring of W = ``window`` slots after ``prefix`` tokens takes a chunk of ``chunk`` tokens.

    Returns a dict: window, prefix, chunk, queries (the chunk's positions), needed (query -> key positions the
    window rule gives, written out here: max(0, i - W + 1) .. i), ring_before (slot -> position), write_first
    (slot -> position once the chunk is written at slot p % W before attending, as a naive ring would),
    deferred (kvref's plan), kvref_sees (query -> positions the ring plus the held-aside chunk offer),
    write_first_sees, missing (query -> needed positions the write-first ring no longer holds), and the max
    |error| of kvref's attention (``kvref_error``) and of write-first attention (``write_first_error``, the spec's
    own ``write_tokens`` / ``attend_tokens`` run in that order) against :func:`reference_attention`.
    """
    from .. import ring

    rng = np.random.default_rng(seed)
    shape = CacheShape(layers=1, q_heads=2, kv_heads=1, head_dim=8)
    scale = np.float32(1.0 / np.sqrt(shape.head_dim))
    cache = RingCache(shape, batch=1, window=window, backend=backend)
    k_all = rng.standard_normal((1, prefix + chunk, 1, shape.head_dim)).astype(np.float32)
    v_all = rng.standard_normal((1, prefix + chunk, 1, shape.head_dim)).astype(np.float32)
    q = rng.standard_normal((1, chunk, shape.q_heads, shape.head_dim)).astype(np.float32)
    if prefix:
        step = cache.plan(prefix)
        cache.write(step, 0, k_all[:, :prefix], v_all[:, :prefix])
        cache.advance(step)
    ring_before = cache.slot_positions[0, 0].tolist()
    kv_before = np.array(cache.kv)
    positions_before = np.array(cache.slot_positions)

    step = cache.plan(chunk)
    cache.write(step, 0, k_all[:, prefix:], v_all[:, prefix:])
    out = cache.attend(step, 0, q)
    cache.advance(step)
    queries = step.positions[0].tolist()
    expected = reference_attention(q[0], k_all[0].transpose(1, 0, 2), v_all[0].transpose(1, 0, 2), queries, scale,
                                   window)

    # a write-first ring: every chunk token to slot p % W, then attend (the spec's functions, in that order)
    write_first = list(ring_before)
    for p in queries:
        write_first[p % window] = p
    kv = kv_before.copy()
    slot_positions = positions_before.copy()
    slots = np.array([[p % window for p in queries]], np.int64)
    seq_ids = np.zeros(1, np.int64)
    ring.write_tokens(kv, slot_positions, 0, seq_ids, step.positions, slots, k_all[:, prefix:], v_all[:, prefix:])
    if slot_positions[0, 0].tolist() != write_first:
        raise AssertionError("write_tokens did not store p at slot p % W")
    naive = np.zeros_like(out)
    empty = np.zeros((1, 0, 1, shape.head_dim), np.float32)
    ring.attend_tokens(kv, slot_positions, 0, seq_ids, step.positions, empty, empty, window, 0, q, scale, naive)

    needed = {i: list(range(max(0, i - window + 1), i + 1)) for i in queries}
    offered = sorted({p for p in ring_before if p >= 0} | set(queries))
    return {
        "window": window, "prefix": prefix, "chunk": chunk, "queries": queries, "needed": needed,
        "ring_before": ring_before, "write_first": write_first, "deferred": bool(step.deferred),
        "kvref_sees": {i: [p for p in offered if p in needed[i]] for i in queries},
        "write_first_sees": {i: [p for p in sorted(write_first) if p in needed[i]] for i in queries},
        "missing": {i: [p for p in needed[i] if p not in write_first] for i in queries},
        "kvref_error": float(np.max(np.abs(out[0] - expected))),
        "write_first_error": float(np.max(np.abs(naive[0] - expected))),
    }


def chunked_prefill_figure(window=4, prefix=3, chunk=3):
    """For each query of the chunk (:func:`chunked_prefill_events`): the keys it needs against the keys a write-first
    ring still holds (missing ones in red), and against what kvref's deferred step offers."""
    from matplotlib.patches import Rectangle

    ev = chunked_prefill_events(window, prefix, chunk)
    queries, n = ev["queries"], prefix + chunk
    fig = Figure(figsize=(14, 4.9), layout="constrained")
    axes = fig.subplots(1, 2)
    overwritten_by = {old: new for old, new in zip(ev["ring_before"], ev["write_first"]) if 0 <= old != new}
    for ax, mode in zip(axes, ("write_first", "kvref")):
        held = set(ev["write_first"]) if mode == "write_first" else (set(ev["ring_before"]) | set(queries))
        for r, i in enumerate(queries):
            for j in range(n):
                need = j in ev["needed"][i]
                if need and j in held:
                    color, text = "#a1d99b", "needed\nheld"
                elif need:
                    now = overwritten_by.get(j, "?")
                    color, text = "#d62728", f"needed\ngone: slot {j % ev['window']}\nnow holds {now}"
                elif j in held and j > i:
                    color, text = "#eeeeee", "held\nfuture"
                elif j in held:
                    color, text = "#eeeeee", "held\nout of\nwindow"
                else:
                    color, text = "white", ""
                ax.add_patch(Rectangle((j - 0.5, r - 0.5), 1, 1, facecolor=color, edgecolor="#999999"))
                ax.text(j, r, text, ha="center", va="center", fontsize=7,
                        color="white" if color == "#d62728" else "black")
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_ylim(len(queries) - 0.5, -0.5)
        ax.set_xticks(range(n), [f"key {j}" + ("\n(chunk)" if j >= prefix else "") for j in range(n)], fontsize=8)
        ax.set_yticks(range(len(queries)), [f"query {i}" for i in queries], fontsize=8)
        ax.tick_params(length=0)
        if mode == "write_first":
            slots = ", ".join(f"{s}:{p}" for s, p in enumerate(ev["write_first"]))
            missing = sum(len(v) for v in ev["missing"].values())
            ax.set_title(f"write the chunk first (slot p % {window}), then attend\nring = {{{slots}}}: "
                         f"{missing} needed keys overwritten\nmax |error| vs float64 {ev['write_first_error']:.2f}",
                         fontsize=10, color="#d62728")
        else:
            before = ", ".join(f"{s}:{p}" for s, p in enumerate(ev["ring_before"]))
            ax.set_title(f"kvref: plan() defers the step (deferred = {ev['deferred']}): attend reads the ring\nas it "
                         f"was {{{before}}} + the held-aside chunk; advance() writes it\nmax |error| vs float64 "
                         f"{ev['kvref_error']:.1e}", fontsize=10)
    fig.suptitle(f"Chunked prefill through a ring of W = {window} after L = {prefix} tokens: a chunk of C = {chunk} "
                 f"needs up to W - 1 + C = {window - 1 + chunk} keys, the ring holds {window}\n"
                 "(rasbt/LLMs-from-scratch #1013; kvref defers a step iff C >= 2 and L + C - 1 >= W: "
                 "kvref.ring.must_defer)", fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 9. ggml's quantized blocks: the bytes of one block, and the error of each format
# ---------------------------------------------------------------------------------------------------------------
#: llama.cpp ``tests/test-quantize-fns.cpp``: MAX_QUANTIZATION_TOTAL_ERROR, the bound for q8_0, q4_0, q4_1, q5_0,
#: q5_1 (and f16) on its test data, in its own metric (:func:`llama_cpp_rmse`)
LLAMA_CPP_TOTAL_ERROR = 0.002

#: the "total error" that ``test-quantize-fns -v`` printed for llama.cpp c392e509 built for the CPU (AVX2)
#: (``shared/reference/quant_and_ring_facts.md`` §4); f16 is the format of kvref's tail
LLAMA_CPP_MEASURED = {"f16": 0.000004, "q8_0": 0.000074, "q4_0": 0.001121, "q4_1": 0.001144, "q5_0": 0.000591,
                      "q5_1": 0.000556}

#: the largest error of one element, as a fraction of its block's statistic, without the fp16 rounding of d (and m):
#: format -> (statistic, bound). Symmetric formats map the signed extreme M to the lowest code exactly, but a value
#: of the other sign and the same magnitude reaches only the highest code: the clamp costs one step d = amax/8
#: (q4_0) or amax/16 (q5_0), more than the rounding's d/2. q8_0 (d = amax/127, codes -127..127) only rounds: amax/254.
#: The affine formats round to a step of range/15 or range/31. fp16 rounds to 11 significant bits.
QUANT_BOUNDS = {"f16": ("amax", 1 / 2048), "q8_0": ("amax", 1 / 254), "q4_0": ("amax", 1 / 8),
                "q4_1": ("range", 1 / 30), "q5_0": ("amax", 1 / 16), "q5_1": ("range", 1 / 62)}

QUANT_COLORS = {"f16": "#7f7f7f", "q8_0": "#1f77b4", "q5_1": "#9467bd", "q5_0": "#17becf", "q4_1": "#bcbd22",
                "q4_0": "#2ca02c"}
STORE_COLOR = "#6baed6"
TAIL_COLOR = "#fd8d3c"
EVICTED_COLOR = "#e0e0e0"


def format_bits(fmt):
    """Bits per element of a store format, or 16 for "f16" (the tail)."""
    return 16.0 if fmt == "f16" else quant.FORMATS[fmt][2]


def llama_cpp_test_data(n=4096, offset=0.0):
    """The data of llama.cpp's ``test-quantize-fns``: ``x[i] = 0.1 + 2*cosf(i + offset)`` as float32 (its
    ``generate_data``: the cosine in float32, the sum with the double 0.1 in double, stored as float)."""
    c = np.cos(np.arange(n, dtype=np.float32) + np.float32(offset))
    return (0.1 + 2.0 * c.astype(np.float64)).astype(np.float32)


def llama_cpp_rmse(a, b):
    """llama.cpp's ``array_rmse`` as it is: ``sqrtf(sum (a - b)^2) / n``. That is the true RMSE divided by sqrt(n),
    not the RMSE: at n = 4096 it is 64 times smaller, so its 0.002 threshold means a true RMSE below 0.128."""
    e = np.asarray(a, np.float64).ravel() - np.asarray(b, np.float64).ravel()
    return float(np.float32(np.sqrt(np.sum(e * e)))) / e.size


def quant_error_rows(formats=("f16",) + tuple(quant.FORMATS), n=4096, normal_n=32768, backend="python", seed=0):
    """The error of each format on llama.cpp's test data (:func:`llama_cpp_test_data`, n values) and on
    ``normal_n`` N(0, 1) values, through :func:`round_trip` (kvref.quant.quantize / dequantize on ``backend``; every
    backend gives the same bytes, and the python spec needs no compiling).

    Returns one dict per format: format, bits (per element), bytes_per_block (32 elements), cos_rmse, cos_max,
    normal_rmse, normal_max (true RMSE and max |error|), block_stat and bound (:data:`QUANT_BOUNDS`), worst_block
    (the largest max |error| of a block divided by its amax or range, both data sets), llama_cpp_metric
    (:func:`llama_cpp_rmse` on the test data), llama_cpp_threshold (0.002), llama_cpp_passes (metric < threshold,
    as the test checks) and llama_cpp_measured (:data:`LLAMA_CPP_MEASURED`).
    """
    cos = llama_cpp_test_data(n)
    normal = np.random.default_rng(seed).standard_normal(normal_n).astype(np.float32)
    rows = []
    for fmt in formats:
        stat, bound = QUANT_BOUNDS[fmt]
        row = {"format": fmt, "bits": format_bits(fmt),
               "bytes_per_block": 64 if fmt == "f16" else quant.FORMATS[fmt][1], "block_stat": stat, "bound": bound}
        worst = 0.0
        for name, x in (("cos", cos), ("normal", normal)):
            y = round_trip(x, fmt, backend)
            e = np.abs(y.astype(np.float64) - x)
            row[f"{name}_rmse"] = float(np.sqrt(np.mean(e * e)))
            row[f"{name}_max"] = float(e.max())
            blocks = x.reshape(-1, quant.BLOCK).astype(np.float64)
            size = (np.abs(blocks).max(axis=1) if stat == "amax" else blocks.max(axis=1) - blocks.min(axis=1))
            worst = max(worst, float(np.max(e.reshape(-1, quant.BLOCK).max(axis=1) / size)))
            if name == "cos":
                row["llama_cpp_metric"] = llama_cpp_rmse(x, y)
        row["worst_block"] = worst
        row["llama_cpp_threshold"] = LLAMA_CPP_TOTAL_ERROR
        row["llama_cpp_passes"] = row["llama_cpp_metric"] < LLAMA_CPP_TOTAL_ERROR
        row["llama_cpp_measured"] = LLAMA_CPP_MEASURED.get(fmt)
        rows.append(row)
    return rows


def quant_error_figure(rows=None, n=4096):
    """Three panels from :func:`quant_error_rows`: (a) true RMSE and max |error| vs bits per element (each bit
    halves the error); (b) the worst error in a block as a fraction of its amax or range, against the bound of each
    format; (c) llama.cpp's ``array_rmse`` (= true RMSE / sqrt(n)) against its threshold 0.002, next to what
    llama.cpp itself printed."""
    rows = rows or quant_error_rows(n=n)
    fig = Figure(figsize=(16, 5.4), layout="constrained")
    ax_bits, ax_block, ax_llama = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.25, 1, 1]})
    names = [r["format"] for r in rows]
    colors = [QUANT_COLORS.get(f, "#333333") for f in names]

    # (a) error vs bits (the store formats; fp16, the tail's format, as lines)
    stores = sorted((r for r in rows if r["format"] != "f16"), key=lambda r: r["bits"])
    for key, marker, label in (("cos_rmse", "o", "RMSE, llama.cpp data 0.1 + 2 cos(i)"),
                               ("normal_rmse", "s", "RMSE, N(0, 1)"),
                               ("cos_max", "^", "max |error|, llama.cpp data"),
                               ("normal_max", "v", "max |error|, N(0, 1)")):
        filled = key.startswith("cos")
        ax_bits.plot([r["bits"] for r in stores], [r[key] for r in stores], ls=":", color="#999999", lw=0.8)
        for r in stores:
            c = QUANT_COLORS.get(r["format"], "#333333")
            ax_bits.plot(r["bits"], r[key], marker, color=c, mfc=c if filled else "white", ms=7, ls="none")
        ax_bits.plot([], [], marker, color="#555555", mfc="#555555" if filled else "white", ls="none", label=label)
    if stores:
        q8 = next((r for r in stores if r["format"] == "q8_0"), stores[-1])
        bits = np.linspace(4.2, 9, 30)
        ax_bits.plot(bits, q8["normal_rmse"] * 2.0 ** (q8["bits"] - bits), "--", color="#bbbbbb", lw=1,
                     label="x 1/2 per extra bit")
        ax_bits.set_xticks([r["bits"] for r in stores], [f"{r['bits']:g}\n{r['format']}" for r in stores])
        for label, r in zip(ax_bits.get_xticklabels(), stores):
            label.set_color(QUANT_COLORS.get(r["format"], "#333333"))
    for r in rows:
        if r["format"] == "f16":
            ax_bits.axhline(r["cos_rmse"], color=QUANT_COLORS["f16"], ls="-.", lw=1,
                            label=f"f16 (the tail, 16 bits): RMSE {r['cos_rmse']:.1e}, max {r['cos_max']:.1e}")
    ax_bits.set_xlim(4.1, 9)
    ax_bits.set_yscale("log")
    ax_bits.set_xlabel("bits per element (codes + the fp16 scale d, and m, shared by 32 elements)")
    ax_bits.set_ylabel("error of one element (data scale ~ 1)")
    ax_bits.set_title("(a) error vs bits per element (kvref.quant.quantize -> dequantize)", fontsize=10)
    ax_bits.legend(fontsize=7.5, loc="lower left")
    ax_bits.grid(alpha=0.3, which="both")

    # (b) the worst element of a block vs its bound
    x = np.arange(len(rows))
    ax_block.bar(x, [r["worst_block"] for r in rows], 0.6, color=colors, alpha=0.85, label="measured (both data sets)")
    for i, r in enumerate(rows):
        ax_block.plot([i - 0.38, i + 0.38], [r["bound"]] * 2, color="black", lw=2,
                      label="bound without the fp16 rounding of d (and m)" if i == 0 else None)
        frac = f"1/{round(1 / r['bound'])}"
        ax_block.annotate(f"{r['worst_block']:.4f}\n≤ {frac} {r['block_stat']}",
                          (i, max(r["worst_block"], r["bound"])), xytext=(0, 3), textcoords="offset points",
                          ha="center", va="bottom", fontsize=7.5)
    ax_block.set_yscale("log")
    ax_block.set_ylim(min(r["bound"] for r in rows) / 3, max(r["bound"] for r in rows) * 6)
    ax_block.set_xticks(x, names)
    ax_block.set_ylabel("max |error| in a block / the block's amax (or range)")
    ax_block.set_title("(b) the worst element of a block: q4_0's clamp costs d = amax/8\n"
                       "(the extreme maps to -8 d exactly; the other sign reaches only +7 d)", fontsize=10)
    ax_block.legend(fontsize=7.5, loc="upper left")
    ax_block.grid(alpha=0.3, axis="y", which="both")

    # (c) llama.cpp's metric, as it is
    ax_llama.bar(x, [r["llama_cpp_metric"] for r in rows], 0.6, color=colors, alpha=0.85,
                 label="kvref, in llama.cpp's metric")
    measured = [(i, r["llama_cpp_measured"]) for i, r in enumerate(rows) if r["llama_cpp_measured"] is not None]
    ax_llama.plot([i for i, _ in measured], [m for _, m in measured], "kx", ms=9, mew=2,
                  label="printed by llama.cpp's test-quantize-fns (AVX2 build)")
    ax_llama.axhline(LLAMA_CPP_TOTAL_ERROR, color="#d62728", ls="--", lw=1.2,
                     label=f"MAX_QUANTIZATION_TOTAL_ERROR = {LLAMA_CPP_TOTAL_ERROR}")
    for i, r in enumerate(rows):
        ax_llama.annotate(f"{r['llama_cpp_metric']:.6f}", (i, r["llama_cpp_metric"]), xytext=(0, -3),
                          textcoords="offset points", ha="center", va="top", fontsize=7, rotation=90,
                          color="white" if r["format"] != "f16" else "black")
    ax_llama.set_yscale("log")
    ax_llama.set_ylim(1e-6, 0.05)
    ax_llama.set_xticks(x, names)
    ax_llama.set_ylabel("array_rmse = sqrt(sum e²) / n")
    root = np.sqrt(n)
    right = ax_llama.secondary_yaxis("right", functions=(lambda v: v * root, lambda v: v / root))
    right.set_ylabel(f"true RMSE = array_rmse · sqrt(n) = · {root:g}")
    ax_llama.set_title(f"(c) llama.cpp's metric as it is (n = {n}): it divides by n, not sqrt(n),\nso 0.002 means a "
                       f"true RMSE below {LLAMA_CPP_TOTAL_ERROR * root:.3f}; every format passes", fontsize=10)
    ax_llama.legend(fontsize=7.5, loc="upper left")
    ax_llama.grid(alpha=0.3, axis="y", which="both")
    fig.suptitle("ggml's block formats: 32 elements share one fp16 scale; error vs bits, per block, and in "
                 "llama.cpp's own test", fontsize=12)
    return fig


def quant_block_layout(x, fmt, backend="python"):
    """One block of 32 floats in ggml format ``fmt``, byte by byte, from :func:`kvref.quant.quantize`.

    The codes are read back from the bytes here, by the rules written out in ``kvref/quant.py`` (q8_0: byte 2 + j is
    the int8 code of element j; 4/5-bit formats: byte j of qs holds element j in its low nibble and element j + 16 in
    its high nibble, bit j of the little-endian uint32 qh is the 5th bit of element j), and the values rebuilt from
    them must equal :func:`kvref.quant.dequantize` (else AssertionError).

    Returns a dict: format, x (32 float32), bytes (list of ints), d and m (the stored fp16 scale and minimum as
    floats; m None for the symmetric formats), d_bits (fp16 bit pattern), codes (the integer q_j of each element),
    zero (the code of 0.0: 8, 16 or 0), dequantized (32 floats), and fields: one (first byte, n bytes, name) per
    field (d, m, qh, qs).
    """
    x = np.ascontiguousarray(np.asarray(x, np.float32).reshape(quant.BLOCK))
    fid = quant.format_id(fmt)
    raw = quant.quantize(x, fmt, backend=backend)
    data = raw.tolist()
    m_at, qh_at, qs_at, block_bytes = quant.layout(fid)
    d_bits = data[0] | data[1] << 8
    d = float(np.array([d_bits], np.uint16).view(np.float16)[0])
    m = None
    if m_at >= 0:
        m = float(np.array([data[m_at] | data[m_at + 1] << 8], np.uint16).view(np.float16)[0])
    qs = data[qs_at:block_bytes]
    if fmt == "q8_0":
        codes = [b - 256 if b >= 128 else b for b in qs]
        zero = 0
    else:
        qh = sum(data[qh_at + k] << (8 * k) for k in range(4)) if qh_at >= 0 else 0
        codes = [0] * quant.BLOCK
        for j in range(quant.BLOCK // 2):
            codes[j] = (qs[j] & 0x0F) | (((qh >> j) & 1) << 4)
            codes[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)
        zero = {"q4_0": 8, "q5_0": 16}.get(fmt, 0)
    rebuilt = np.float32(d) * (np.array(codes, np.float32) - np.float32(zero))
    if m is not None:
        rebuilt = rebuilt + np.float32(m)
    dequantized = quant.dequantize(raw, fmt, x.shape, backend=backend)
    if not np.array_equal(rebuilt, dequantized):
        raise AssertionError(f"the {fmt} bytes read here disagree with kvref.quant.dequantize")
    fields = [(0, 2, "d")]
    if m_at >= 0:
        fields.append((m_at, 2, "m"))
    if qh_at >= 0:
        fields.append((qh_at, 4, "qh"))
    fields.append((qs_at, block_bytes - qs_at, "qs"))
    return {"format": fmt, "x": x, "bytes": data, "d": d, "d_bits": d_bits, "m": m, "codes": codes, "zero": zero,
            "dequantized": dequantized, "fields": fields}


def quant_blocks_figure(x=None, formats=("q8_0", "q4_0"), seed=3):
    """For each format (:func:`quant_block_layout`): the 32 values of one block and their dequantized values (top),
    and the block's bytes in memory order, each labelled with the element(s) it stores (bottom; one byte per unit
    of width, so the sizes compare: 34 bytes for q8_0, 18 for q4_0, against 64 in fp16). ``x`` defaults to 32
    N(0, 1) values."""
    from matplotlib.patches import Rectangle

    if x is None:
        x = np.random.default_rng(seed).standard_normal(quant.BLOCK).astype(np.float32)
    layouts = [quant_block_layout(x, fmt) for fmt in formats]
    width = max(len(b["bytes"]) for b in layouts)
    fig = Figure(figsize=(16, 4.2 * len(layouts)), layout="constrained")
    grid = fig.add_gridspec(2 * len(layouts), 1, height_ratios=[1.6, 0.75] * len(layouts))
    lo_color, hi_color = "#6baed6", "#fd8d3c"
    for row, b in enumerate(layouts):
        fmt = b["format"]
        nibbles = fmt != "q8_0"
        ax = fig.add_subplot(grid[2 * row])
        j = np.arange(quant.BLOCK)
        colors = [lo_color if (not nibbles or k < 16) else hi_color for k in j]
        ax.bar(j, b["x"], 0.7, color=colors, alpha=0.55, label="x_j (float32)")
        ax.plot(j, b["dequantized"], "k_", ms=14, mew=2, label="dequantized x~_j")
        for k in j:
            ax.annotate(str(b["codes"][k]), (k, b["x"][k]), xytext=(0, 3 if b["x"][k] >= 0 else -3),
                        textcoords="offset points", ha="center", va="bottom" if b["x"][k] >= 0 else "top",
                        fontsize=7)
        ax.axhline(0, color="#999999", lw=0.6)
        ax.set_xticks(j, [f"{k}" for k in j], fontsize=7)
        ax.set_xlim(-0.7, quant.BLOCK - 0.3)
        span = float(np.abs(b["x"]).max())
        ax.set_ylim(-span * 1.35, span * 1.35)
        ax.set_xlabel("element j (number above a bar: its stored code q_j)", fontsize=8)
        err = float(np.abs(b["dequantized"] - b["x"]).max())
        if fmt == "q8_0":
            rule = f"d = amax/127 = {b['x'][np.argmax(np.abs(b['x']))]:.4f}/127 -> fp16 {b['d']:.6g};  " \
                   "q_j = roundf(x_j / d);  x~_j = d·q_j"
        elif fmt in ("q4_0", "q5_0"):
            half = b["zero"]
            rule = f"d = M/-{half} with M the signed extreme -> fp16 {b['d']:.6g};  q_j = min({2 * half - 1}, " \
                   f"trunc(x_j/d + {half}.5));  x~_j = d·(q_j - {half})"
        else:
            rule = f"d = range/{15 if fmt == 'q4_1' else 31} -> fp16 {b['d']:.6g}, m = min -> fp16 {b['m']:.6g};  " \
                   "x~_j = d·q_j + m"
        ax.set_title(f"{fmt}: {rule};  max |x - x~| = {err:.4f}", fontsize=10)
        if nibbles:
            from matplotlib.patches import Patch

            handles, labels = ax.get_legend_handles_labels()
            ax.legend(handles=[Patch(color=lo_color, alpha=0.55, label="x_j, j = 0-15: low nibbles of qs[0..15]"),
                               Patch(color=hi_color, alpha=0.55, label="x_j, j = 16-31: high nibbles of qs[0..15]")]
                      + [h for h, label in zip(handles, labels) if label.startswith("dequantized")],
                      fontsize=7.5, loc="upper right", ncol=3)
        else:
            ax.legend(fontsize=7.5, loc="upper right", ncol=2)

        ax = fig.add_subplot(grid[2 * row + 1])
        field_colors = {"d": "#bdbdbd", "m": "#d9d9d9", "qh": "#c7e9c0", "qs": "white"}
        for first, count, name in b["fields"]:
            for k in range(first, first + count):
                value = b["bytes"][k]
                if name == "d":
                    text = f"d {'lo' if k == first else 'hi'}\n0x{value:02x}"
                elif name == "m":
                    text = f"m {'lo' if k == first else 'hi'}\n0x{value:02x}"
                elif name == "qh":
                    text = f"qh[{k - first}]\n0x{value:02x}\nbits {8 * (k - first)}-{8 * (k - first) + 7}"
                elif not nibbles:
                    q = k - first
                    text = f"0x{value:02x}\nx{q}\n{b['codes'][q]:+d}"
                else:
                    q = k - first
                    text = f"0x{value:02x}\nlo x{q}={value & 15}\nhi x{q + 16}={value >> 4}"
                face = field_colors[name]
                ax.add_patch(Rectangle((k, 0), 1, 1, facecolor=face, edgecolor="#555555", lw=0.8))
                if name == "qs" and nibbles:  # low nibble (listed first) on top
                    ax.add_patch(Rectangle((k, 0.5), 1, 0.5, facecolor=lo_color, alpha=0.35, lw=0))
                    ax.add_patch(Rectangle((k, 0), 1, 0.5, facecolor=hi_color, alpha=0.35, lw=0))
                ax.text(k + 0.5, 0.5, text, ha="center", va="center", fontsize=6.3 if nibbles else 6.6)
        ax.set_xlim(0, width)
        ax.set_ylim(-0.05, 1.05)
        ax.set_yticks([])
        ax.set_xticks(np.arange(0, len(b["bytes"]) + 1, 2))
        ax.tick_params(labelsize=7)
        bits = 8 * len(b["bytes"]) / quant.BLOCK
        ax.set_xlabel(f"byte offset in the block: {len(b['bytes'])} bytes for 32 elements = {bits:g} bits per "
                      f"element (fp16: 64 bytes; fields: " + ", ".join(f"{name} at byte {first}"
                                                                       for first, _, name in b["fields"]) + ")",
                      fontsize=8)
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.suptitle("One block of 32 values in ggml's formats, byte by byte (kvref.quant.quantize, byte-identical to "
                 "ggml's reference quantizers)", fontsize=12)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 10. A TwoTierCache's tiers across steps: migration in batches, a prefill straight to its tiers, exact eviction
# ---------------------------------------------------------------------------------------------------------------
#: token counts of the steps :func:`two_tier_timeline_events` feeds by default (R = 8, B = 4, M = 24): a prefill of
#: 11 > R, decode steps that migrate one batch, a chunk of 10 that migrates, stores some new tokens directly and
#: passes M, then decode steps that evict one token each
TWO_TIER_TIMELINE_STEPS = (11, 1, 1, 1, 1, 1, 1, 10, 1, 1, 1, 1, 1)


def _tier_of(tiers, p):
    """The tier name of position p in ``cache.tiers()``."""
    for name in ("evicted", "store", "tail"):
        lo, hi = tiers[name]
        if lo <= p < hi:
            return name
    raise AssertionError(f"position {p} is in no tier of {tiers}")


def two_tier_timeline_events(tail_tokens=8, migration_batch=4, max_tokens=24, steps=TWO_TIER_TIMELINE_STEPS,
                             store_format="q4_0", backend="python", seed=0):
    """Drive a real TwoTierCache (1 sequence, fp16 tail) through ``steps`` (tokens per step) and record its tiers.

    Returns a list of dicts, the first for the new, empty cache: op (label), tokens, positions (of the step), length
    (after), tiers (``cache.tiers()`` after), tier (the tier name of every position 0 .. length-1), migrated (old
    tail positions this step quantized into the store), direct (new positions quantized straight into the store),
    evicted (positions that left this step, new ones that were never stored included), counts (tail, store,
    evicted from ``stats()``), max_error (the step's attention, every layer, against :class:`TwoTierHistory`'s float64
    reference over the dequantized store and the tail).

    Checked on the way (AssertionError otherwise): the tiers partition 0 .. L-1 and agree with ``stats()``; exactly
    min(L, M) tokens are held; at most R are in the tail, and at least R - B + 1 once anything has migrated; each
    stored token's bytes equal ``kvref.quant.quantize`` of the value it was written with and never change while it
    stays in the store (a token is quantized once).
    """
    rng = np.random.default_rng(seed)
    shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=32, dtype="float16")
    cache = TwoTierCache(shape, batch=1, tail_tokens=tail_tokens, max_tokens=max_tokens, store_format=store_format,
                         migration_batch=migration_batch, backend=backend)
    scale = 1.0 / np.sqrt(shape.head_dim)
    history = [TwoTierHistory(shape.kv_heads, shape.head_dim, store_format) for _ in range(shape.layers)]
    seen = {}  # (layer, position) -> the bytes the store holds for it
    events = [{"op": "new", "tokens": 0, "positions": [], "length": 0, "tiers": cache.tiers(), "tier": [],
               "migrated": [], "direct": [], "evicted": [], "counts": {"tail": 0, "store": 0, "evicted": 0},
               "max_error": 0.0}]
    for num_tokens in steps:
        before = cache.tiers()
        step = cache.plan(num_tokens)
        worst = 0.0
        for layer in range(shape.layers):
            k, v, q = random_step_inputs(rng, shape, 1, num_tokens)
            cache.write(step, layer, k, v)
            out = cache.attend(step, layer, q)
            history[layer].add(k[0], v[0])
            expected = history[layer].expected(q[0], step.positions[0], int(step.tiers[0, 0]), max_tokens, scale)
            worst = max(worst, float(np.max(np.abs(out[0] - expected))))
        cache.advance(step)
        n = cache.get_seq_length()
        tiers = cache.tiers()
        stats = cache.stats()
        counts = {name: hi - lo for name, (lo, hi) in tiers.items()}
        if (tiers["evicted"][0], tiers["evicted"][1]) != (0, tiers["store"][0]) or \
                tiers["store"][1] != tiers["tail"][0] or tiers["tail"][1] != n:
            raise AssertionError(f"the tiers {tiers} do not partition 0 .. {n - 1}")
        if [counts["tail"], counts["store"], counts["evicted"]] != [stats["tokens_in_tail"][0],
                                                                    stats["tokens_in_store"][0],
                                                                    stats["tokens_evicted"][0]]:
            raise AssertionError(f"tiers() {tiers} and stats() disagree")
        if counts["tail"] + counts["store"] != min(n, max_tokens):
            raise AssertionError(f"{counts['tail'] + counts['store']} tokens held, expected min({n}, {max_tokens})")
        lowest = tail_tokens - migration_batch + 1  # the tail after a migration
        if counts["tail"] > tail_tokens or (tiers["store"][1] > 0 and counts["tail"] < lowest):
            raise AssertionError(f"{counts['tail']} tokens in the tail (R = {tail_tokens}, B = {migration_batch})")
        lo, hi = tiers["store"]
        for layer in range(shape.layers):
            blocks = cache.store_blocks(layer)  # (K|V, kv_heads, n_store, row_bytes)
            fed = np.stack([f[:, lo:hi] for f in history[layer].fed]).astype(np.float32)
            if not np.array_equal(blocks, quant.quantize(fed, store_format, backend="python")):
                raise AssertionError("a stored token is not the quantized value it was written with")
            for p in range(lo, hi):
                held = blocks[:, :, p - lo].tobytes()
                if seen.setdefault((layer, p), held) != held:
                    raise AssertionError(f"position {p} was quantized again")
        positions = step.positions[0].tolist()
        label = f"p {positions[0]}" if num_tokens == 1 else f"p {positions[0]}..{positions[-1]}"
        kind = "decode" if num_tokens == 1 else ("prefill" if positions[0] == 0 else "chunk")
        events.append({
            "op": f"{kind} {label}", "tokens": num_tokens, "positions": positions, "length": n, "tiers": tiers,
            "tier": [_tier_of(tiers, p) for p in range(n)],
            "migrated": [p for p in range(*before["tail"]) if lo <= p < hi],
            "direct": [p for p in positions if lo <= p < hi],
            "evicted": [p for p in range(*tiers["evicted"]) if p >= before["evicted"][1]],
            "counts": counts, "max_error": worst})
    return events


def two_tier_timeline_figure(events=None, tail_tokens=8, migration_batch=4, max_tokens=24):
    """The tier of every position after each step of a real TwoTierCache (:func:`two_tier_timeline_events`), and the
    tokens held per tier. Outlines: black, the step's new tokens; red, old tail tokens migrated to the store by this
    step; hatched, new tokens quantized straight into the store (a prefill or chunk longer than R)."""
    from matplotlib.patches import Patch, Rectangle

    events = events or two_tier_timeline_events(tail_tokens, migration_batch, max_tokens)
    n_max = max(e["length"] for e in events)
    fig = Figure(figsize=(16, 0.42 * len(events) + 2.6), layout="constrained")
    ax, ax_count = fig.subplots(1, 2, gridspec_kw={"width_ratios": [4.2, 1]}, sharey=True)
    colors = {"evicted": EVICTED_COLOR, "store": STORE_COLOR, "tail": TAIL_COLOR}
    for y, e in enumerate(events):
        new, migrated, direct = set(e["positions"]), set(e["migrated"]), set(e["direct"])
        for p, tier in enumerate(e["tier"]):
            edge, lw = ("#d62728", 2.4) if p in migrated else (("black", 1.6) if p in new else ("white", 0.8))
            ax.add_patch(Rectangle((p - 0.5, y - 0.42), 1, 0.84, facecolor=colors[tier], edgecolor=edge, lw=lw,
                                   hatch="////" if p in direct else None, zorder=3 if edge != "white" else 2))
            if tier == "evicted" and p in e["evicted"]:
                ax.text(p, y, "×", ha="center", va="center", fontsize=9, color="#d62728", zorder=4)
        t = e["tiers"]
        if e["length"]:
            ax.text(n_max + 0.2, y, f"e = {t['evicted'][1]}, m = {t['store'][1]}, L = {e['length']}", va="center",
                    fontsize=7.5)
    ax.set_xlim(-0.6, n_max + 5.5)
    ax.set_ylim(len(events) - 0.5, -0.6)
    ax.set_xticks(range(0, n_max, 2))
    ax.tick_params(labelsize=8)
    ax.set_yticks(range(len(events)), [e["op"] for e in events], fontsize=8)
    ax.set_xlabel("position p (e: evicted below, m: migrated below, L: length)")
    worst = max(e["max_error"] for e in events)
    ax.set_title(f"R = {tail_tokens} tail slots (fp16), migration batch B = {migration_batch}, at most M = "
                 f"{max_tokens} held: positions e .. m-1 in the quantized store, m .. L-1 in the tail\n"
                 f"attention vs float64 over the dequantized store and the tail: max |error| {worst:.1e}", fontsize=10)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.legend(handles=[Patch(facecolor=TAIL_COLOR, label="tail (fp16, as written)"),
                       Patch(facecolor=STORE_COLOR, label="store (ggml blocks)"),
                       Patch(facecolor=EVICTED_COLOR, label="evicted (× this step)"),
                       Patch(facecolor="white", edgecolor="black", lw=1.6, label="the step's new tokens"),
                       Patch(facecolor="white", edgecolor="#d62728", lw=2.4, label="migrated tail -> store this step"),
                       Patch(facecolor=STORE_COLOR, hatch="////", label="new, quantized straight into the store")],
              loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=6, fontsize=8)

    y = np.arange(len(events))
    tail = np.array([e["counts"]["tail"] for e in events])
    store = np.array([e["counts"]["store"] for e in events])
    ax_count.barh(y, tail, 0.7, color=TAIL_COLOR, label="tail")
    ax_count.barh(y, store, 0.7, left=tail, color=STORE_COLOR, label="store")
    for value, label, style in ((tail_tokens - migration_batch + 1, "R - B + 1", ":"), (tail_tokens, "R", "--"),
                                (max_tokens, "M", "-")):
        ax_count.axvline(value, color="k", ls=style, lw=1, label=f"{label} = {value}")
    ax_count.legend(fontsize=7, loc="upper right", framealpha=0.9)
    ax_count.set_xlabel("tokens held")
    ax_count.set_title("tail + store per step\n(the tail holds R - B + 1 .. R once\nanything has migrated)",
                       fontsize=9)
    ax_count.tick_params(labelsize=8)
    ax_count.grid(alpha=0.3, axis="x")
    fig.suptitle("TwoTierCache tiers after each step (a real cache, python backend, recorded from tiers())",
                 fontsize=12)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 11. Two-tier memory
# ---------------------------------------------------------------------------------------------------------------
def tail_after(n, tail_tokens, migration_batch):
    """Tokens in the tail after n tokens, however they came (one at a time or in chunks): ``n - m`` with
    ``m = B * ceil((n - R) / B)`` once n > R (``kvref.two_tier.migrate_to`` from an empty cache)."""
    return n - migrate_to(0, 0, n, tail_tokens, migration_batch)


def two_tier_memory_samples(tail_tokens=16, max_tokens=48, migration_batch=4, total=72, prefill=24,
                            store_format="q4_0", backend="python", dtype="float16"):
    """Drive a small real TwoTierCache (a prefill of ``prefill`` > R tokens, then one token at a time past M) and
    sample its memory after every step.

    Returns a dict: shape, tail_tokens, max_tokens, migration_batch, store_format, and lists n (tokens fed),
    bytes_used (``stats()["bytes_used"]``), tail_held (``stats()["tokens_in_tail"]``), nbytes (``cache.nbytes``),
    formula (:func:`kvref.memory.two_tier_held_bytes` of min(n, M) held tokens, :func:`tail_after` of them in the
    tail) and flat_nbytes (``nbytes`` of an fp16 FlatCache allocated for n tokens).
    """
    shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=32, dtype=dtype)
    cache = TwoTierCache(shape, batch=1, tail_tokens=tail_tokens, max_tokens=max_tokens, store_format=store_format,
                         migration_batch=migration_batch, backend=backend)
    rng = np.random.default_rng(0)
    samples = {"shape": shape, "tail_tokens": tail_tokens, "max_tokens": max_tokens,
               "migration_batch": migration_batch, "store_format": store_format, "n": [], "bytes_used": [],
               "tail_held": [], "nbytes": [], "formula": [], "flat_nbytes": []}
    while cache.get_seq_length() < total:
        num_tokens = prefill if cache.get_seq_length() == 0 else 1
        step = cache.plan(num_tokens)
        for layer in range(shape.layers):
            k, v, _ = random_step_inputs(rng, shape, 1, num_tokens)
            cache.write(step, layer, k, v)
        cache.advance(step)
        n = cache.get_seq_length()
        stats = cache.stats()
        samples["n"].append(n)
        samples["bytes_used"].append(stats["bytes_used"])
        samples["tail_held"].append(stats["tokens_in_tail"][0])
        samples["nbytes"].append(cache.nbytes)
        samples["formula"].append(memory.two_tier_held_bytes(shape, min(n, max_tokens),
                                                             tail_after(n, tail_tokens, migration_batch),
                                                             store_format))
        samples["flat_nbytes"].append(FlatCache(shape, batch=1, max_tokens=n, backend=backend).nbytes)
    return samples


def two_tier_memory_figure(model="llama-3-8b", dtype="float16", context=8192, tail_tokens=256, migration_batch=64,
                           formats=("q8_0", "q4_0"), samples=None):
    """(a) K/V bytes of ``model`` vs tokens generated n, from the formulas: a flat fp16 cache (n slots, full at
    ``context``) vs two-tier caches with an fp16 tail of R = ``tail_tokens`` and M = ``context``, bytes held
    (:func:`kvref.memory.two_tier_held_bytes`) and allocated (:func:`kvref.memory.two_tier_bytes`); past M the
    two-tier cache evicts and stays flat. (b) a small real TwoTierCache's measured ``stats()["bytes_used"]`` on its
    formula (:func:`two_tier_memory_samples`)."""
    shape = preset(model, dtype)
    fig = Figure(figsize=(15, 5.4), layout="constrained")
    ax_model, ax_small = fig.subplots(1, 2)
    per_token = memory.bytes_per_token(shape)
    top = int(context * 1.25)
    n = np.unique(np.concatenate([np.linspace(0, top, 321).astype(int), [context]]))
    flat = np.where(n <= context, n * per_token, np.nan)
    ax_model.plot(n, flat, color=RECOMPUTE_COLOR, lw=2, label=f"FlatCache {dtype}: n · bytes_per_token "
                                                              f"({per_token // 1024} KiB)")
    ax_model.plot([context], [context * per_token], "x", color=RECOMPUTE_COLOR, ms=10, mew=2,
                  label=f"FlatCache full at max_tokens = {context} (the next token raises)")
    flat_end = context * per_token
    ax_model.annotate(short_bytes(flat_end), (context, flat_end), xytext=(-8, 0), textcoords="offset points",
                      ha="right", va="center", color=RECOMPUTE_COLOR, fontweight="bold")
    for fmt in formats:
        color = QUANT_COLORS[fmt]
        held = [memory.two_tier_held_bytes(shape, min(int(v), context), tail_after(min(int(v), context), tail_tokens,
                                                                                     migration_batch), fmt)
                for v in n]
        allocated = memory.two_tier_bytes(shape, 1, tail_tokens, context, fmt, migration_batch)
        store_token = memory.store_bytes_per_token(shape, fmt)
        ax_model.plot(n, held, color=color, lw=2,
                      label=f"two-tier {fmt}: R = {tail_tokens} fp16 + the rest at {store_token // 1024} KiB/token "
                            f"({per_token / store_token:.2f}x less)")
        ax_model.axhline(allocated, color=color, ls="--", lw=1,
                         label=f"  allocated: two_tier_bytes = {short_bytes(allocated)} (R + S = M + B - 1 slots)")
        ax_model.annotate(f"{short_bytes(held[-1])}\n{flat_end / held[-1]:.2f}x less", (top, held[-1]),
                          xytext=(-4, 4), textcoords="offset points", ha="right", va="bottom", color=color,
                          fontweight="bold", fontsize=9)
    ax_model.axvline(context, color="k", ls=":", lw=1)
    ax_model.text(context, flat_end * 0.97, f"  n = M = {_context_label(context)}: the two-tier cache\n  evicts "
                  "its oldest token per step", fontsize=8, va="top")
    ticks = np.arange(0, top + 1, context // 4)
    ax_model.set_xticks(ticks, [_context_label(int(v)) for v in ticks])
    ax_model.set_yticks(np.arange(0, flat_end * 1.1, flat_end / 8))
    _bytes_axis(ax_model)
    ax_model.set_ylim(0, flat_end * 1.1)
    ax_model.set_xlabel("tokens generated n (batch 1)")
    ax_model.set_ylabel("K/V bytes held")
    ax_model.set_title(f"(a) {model} ({shape.layers}L, {shape.kv_heads} KV heads x {shape.head_dim}): formulas, "
                       f"B = {migration_batch}", fontsize=10)
    ax_model.legend(fontsize=7.5, loc="upper left")
    ax_model.grid(alpha=0.3)

    samples = samples or two_tier_memory_samples()
    small, fmt = samples["shape"], samples["store_format"]
    r, m, b = samples["tail_tokens"], samples["max_tokens"], samples["migration_batch"]
    ns = np.asarray(samples["n"])
    line = np.arange(0, ns.max() + 1)
    ax_small.plot(line, [memory.bytes_per_token(small) * v for v in line], color=RECOMPUTE_COLOR, lw=1.2,
                  label=f"flat {small.dtype} formula: n · bytes_per_token")
    ax_small.plot(ns, samples["flat_nbytes"], "o", color=RECOMPUTE_COLOR, ms=3, mfc="none",
                  label="measured: FlatCache(max_tokens=n).nbytes")
    ax_small.plot(line, [memory.two_tier_held_bytes(small, min(v, m), tail_after(min(v, m), r, b), fmt)
                         for v in line], color=QUANT_COLORS.get(fmt, CACHED_COLOR), lw=1.2,
                  label="two_tier_held_bytes(min(n, M), tail)")
    ax_small.plot(ns, samples["bytes_used"], "o", color=QUANT_COLORS.get(fmt, CACHED_COLOR), ms=4,
                  label="measured: TwoTierCache.stats()['bytes_used']")
    ax_small.axhline(samples["nbytes"][0], color=QUANT_COLORS.get(fmt, CACHED_COLOR), ls="--", lw=1,
                     label=f"measured: TwoTierCache.nbytes = two_tier_bytes = {short_bytes(samples['nbytes'][0])}")
    ax_small.axvline(m, color="k", ls=":", lw=1)
    ax_small.text(m, max(samples["flat_nbytes"]) * 0.02, f"  n = M = {m}", fontsize=9)
    ax_small.set_xlabel(f"tokens fed n (a prefill of {samples['n'][0]}, then one per step)")
    ax_small.set_ylabel("bytes")
    ax_small.set_yticks(np.arange(0, max(samples["flat_nbytes"]) * 1.05, 4096))
    _bytes_axis(ax_small)
    ax_small.set_title(f"(b) measured: a real TwoTierCache, {small.layers}L, {small.kv_heads} KV heads x "
                       f"{small.head_dim}, {small.dtype} tail, {fmt} store,\nR = {r}, B = {b}, M = {m} (the "
                       f"sawtooth: each migration moves B tokens to the store)", fontsize=10)
    ax_small.legend(fontsize=7.5, loc="upper left")
    ax_small.grid(alpha=0.3)
    fig.suptitle("Two-tier memory: an fp16 tail of R tokens plus ggml blocks for the rest; flat in n once past M",
                 fontsize=12)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 12. Two-tier attention error vs the tail length, and after a prefill (transformers #35185)
# ---------------------------------------------------------------------------------------------------------------
#: llama.cpp ``tests/test-backend-ops.cpp``: the NMSE a flash-attention backend may differ from the CPU by. A
#: backend-consistency threshold, not a quality target; drawn for scale only
LLAMA_CPP_FA_NMSE = 5e-4


def nmse(reference, got):
    """llama.cpp's normalized mean squared error ``sum (a - b)^2 / sum a^2`` (a = the reference); its square root is
    the relative RMS error."""
    a = np.asarray(reference, np.float64)
    return float(np.sum((a - np.asarray(got, np.float64)) ** 2) / np.sum(a * a))


def _random_model_inputs(shape, n, seed):
    """Random K, V (layers, n, kv_heads, head_dim) and Q (layers, n, q_heads, head_dim), float32, N(0, 1)."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((shape.layers, n, shape.kv_heads, shape.head_dim)).astype(np.float32)
    v = rng.standard_normal((shape.layers, n, shape.kv_heads, shape.head_dim)).astype(np.float32)
    q = rng.standard_normal((shape.layers, n, shape.q_heads, shape.head_dim)).astype(np.float32)
    return k, v, q


def _feed(cache, k, v, q, start, stop, attend=True):
    """One step of tokens start .. stop-1 (sequence 0, every layer; K/V cast to the cache's dtype). Returns the
    attention output (layers, T, q_heads, head_dim), or None when ``attend`` is False."""
    step = cache.plan(stop - start)
    dtype = cache.shape.public_dtype
    outs = []
    for layer in range(cache.shape.layers):
        cache.write(step, layer, k[layer, start:stop][None].astype(dtype), v[layer, start:stop][None].astype(dtype))
        if attend:
            outs.append(cache.attend(step, layer, q[layer, start:stop][None])[0])
    cache.advance(step)
    return np.stack(outs) if attend else None


def _run(cache, k, v, q, prefill, total):
    """A prefill of ``prefill`` tokens (not attended), then decode steps up to ``total``; the decode outputs."""
    _feed(cache, k, v, q, 0, prefill, attend=False)
    return np.concatenate([_feed(cache, k, v, q, p, p + 1) for p in range(prefill, total)], axis=1)


def error_shape(dtype="float16"):
    """The shape of the error figures: 2 layers, 4 query heads, 2 KV heads, head_dim 64."""
    return CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=64, dtype=dtype)


def two_tier_error_rows(context=512, tails=(1, 32, 64, 128, 256, 384, 512), formats=("q8_0", "q4_0"), decode=16,
                        migration_batch=64, backend="cpu", seed=0):
    """Attention-output error of a real TwoTierCache (fp16 tail, store ``fmt``) against an fp32 FlatCache fed the
    same random K/V/Q (:func:`error_shape`, N(0, 1)), for each tail length R in ``tails``.

    Each cache takes a prefill of ``context - decode`` tokens (straight to its tiers), then ``decode`` decode steps
    whose outputs, every layer and head, are compared: :func:`nmse` against the fp32 flat cache's. M = ``context``,
    so nothing is evicted; B = min(``migration_batch``, R). At R >= context everything is in the tail and the error
    is that of fp16 K/V alone, which an fp16 FlatCache measures too (``fp16_nmse``).

    Returns a dict: shape, context, decode, tails, formats, nmse and max_abs ({fmt: [per R]}), quantized ({fmt: [store
    tokens at the last step, per R]}), fp16_nmse, reference_rms (RMS of the fp32 outputs).
    """
    shape = error_shape()
    k, v, q = _random_model_inputs(shape, context, seed)
    prefill = context - decode
    reference = _run(FlatCache(shape.with_dtype("float32"), batch=1, max_tokens=context, backend=backend), k, v, q,
                     prefill, context)
    fp16 = _run(FlatCache(shape, batch=1, max_tokens=context, backend=backend), k, v, q, prefill, context)
    rows = {"shape": shape, "context": context, "decode": decode, "tails": list(tails), "formats": list(formats),
            "nmse": {}, "max_abs": {}, "quantized": {}, "fp16_nmse": nmse(reference, fp16),
            "reference_rms": float(np.sqrt(np.mean(reference.astype(np.float64) ** 2)))}
    for fmt in formats:
        rows["nmse"][fmt], rows["max_abs"][fmt], rows["quantized"][fmt] = [], [], []
        for r in tails:
            cache = TwoTierCache(shape, batch=1, tail_tokens=r, max_tokens=max(context, r), store_format=fmt,
                                 migration_batch=min(migration_batch, r), backend=backend)
            out = _run(cache, k, v, q, prefill, context)
            rows["nmse"][fmt].append(nmse(reference, out))
            rows["max_abs"][fmt].append(float(np.max(np.abs(out - reference))))
            rows["quantized"][fmt].append(cache.stats()["tokens_in_store"][0])
    return rows


def prefill_tier_rows(prompts=(16, 64, 120, 256, 448), tail_tokens=128, formats=("q8_0", "q4_0"), decode=8,
                      migration_batch=64, backend="cpu", seed=1):
    """The first ``decode`` decode steps after a prompt of P tokens, for each P in ``prompts``: NMSE against an fp32
    FlatCache of (a) a real TwoTierCache with R = ``tail_tokens``, whose prefill goes straight to its tiers (the last
    R - B + 1 .. R prompt tokens stay fp16), and (b) Hugging Face's QuantizedCache behaviour (transformers #35185):
    the whole prompt quantized at once whatever ``residual_length`` = R says, the decode tokens kept in full precision.
    (b) is written out here, in the same ggml format so that only the policy differs: the prompt's K/V through
    :func:`round_trip`, the decode tokens' as fp16, then :func:`reference_attention` in float64.

    Returns a dict: prompts, tail_tokens, decode, formats, kvref and hf ({fmt: [nmse per P]}), kvref_quantized
    (prompt tokens in the store right after the prefill, per P) and fp16 (an fp16 FlatCache's nmse, per P).
    """
    shape = error_shape()
    longest = max(prompts) + decode
    k, v, q = _random_model_inputs(shape, longest, seed)
    scale = 1.0 / np.sqrt(shape.head_dim)
    half_k, half_v = (a.astype(np.float16).astype(np.float32) for a in (k, v))
    rows = {"prompts": list(prompts), "tail_tokens": tail_tokens, "decode": decode, "formats": list(formats),
            "kvref": {}, "hf": {}, "kvref_quantized": [], "fp16": []}
    references = {}
    for p in prompts:
        total = p + decode
        references[p] = _run(FlatCache(shape.with_dtype("float32"), batch=1, max_tokens=total, backend=backend), k, v,
                             q, p, total)
        fp16 = _run(FlatCache(shape, batch=1, max_tokens=total, backend=backend), k, v, q, p, total)
        rows["fp16"].append(nmse(references[p], fp16))
    for fmt in formats:
        rows["kvref"][fmt], rows["hf"][fmt] = [], []
        stored_k, stored_v = (round_trip(a, fmt) for a in (half_k, half_v))  # per token: independent of P
        for p in prompts:
            total = p + decode
            cache = TwoTierCache(shape, batch=1, tail_tokens=tail_tokens, max_tokens=max(total, tail_tokens),
                                 store_format=fmt, migration_batch=min(migration_batch, tail_tokens), backend=backend)
            _feed(cache, k, v, q, 0, p, attend=False)
            if fmt == formats[0]:
                rows["kvref_quantized"].append(cache.stats()["tokens_in_store"][0])
            out = np.concatenate([_feed(cache, k, v, q, t, t + 1) for t in range(p, total)], axis=1)
            rows["kvref"][fmt].append(nmse(references[p], out))
            hf = np.empty_like(references[p], np.float64)
            for layer in range(shape.layers):
                keys = np.concatenate([stored_k[layer, :p], half_k[layer, p:total]]).transpose(1, 0, 2)
                values = np.concatenate([stored_v[layer, :p], half_v[layer, p:total]]).transpose(1, 0, 2)
                hf[layer] = reference_attention(q[layer, p:total], keys, values, np.arange(p, total), scale)
            rows["hf"][fmt].append(nmse(references[p], hf))
    return rows


def two_tier_error_figure(rows=None, prefill_rows=None):
    """(a) NMSE of the attention output vs the tail length R (:func:`two_tier_error_rows`), with the fp16-only error
    and a guide proportional to the number of quantized tokens; (b) after a prompt of P tokens, kvref's prefill to
    the right tiers vs quantizing the whole prompt (:func:`prefill_tier_rows`)."""
    rows = rows or two_tier_error_rows()
    prefill_rows = prefill_rows or prefill_tier_rows()
    fig = Figure(figsize=(15, 5.6), layout="constrained")
    ax_tail, ax_prefill = fig.subplots(1, 2)
    n = rows["context"]
    tails = np.asarray(rows["tails"])
    for fmt in rows["formats"]:
        color = QUANT_COLORS.get(fmt, CACHED_COLOR)
        ax_tail.plot(tails, rows["nmse"][fmt], "o-", color=color, label=f"TwoTierCache, {fmt} store + fp16 tail")
        first = rows["nmse"][fmt][0]
        guide = first * (n - np.minimum(tails, n)) / (n - min(tails[0], n))
        ax_tail.plot(tails[tails < n], guide[tails < n], ":", color=color, lw=1,
                     label=f"  {fmt}: NMSE(R = {tails[0]}) · (n - R) / (n - {tails[0]}), ∝ tokens quantized")
    ax_tail.axhline(rows["fp16_nmse"], color="#7f7f7f", ls="--", lw=1.2,
                    label=f"FlatCache fp16 (every token fp16): {rows['fp16_nmse']:.1e}")
    ax_tail.axhline(LLAMA_CPP_FA_NMSE, color="#d62728", ls="-.", lw=1,
                    label=f"llama.cpp's FA backend-consistency NMSE threshold {LLAMA_CPP_FA_NMSE:g} (scale only)")
    ax_tail.axvline(n, color="k", ls=":", lw=1)
    ax_tail.annotate("R = n: all fp16", (n, rows["fp16_nmse"]), xytext=(-8, -6), textcoords="offset points",
                     ha="right", va="top", fontsize=8)
    ax_tail.set_ylim(rows["fp16_nmse"] / 4, None)
    ax_tail.set_xticks(tails, [str(t) for t in tails], fontsize=8)
    ax_tail.set_yscale("log")
    ax_tail.set_xlabel(f"tail length R (fp16 tokens) of n = {n} held; B = min(64, R)")
    ax_tail.set_ylabel("NMSE = Σ(a - b)² / Σa² of the attention output")
    right = ax_tail.secondary_yaxis("right", functions=(np.sqrt, np.square))
    right.set_ylabel("relative RMS error = sqrt(NMSE)")
    s = rows["shape"]
    ax_tail.set_title(f"(a) {rows['decode']} decode steps at positions {n - rows['decode']}..{n - 1} vs an fp32 "
                      f"FlatCache fed the same random\nN(0, 1) K/V/Q ({s.layers}L, {s.q_heads} q / {s.kv_heads} KV "
                      f"heads x {s.head_dim}): the error follows the share of tokens quantized", fontsize=9.5)
    ax_tail.legend(fontsize=7.5, loc="lower left")
    ax_tail.grid(alpha=0.3, which="both")

    prompts = np.asarray(prefill_rows["prompts"])
    r = prefill_rows["tail_tokens"]
    for fmt in prefill_rows["formats"]:
        color = QUANT_COLORS.get(fmt, CACHED_COLOR)
        ax_prefill.plot(prompts, prefill_rows["hf"][fmt], "s--", color=color, mfc="white",
                        label=f"{fmt}: quantize the whole prompt (HF QuantizedCache, #35185)")
        ax_prefill.plot(prompts, prefill_rows["kvref"][fmt], "o-", color=color,
                        label=f"{fmt}: kvref TwoTierCache, prefill to the right tiers")
    ax_prefill.plot(prompts, prefill_rows["fp16"], "--", color="#7f7f7f", lw=1.2, label="FlatCache fp16")
    ax_prefill.axvline(r, color="k", ls=":", lw=1)
    ax_prefill.text(r, max(max(v) for v in prefill_rows["hf"].values()) * 1.3, f" P = R = {r}", fontsize=8)
    for p, stored in zip(prompts, prefill_rows["kvref_quantized"]):
        ax_prefill.annotate(f"{stored} of {p}\nquantized", (p, prefill_rows["fp16"][list(prompts).index(p)]),
                            xytext=(0, -6), textcoords="offset points", ha="center", va="top", fontsize=7)
    ax_prefill.set_xscale("log", base=2)
    ax_prefill.set_xticks(prompts, [str(p) for p in prompts])
    ax_prefill.minorticks_off()
    ax_prefill.set_yscale("log")
    low = min(prefill_rows["fp16"]) / 20
    ax_prefill.set_ylim(low, max(max(v) for v in prefill_rows["hf"].values()) * 1e5)
    ax_prefill.set_xlabel(f"prompt length P (R = residual_length = {r}); numbers: prompt tokens kvref quantizes")
    ax_prefill.set_ylabel("NMSE of the first decode steps' attention output")
    ax_prefill.set_title(f"(b) the first {prefill_rows['decode']} decode steps after a prompt of P tokens: kvref "
                         "keeps a prompt\nshorter than R in fp16; HF quantizes all of it (same ggml format here)",
                         fontsize=9.5)
    ax_prefill.legend(fontsize=7.5, loc="upper left")
    ax_prefill.grid(alpha=0.3, which="both")
    fig.suptitle("Attention-output error of the two-tier cache: the fp16 tail is exact up to fp16, the store "
                 "costs in proportion to what it holds", fontsize=12)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 13. The pooled (paged) cache: block tables, ref counts, copy-on-write and the free queue
# ---------------------------------------------------------------------------------------------------------------
#: operations of :func:`pooled_tables_events` (B = 4, 8 blocks): a prefill of 10 tokens (sequence 0 ends mid-block),
#: a fork (sequence 1 shares all three blocks), an append by the child (copy-on-write of the shared partial block),
#: an append by the parent (into its own block, then a new block at the boundary), a release
POOLED_TABLES_OPS = (("step", 10, [0]), ("fork", 0), ("step", 1, [1]), ("step", 3, [0]), ("release", 0))

SEQ_COLORS = ("#6baed6", "#fd8d3c", "#74c476", "#9e9ac8")
SHARED_COLOR = "#bcbddc"
FREE_COLOR = "#eeeeee"


def pooled_tables_events(num_blocks=8, block_size=4, ops=POOLED_TABLES_OPS, backend="python"):
    """Drive a real PooledCache (1 layer, 1 KV head) through ``ops`` and record its books after each operation.

    Every token's K is written as its position and its V as the id of the sequence that wrote it, so the pool's
    contents can be read back from ``cache.kv``. Returns a list of dicts, the first for the new cache: op (label),
    tables ({seq: ``block_table(seq)``}), lengths, ref_counts (``pool.ref_counts``), free_queue (``pool.free_queue``,
    head first), copies (the step's copy-on-write (source, target) pairs, from ``step.copies``), new_blocks (blocks
    taken by the operation), stored (per block, per row: (position, writer) read from ``cache.kv``, or None for a
    row never written) and held (per block, per row: the sequences whose held position is stored there, from
    :func:`kvref.pooled.pooled_slot`).

    Checked on the way (AssertionError otherwise): each ref count equals the number of table entries listing the
    block; the free queue holds exactly the blocks with ref count 0; every held position reads back its own value.
    """
    shape = CacheShape(layers=1, q_heads=1, kv_heads=1, head_dim=1, dtype="float32")
    cache = PooledCache(shape, num_blocks=num_blocks, block_size=block_size, batch=1, max_seqs=2, backend=backend)
    written = np.zeros((num_blocks, block_size), bool)

    def record(label, copies=(), taken=()):
        live = cache.live_sequences()
        tables = {s: cache.block_table(s).tolist() for s in live}
        refs = cache.pool.ref_counts.tolist()
        counted = np.bincount([b for t in tables.values() for b in t], minlength=num_blocks).tolist()
        if refs != counted:
            raise AssertionError(f"ref counts {refs} != table entries per block {counted}")
        if sorted(cache.pool.free_queue) != [b for b in range(num_blocks) if refs[b] == 0]:
            raise AssertionError(f"free queue {list(cache.pool.free_queue)} != blocks with ref count 0")
        kv = cache.kv[0, :, :, 0, :, 0]  # (K|V, block, row)
        held = [[[] for _ in range(block_size)] for _ in range(num_blocks)]
        for s in live:
            for p in cache.held_positions(s).tolist():
                slot = pooled_slot(cache.block_table(s), 0, p, block_size)
                block, row = divmod(slot, block_size)
                if kv[0, block, row] != p:
                    raise AssertionError(f"sequence {s} position {p}: slot {slot} holds {kv[0, block, row]}")
                held[block][row].append(s)
        stored = [[(int(kv[0, b, r]), int(kv[1, b, r])) if written[b, r] else None for r in range(block_size)]
                  for b in range(num_blocks)]
        return {"op": label, "tables": tables, "lengths": {s: cache.get_seq_length(s) for s in live},
                "ref_counts": refs, "free_queue": list(cache.pool.free_queue), "copies": [tuple(c) for c in copies],
                "new_blocks": list(taken), "stored": stored, "held": held}

    events = [record("new pool")]
    for op in ops:
        free_before = list(cache.pool.free_queue)
        if op[0] == "fork":
            child = cache.fork(op[1])
            events.append(record(f"fork seq {op[1]} -> seq {child}"))
            continue
        if op[0] == "release":
            cache.release(op[1])
            events.append(record(f"release seq {op[1]}"))
            continue
        _, num_tokens, seq_ids = op
        step = cache.plan(num_tokens, seq_ids)
        k = step.positions.astype(np.float32)[:, :, None, None]
        v = np.broadcast_to(np.asarray(seq_ids, np.float32)[:, None, None, None], k.shape).copy()
        cache.write(step, 0, k, v)
        cache.advance(step)
        for source, target in step.copies.tolist():  # write copies the blocks first, then scatters the tokens
            written[target] = written[source]
        for slot in step.slots.reshape(-1).tolist():
            written[slot // block_size, slot % block_size] = True
        positions = step.positions[0].tolist()
        label = f"seq {seq_ids[0]}: p {positions[0]}" + (f"..{positions[-1]}" if num_tokens > 1 else "")
        kind = "prefill" if positions[0] == 0 else "append"
        taken = [b for b in free_before if b not in cache.pool.free_queue]
        events.append(record(f"{kind} {label}", step.copies.tolist(), taken))
    return events


def pooled_tables_figure(events=None, num_blocks=8, block_size=4):
    """The pool of a real PooledCache after each operation (:func:`pooled_tables_events`): one row per operation,
    every block as B cells holding the positions stored there (read back from ``cache.kv``), coloured by the
    sequences that hold them; ref counts above the blocks, the block tables and the free queue on the right, and the
    copy-on-write copy as an arrow."""
    from matplotlib.patches import FancyArrowPatch, Patch, Rectangle

    events = events or pooled_tables_events(num_blocks, block_size)
    B = block_size
    gap = 0.6
    width = num_blocks * (B + gap)
    fig = Figure(figsize=(16, 1.4 * len(events) + 1.6), layout="constrained")
    ax = fig.subplots()
    row_h = 2.3
    for y_index, e in enumerate(events):
        y = y_index * row_h
        for b in range(num_blocks):
            x0 = b * (B + gap)
            ref = e["ref_counts"][b]
            for r in range(B):
                sharers = e["held"][b][r]
                stored = e["stored"][b][r]
                if ref == 0:
                    face = FREE_COLOR
                elif len(sharers) > 1:
                    face = SHARED_COLOR
                elif sharers:
                    face = SEQ_COLORS[sharers[0] % len(SEQ_COLORS)]
                else:
                    face = "white"  # an allocated slot no token fills yet: internal fragmentation
                ax.add_patch(Rectangle((x0 + r, y), 1, 1, facecolor=face, edgecolor="#999999", lw=0.6))
                if stored is not None:
                    ax.text(x0 + r + 0.5, y + 0.5, f"p{stored[0]}", ha="center", va="center", fontsize=7.5,
                            color="#aaaaaa" if ref == 0 or not sharers else "black")
            edge, lw, ls = (("#54278f", 2.6, "-") if ref >= 2 else ("black", 1.4, "-") if ref == 1
                            else ("#bbbbbb", 1.0, "--"))
            if b in e["new_blocks"]:
                edge, lw = "#d62728", 2.6
            ax.add_patch(Rectangle((x0, y), B, 1, facecolor="none", edgecolor=edge, lw=lw, ls=ls, zorder=3))
            label = f"ref {ref}" if ref else f"free #{e['free_queue'].index(b)}"
            ax.text(x0 + B / 2, y - 0.12, f"block {b}: {label}", ha="center", va="bottom", fontsize=7.5,
                    color="#54278f" if ref >= 2 else ("black" if ref else "#888888"),
                    fontweight="bold" if ref >= 2 else "normal")
        for source, target in e["copies"]:
            ax.add_patch(FancyArrowPatch(((source + 0.5) * (B + gap) - gap / 2, y + 1.02),
                                         ((target + 0.5) * (B + gap) - gap / 2, y + 1.02),
                                         connectionstyle="arc3,rad=0.35", arrowstyle="-|>", mutation_scale=14,
                                         color="#d62728", lw=1.8, zorder=5))
            ax.text((source + target + 1) / 2 * (B + gap) - gap / 2, y + 1.62, f"copy-on-write: block {source} "
                    f"-> {target}", ha="center", va="center", fontsize=8, color="#d62728", fontweight="bold")
        lines = [f"seq {s}: table {t}, L = {e['lengths'][s]}" for s, t in e["tables"].items()]
        lines.append(f"free queue (head first): {e['free_queue']}")
        ax.text(width + 0.3, y + 0.5, "\n".join(lines), va="center", ha="left", fontsize=8, family="monospace")
    ax.set_xlim(-0.3, width + 17)
    ax.set_ylim(len(events) * row_h - 0.3, -0.9)
    ax.set_yticks([i * row_h + 0.5 for i in range(len(events))], [e["op"] for e in events], fontsize=9)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"{num_blocks} blocks of B = {B} token slots; position p of a sequence lives in slot "
                 f"table[p // {B}] * {B} + p % {B}", fontsize=10)
    handles = [Patch(facecolor=SEQ_COLORS[0], label="held by seq 0"), Patch(facecolor=SEQ_COLORS[1],
                                                                             label="held by seq 1"),
               Patch(facecolor=SHARED_COLOR, edgecolor="#54278f", lw=2.6, label="shared (ref >= 2): listed by both "
                                                                                 "tables"),
               Patch(facecolor="white", edgecolor="black", label="allocated, not yet filled (fragmentation)"),
               Patch(facecolor=FREE_COLOR, edgecolor="#bbbbbb", ls="--", label="free (ref 0; old values stay, "
                                                                               "greyed)"),
               Patch(facecolor="white", edgecolor="#d62728", lw=2.6, label="taken from the free queue's head "
                                                                          "by this operation")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8.5)
    fig.suptitle("PooledCache: block tables, ref counts, copy-on-write and the free queue (a real cache, python "
                 "backend; cells read back from cache.kv)", fontsize=12)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 14. Pooled memory: a batch of mixed lengths, flat vs blocks of B tokens
# ---------------------------------------------------------------------------------------------------------------
def request_lengths(n=32, median=256, sigma=1.0, min_len=8, max_len=2048, seed=0):
    """``n`` request lengths (tokens): lognormal with the given median and sigma, rounded and clipped to
    [min_len, max_len], a fixed seed: many short requests and a long tail, the shape of chat serving traces."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), min_len, max_len)
    return [int(n) for n in lengths]


def pooled_memory_samples(model="llama-3-8b", lengths=None, block_sizes=(1, 8, 16, 32, 128), backend="python",
                          detail_block_size=16):
    """Measure the K/V bytes a batch of sequences of ``lengths`` (default :func:`request_lengths`) takes in a
    FlatCache sized for the longest and in PooledCaches of each block size, all really filled.

    The caches are real but small: a shape with 1 layer, 1 KV head and head_dim 8 in ``model``'s dtype, so
    ``scale = bytes_per_token(model) / bytes_per_token(small)`` converts their bytes to ``model``'s exactly (every
    byte count is token slots * bytes_per_token; tests/test_shapes_memory.py checks it on every shape). Each
    PooledCache gets a pool of ``sum(L) // B + len(lengths)`` blocks (room for any batch of these lengths) and one
    prefill step per sequence (plan, write, advance).

    Returns a dict: model (a preset name), model_shape (its fp16 shape), shape (the small one), scale, lengths,
    block_sizes, flat_nbytes (``FlatCache(batch=n, max_tokens=max(L)).nbytes``), held_bytes (sum(L) *
    bytes_per_token), and per block size lists bytes_used, nbytes, blocks_used and internal_fragmentation from
    ``stats()``; detail (for
    ``detail_block_size``: each sequence's allocated slots, len(block_table) * B). Raises AssertionError if a
    measurement differs from :mod:`kvref.memory`'s formulas.
    """
    model_shape = preset(model)
    lengths = list(lengths or request_lengths())
    small = CacheShape(layers=1, q_heads=1, kv_heads=1, head_dim=8, dtype=model_shape.dtype)
    scale = memory.bytes_per_token(model_shape) // memory.bytes_per_token(small)
    n = len(lengths)
    flat = FlatCache(small, batch=n, max_tokens=max(lengths), backend=backend)
    samples = {"model": model, "model_shape": model_shape, "shape": small,
               "scale": scale, "lengths": lengths, "block_sizes": list(block_sizes), "flat_nbytes": flat.nbytes,
               "held_bytes": sum(lengths) * memory.bytes_per_token(small), "bytes_used": [], "nbytes": [],
               "blocks_used": [], "internal_fragmentation": [], "detail": None}
    if flat.nbytes != memory.cache_bytes(small, n, max(lengths)):
        raise AssertionError("FlatCache.nbytes differs from memory.cache_bytes")
    for B in block_sizes:
        cache = PooledCache(small, num_blocks=sum(lengths) // B + n, block_size=B, batch=n, backend=backend)
        for seq, length in enumerate(lengths):
            step = cache.plan(length, [seq])
            k = np.zeros((1, length, small.kv_heads, small.head_dim), small.public_dtype)
            cache.write(step, 0, k, k)
            cache.advance(step)
        stats = cache.stats()
        if (stats["bytes_used"], stats["internal_fragmentation"], stats["blocks_used"]) != (
                memory.pooled_used_bytes(small, lengths, B), memory.internal_fragmentation(lengths, B),
                memory.blocks_needed(lengths, B)):
            raise AssertionError(f"B = {B}: stats() {stats['bytes_used']} bytes used differ from the formulas")
        samples["bytes_used"].append(stats["bytes_used"])
        samples["nbytes"].append(cache.nbytes)
        samples["blocks_used"].append(stats["blocks_used"])
        samples["internal_fragmentation"].append(stats["internal_fragmentation"])
        if B == detail_block_size:
            samples["detail"] = {"block_size": B,
                                 "allocated": [len(cache.block_table(s)) * B for s in range(n)]}
    return samples


def pooled_memory_figure(samples=None, max_block_size=256):
    """(a) K/V bytes of a batch of mixed lengths (:func:`pooled_memory_samples`, converted to the model's bytes)
    against the block size B: a FlatCache sized for the longest sequence, the tokens actually held, and
    PooledCaches' measured ``stats()["bytes_used"]`` on :func:`kvref.memory.pooled_used_bytes` for every B up to
    ``max_block_size``; the right axis reads the small caches' measured bytes. (b) per sequence at one B: the slots
    a flat cache reserves, the slots the pool allocates (ceil(L / B) * B) and the tokens held."""
    samples = samples or pooled_memory_samples()
    shape, small, scale = samples["model_shape"], samples["shape"], samples["scale"]
    lengths = samples["lengths"]
    n = len(lengths)
    per_token = memory.bytes_per_token(shape)
    fig = Figure(figsize=(15, 5.6), layout="constrained")
    ax, ax_seq = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})

    flat = samples["flat_nbytes"] * scale
    held = samples["held_bytes"] * scale
    sizes = np.arange(1, max_block_size + 1)
    formula = [memory.pooled_used_bytes(shape, lengths, int(b)) for b in sizes]
    ax.axhline(flat, color=RECOMPUTE_COLOR, lw=2, label=f"FlatCache sized for the longest ({max(lengths)} tokens): "
                                                        f"measured nbytes x scale = {short_bytes(flat)}")
    ax.axhline(held, color="k", ls=":", lw=1.2, label=f"tokens held: sum(L) = {sum(lengths):,} tokens = "
                                                       f"{short_bytes(held)}")
    ax.plot(sizes, formula, color=CACHED_COLOR, lw=1.2,
            label="memory.pooled_used_bytes: sum ceil(L / B) · B · bytes_per_token")
    used = np.array(samples["bytes_used"]) * scale
    ax.plot(samples["block_sizes"], used, "o", color=CACHED_COLOR, ms=8, mfc="white", mew=2,
            label="measured: PooledCache.stats()['bytes_used'] x scale")
    for i, (b, u, frag) in enumerate(zip(samples["block_sizes"], used, samples["internal_fragmentation"])):
        text_at = (b * (0.85 if i == 0 else 1), held + (flat - held) * (0.12 + 0.16 * i))  # staggered upwards
        ax.annotate(f"B = {b}: {short_bytes(u)}, {flat / u:.2f}x less than flat\n{frag:,} empty slots "
                    f"(internal fragmentation)", (b, u), xytext=text_at,
                    ha="left" if i == 0 else "center", va="bottom", fontsize=7.5,
                    arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.8})
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8, 16, 32, 64, 128, 256], ["1", "2", "4", "8", "16", "32", "64", "128", "256"])
    ax.set_xlim(0.6, max_block_size * 1.6)
    top = flat * 1.12
    tick = memory.GIB // 2 if flat > memory.GIB else max(1, 2 ** int(np.log2(flat / 8)))
    ax.set_ylim(0, top)
    ax.set_yticks(np.arange(0, top, tick))
    _bytes_axis(ax)
    ax.set_xlabel("block size B (tokens per block)")
    ax.set_ylabel(f"{samples['model']} K/V bytes ({shape.dtype}, {per_token // 1024} KiB/token)")
    right = ax.twinx()
    right.set_ylim(0, top / scale)
    right.set_yticks(np.arange(0, top, tick) / scale)
    _bytes_axis(right)
    right.set_ylabel(f"measured bytes of the real small caches ({small.layers} layer, {small.kv_heads} KV head x "
                     f"{small.head_dim}; x {scale:,} = left)", fontsize=8)
    ax.set_title(f"(a) a batch of {n} requests, {samples['model']}: flat vs pooled, by block size", fontsize=10)
    ax.legend(fontsize=7.5, loc="lower right")
    ax.grid(alpha=0.3)

    detail = samples["detail"]
    order = np.argsort(lengths)[::-1]
    y = np.arange(n)
    B = detail["block_size"]
    ax_seq.barh(y, [max(lengths)] * n, 0.8, color="none", edgecolor=RECOMPUTE_COLOR, lw=0.8,
                label=f"FlatCache: max(L) = {max(lengths)} slots each")
    ax_seq.barh(y, [detail["allocated"][i] for i in order], 0.8, color="#c6dbef", edgecolor=CACHED_COLOR, lw=0.6,
                label=f"PooledCache, B = {B}: ceil(L / B) · B slots (len(block_table) · B)")
    ax_seq.barh(y, [lengths[i] for i in order], 0.45, color=CACHED_COLOR, label="tokens held: L")
    total_alloc = sum(detail["allocated"])
    ax_seq.set_yticks(y, [f"{lengths[i]}" for i in order], fontsize=6.5)
    ax_seq.set_ylim(n - 0.4, -0.6)
    ax_seq.set_xlabel("token slots")
    ax_seq.set_ylabel("sequences (their lengths L)")
    ax_seq.set_title(f"(b) per sequence at B = {B}: {n * max(lengths):,} slots flat, {total_alloc:,} pooled "
                     f"for {sum(lengths):,} tokens\n(the pool wastes at most B - 1 slots per sequence: "
                     f"{total_alloc - sum(lengths):,} in all)", fontsize=10)
    ax_seq.legend(fontsize=7.5, loc="lower right")
    ax_seq.grid(alpha=0.3, axis="x")
    fig.suptitle("Pooled (paged) memory: blocks of B tokens on demand instead of max(L) slots per sequence "
                 "(real caches, measured)", fontsize=12)
    return fig


__all__ = [
    "FIGURE_CAPTIONS", "FIGURE_NAMES", "LLAMA_CPP_FA_NMSE", "LLAMA_CPP_MEASURED", "LLAMA_CPP_TOTAL_ERROR",
    "QUANT_BOUNDS", "RING_TIMELINE_STEPS", "TOLERANCES", "TWO_TIER_CHECK_STEPS", "TWO_TIER_TIMELINE_STEPS",
    "TwoTierHistory", "VARIANT_CHECKS", "backend_max_error", "check_backends", "chunked_prefill_events",
    "chunked_prefill_figure", "cost_figure", "error_shape", "flat_timeline_events", "flat_timeline_figure",
    "format_bits", "format_bytes", "generation_counts", "layouts_figure", "llama_cpp_rmse", "llama_cpp_test_data",
    "measure_decode_times", "memory_figure", "memory_rows", "nmse", "prefill_tier_rows", "quant_block_layout",
    "quant_blocks_figure", "quant_error_figure", "quant_error_rows", "reference_attention", "ring_backend_max_error",
    "ring_memory_figure", "ring_memory_samples", "ring_timeline_events", "ring_timeline_figure", "round_trip", "save",
    "short_bytes", "tail_after", "tinyllama_row", "two_tier_backend_max_error", "two_tier_error_figure",
    "two_tier_error_rows", "two_tier_memory_figure", "two_tier_memory_samples", "two_tier_timeline_events",
    "two_tier_timeline_figure", "window_conventions_figure", "window_masks", "POOLED_CHECK_OPS", "POOLED_TABLES_OPS",
    "pooled_backend_max_error", "pooled_memory_figure", "pooled_memory_samples", "pooled_tables_events",
    "pooled_tables_figure", "request_lengths",
]


def main(argv=None):
    """Command line: see ``python -m kvref.plots --help``. Returns the exit status."""
    from .__main__ import main as _main

    return _main(argv)
