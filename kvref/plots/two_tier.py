"""Figures of the two-tier cache (``kvref/two_tier.py``): the tier of every position of a real TwoTierCache after
each step (:func:`two_tier_timeline_figure`), its memory against a flat fp16 cache's (:func:`two_tier_memory_figure`)
and its attention error against the tail length and after a prefill (:func:`two_tier_error_figure`)."""

import numpy as np
from matplotlib.figure import Figure

from .. import CacheShape, FlatCache, TwoTierCache, memory, preset, quant
from ..check import TwoTierHistory, checked_step, nmse, random_step_inputs, reference_attention, round_trip
from ..two_tier import migrate_to
from .style import (CACHED_COLOR, EVICTED_COLOR, QUANT_COLORS, RECOMPUTE_COLOR, STORE_COLOR, TAIL_COLOR,
                    bytes_axis, context_label, short_bytes)


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

    def expected(layer, seq, i, k, v, q, step):
        history[layer].add(k, v)
        return history[layer].expected(q, step.positions[i], int(step.tiers[i, 0]), max_tokens, scale)

    for num_tokens in steps:
        before = cache.tiers()
        worst, step = checked_step(cache, rng, num_tokens, [0], expected)
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
            fed = history[layer].fed
            fed = np.stack([rows[:, lo:hi] for rows in (fed.keys, fed.values)]).astype(np.float32)
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
# Two-tier memory
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
                      label=f"two-tier {fmt}, held: R = {tail_tokens} fp16 + the rest at {store_token // 1024} "
                            "KiB/token")
        ax_model.axhline(allocated, color=color, ls="--", lw=1,
                         label="  allocated: two_tier_bytes (R + S = M + B - 1 slots)")
        # one ratio, the one index.html's two-tier table gives: allocated bytes of the two caches for M tokens
        ax_model.annotate(f"{short_bytes(allocated)} allocated\n{flat_end / allocated:.2f}x less than flat",
                          (top, allocated), xytext=(-4, 4), textcoords="offset points", ha="right", va="bottom",
                          color=color, fontweight="bold", fontsize=9)
    ax_model.axvline(context, color="k", ls=":", lw=1)
    ax_model.text(context, flat_end * 0.97, f"  n = M = {context_label(context)}: the two-tier cache\n  evicts "
                  "its oldest token per step", fontsize=8, va="top")
    ticks = np.arange(0, top + 1, context // 4)
    ax_model.set_xticks(ticks, [context_label(int(v)) for v in ticks])
    ax_model.set_yticks(np.arange(0, flat_end * 1.1, flat_end / 8))
    bytes_axis(ax_model)
    ax_model.set_ylim(0, flat_end * 1.1)
    ax_model.set_xlabel("tokens generated n (batch 1)")
    ax_model.set_ylabel("K/V bytes held")
    ax_model.set_title(f"(a) {model} ({shape.layers}L, {shape.kv_heads} KV heads x {shape.head_dim}): formulas, "
                       f"B = {migration_batch}\nx less = FlatCache bytes / two_tier_bytes, both allocated for M = "
                       f"{context_label(context)} tokens", fontsize=10)
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
    bytes_axis(ax_small)
    ax_small.set_title(f"(b) measured: a real TwoTierCache, {small.layers}L, {small.kv_heads} KV heads x "
                       f"{small.head_dim}, {small.dtype} tail, {fmt} store,\nR = {r}, B = {b}, M = {m} (the "
                       f"sawtooth: each migration moves B tokens to the store)", fontsize=10)
    ax_small.legend(fontsize=7.5, loc="upper left")
    ax_small.grid(alpha=0.3)
    fig.suptitle("Two-tier memory: an fp16 tail of R tokens plus ggml blocks for the rest; flat in n once past M",
                 fontsize=12)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Two-tier attention error vs the tail length, and after a prefill (transformers #35185)
# ---------------------------------------------------------------------------------------------------------------
#: llama.cpp ``tests/test-backend-ops.cpp``: the NMSE a flash-attention backend may differ from the CPU by. A
#: backend-consistency threshold, not a quality target; drawn for scale only
LLAMA_CPP_FA_NMSE = 5e-4


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

    Returns a dict: shape, context, decode, tails, formats, migration_batch, nmse and max_abs ({fmt: [per R]}),
    quantized ({fmt: [store tokens at the last step, per R]}), fp16_nmse, reference_rms (RMS of the fp32 outputs).
    """
    shape = error_shape()
    k, v, q = _random_model_inputs(shape, context, seed)
    prefill = context - decode
    reference = _run(FlatCache(shape.with_dtype("float32"), batch=1, max_tokens=context, backend=backend), k, v, q,
                     prefill, context)
    fp16 = _run(FlatCache(shape, batch=1, max_tokens=context, backend=backend), k, v, q, prefill, context)
    rows = {"shape": shape, "context": context, "decode": decode, "tails": list(tails), "formats": list(formats),
            "migration_batch": migration_batch,
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
    ax_tail.set_xlabel(f"tail length R (fp16 tokens) of n = {n} held; B = min({rows.get('migration_batch', 64)}, R)")
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
    ax_prefill.set_ylim(low, max(max(v) for v in prefill_rows["hf"].values()) * 8)
    ax_prefill.set_xlabel(f"prompt length P (R = residual_length = {r}); numbers: prompt tokens kvref quantizes")
    ax_prefill.set_ylabel("NMSE of the first decode steps' attention output")
    ax_prefill.set_title(f"(b) the first {prefill_rows['decode']} decode steps after a prompt of P tokens: kvref "
                         "keeps a prompt\nshorter than R in fp16; HF quantizes all of it (same ggml format here)",
                         fontsize=9.5)
    ax_prefill.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # below: no room above
    ax_prefill.grid(alpha=0.3, which="both")
    fig.suptitle("Attention-output error of the two-tier cache: the fp16 tail is exact up to fp16, the store "
                 "costs in proportion to what it holds", fontsize=12)
    return fig

