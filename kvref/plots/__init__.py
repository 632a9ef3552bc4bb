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

:func:`check_backends` compares every available backend with :func:`reference_attention`, a float64 NumPy attention
computed from what the cache stores, before anything is timed.
"""

import os
import time

import numpy as np
from matplotlib.figure import Figure

from .. import memory
from ..backends import backends
from ..errors import CacheOverflowError
from ..flat import FlatCache
from ..shapes import PRESETS, CacheShape, element_offset, preset

#: the figures ``python -m kvref.plots`` writes, in order (file stem -> what it shows)
FIGURE_NAMES = ("memory", "cost", "flat_timeline", "layouts")

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
def reference_attention(q, keys, values, positions, scale):
    """Float64 causal attention from stored K/V: gather, softmax, matmul.

    q: (T, q_heads, D); keys, values: (kv_heads, n, D) as ``FlatCache.keys()`` returns them; positions: (T,) absolute
    positions (token t sees keys 0 .. positions[t]). Query head qh reads KV head qh // G. Returns (T, q_heads, D).
    """
    q = np.asarray(q, np.float64)
    group = q.shape[1] // keys.shape[0]
    k = np.repeat(np.asarray(keys, np.float64), group, axis=0)  # (q_heads, n, D)
    v = np.repeat(np.asarray(values, np.float64), group, axis=0)
    out = np.empty(q.shape, np.float64)
    for t, p in enumerate(np.asarray(positions).tolist()):
        scores = np.einsum("hd,hnd->hn", q[t], k[:, :p + 1]) * float(scale)
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        out[t] = np.einsum("hn,hnd->hd", weights, v[:, :p + 1])
    return out


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
            kv_dims = (n, num_tokens, shape.kv_heads, shape.head_dim)
            k = rng.standard_normal(kv_dims).astype(shape.public_dtype)
            v = rng.standard_normal(kv_dims).astype(shape.public_dtype)
            q = rng.standard_normal((n, num_tokens, shape.q_heads, shape.head_dim)).astype(np.float32)
            cache.write(step, layer, k, v)
            outs.append((layer, q, cache.attend(step, layer, q)))
        cache.advance(step)  # keys()/values() return the stored rows up to the (new) length
        for layer, q, out in outs:
            for i, seq in enumerate(seq_ids):
                expected = reference_attention(q[i], cache.keys(layer, seq), cache.values(layer, seq),
                                               step.positions[i], scale)
                worst = max(worst, float(np.max(np.abs(out[i] - expected))))
    return worst


def check_backends(names=None, dtypes=("float32", "float16")):
    """Check every available backend against :func:`reference_attention`.

    Returns a list of dicts: backend, dtype, available, reason, max_error, tolerance, ok, seconds. A backend that
    is not available is listed with ok=None (skipped), never as a failure.
    """
    status = backends()
    results = []
    for name in names or ("python", "cpu", "cuda"):
        available, reason = status[name]
        for dtype in dtypes:
            row = {"backend": name, "dtype": dtype, "available": available, "reason": reason, "max_error": None,
                   "tolerance": TOLERANCES[name], "ok": None, "seconds": 0.0}
            if available:
                start = time.perf_counter()
                row["max_error"] = backend_max_error(name, dtype)
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


__all__ = [
    "FIGURE_NAMES", "TOLERANCES", "backend_max_error", "check_backends", "cost_figure", "flat_timeline_events",
    "flat_timeline_figure", "format_bytes", "generation_counts", "layouts_figure", "measure_decode_times",
    "memory_figure", "memory_rows", "reference_attention", "save", "short_bytes", "tinyllama_row",
]


def main(argv=None):
    """Command line: see ``python -m kvref.plots --help``. Returns the exit status."""
    from .__main__ import main as _main

    return _main(argv)
