"""Figures of what a KV cache costs and saves: memory for published models (:func:`memory_figure`, with seed 003's
query-head formula and tensor-parallel sharding) and the work and time per generated token with and without a cache
(:func:`cost_figure`: O(n) against O(n²), seed 002's count corrected), plus the tables behind them."""

import time

import numpy as np
from matplotlib.figure import Figure

from .. import memory
from ..shapes import PRESETS, CacheShape, preset
from .style import (CACHED_COLOR, MODEL_COLORS, RECOMPUTE_COLOR, SEED_COLOR, bytes_axis, context_label,
                    short_bytes)

#: the four GQA presets (kv_heads < q_heads), where the query-head formula of seed 003 is wrong
GQA_PRESETS = ("tinyllama-1.1b", "llama-3-8b", "mistral-7b", "phi-4")


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
    ax_ctx.set_xticks(contexts, [context_label(n) for n in contexts])
    bytes_axis(ax_ctx)
    ax_ctx.set_xlabel("context length (tokens), batch 1")
    ax_ctx.set_ylabel(f"KV-cache bytes ({dtype})")
    ax_ctx.set_title("(a) bytes = 2 · layers · kv_heads · head_dim · bytes · tokens", fontsize=10)
    ax_ctx.grid(True, which="major", alpha=0.3)
    # the lines rise to the right, so the upper left is free: room above the highest line for the legend
    low, high = ax_ctx.dataLim.y0, ax_ctx.dataLim.y1
    ax_ctx.set_ylim(low / 2, high * 16)
    ax_ctx.legend(fontsize=7, loc="upper left")

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
    ax_wrong.set_ylabel(f"bytes at {context_label(wrong_context)} tokens ({dtype})")
    top = max(wrong) * 1.2
    step = memory.GIB if top > 2 * memory.GIB else memory.GIB // 4
    ax_wrong.set_yticks(np.arange(0, top, step))
    bytes_axis(ax_wrong)
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
    bytes_axis(ax_tp)
    ax_tp.set_ylim(min(ideal) / 2, max(per_rank) * 4)
    ax_tp.set_xlabel("tp_size (GPUs)")
    ax_tp.set_ylabel(f"bytes per rank at {context_label(tp_context)} tokens")
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
# Cost of decoding with and without a cache
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

