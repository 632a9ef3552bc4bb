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

:func:`check_backends` compares every available backend, flat and ring, with :func:`reference_attention`, a float64
NumPy attention computed from the K/V fed to the cache, before anything is timed.
"""

import os
import time

import numpy as np
from matplotlib.figure import Figure

from .. import memory
from ..backends import backends
from ..errors import CacheOverflowError
from ..flat import FlatCache
from ..ring import RingCache
from ..shapes import PRESETS, CacheShape, element_offset, preset

#: the figures ``python -m kvref.plots`` writes, in order (file stem -> what it shows)
FIGURE_NAMES = ("memory", "cost", "flat_timeline", "layouts", "ring_timeline", "ring_memory", "window_conventions",
                "chunked_prefill")

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
    """Write ``fig`` as ``out_dir/name.png`` and ``out_dir/name.svg``; returns the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = os.path.join(out_dir, f"{name}.{ext}")
        fig.savefig(path, format=ext, dpi=110 if ext == "png" else None)
        paths.append(path)
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


#: the backend check of each cache variant: variant -> function(backend, dtype) returning the max |error|
VARIANT_CHECKS = {"flat": backend_max_error, "ring": ring_backend_max_error}


def check_backends(names=None, dtypes=("float32", "float16"), variants=("flat", "ring")):
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


__all__ = [
    "FIGURE_CAPTIONS", "FIGURE_NAMES", "RING_TIMELINE_STEPS", "TOLERANCES", "VARIANT_CHECKS", "backend_max_error",
    "check_backends", "chunked_prefill_events", "chunked_prefill_figure", "cost_figure", "flat_timeline_events",
    "flat_timeline_figure", "format_bytes", "generation_counts", "layouts_figure", "measure_decode_times",
    "memory_figure", "memory_rows", "reference_attention", "ring_backend_max_error", "ring_memory_figure",
    "ring_memory_samples", "ring_timeline_events", "ring_timeline_figure", "save", "short_bytes", "tinyllama_row",
    "window_conventions_figure", "window_masks",
]


def main(argv=None):
    """Command line: see ``python -m kvref.plots --help``. Returns the exit status."""
    from .__main__ import main as _main

    return _main(argv)
