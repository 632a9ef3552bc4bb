"""Figures of the ring (sliding-window) cache (``kvref/ring.py``): the position each slot of a real RingCache holds
after each step (:func:`ring_timeline_figure`), its memory against a flat cache's (:func:`ring_memory_figure`), one
window W in several systems' conventions (:func:`window_conventions_figure`), and why a chunk that wraps the ring is
deferred (:func:`chunked_prefill_figure`)."""

import numpy as np
from matplotlib.figure import Figure

from .. import CacheShape, FlatCache, RingCache, memory, preset
from ..check import Fed, checked_step, reference_attention
from .style import CACHED_COLOR, RECOMPUTE_COLOR, bytes_axis, context_label, short_bytes


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
    fed = [Fed(shape.kv_heads, shape.head_dim) for _ in range(shape.layers)]

    def expected(layer, seq, i, k, v, q, step):
        fed[layer].add(k, v)
        return reference_attention(q, fed[layer].keys, fed[layer].values, step.positions[i], scale, window, sinks)

    events = [{"op": "new", "tokens": 0, "positions": [], "slots": [], "deferred": False, "length": 0,
               "slot_positions": cache.slot_positions[0, 0].tolist(), "overwritten": [], "max_error": 0.0}]
    for num_tokens in steps:
        before = cache.slot_positions[0, 0].tolist()
        worst, step = checked_step(cache, rng, num_tokens, [0], expected)
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
# Ring memory: flat in n past W
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
                  label="ring: slots in use, min(n, W) · bytes_per_token")
    ax_model.axhline(ring_total, color=CACHED_COLOR, ls="--", lw=1,
                     label=f"ring allocated: ring_bytes(W) = {short_bytes(ring_total)} "
                           f"(+ {short_bytes(positions)} int64 slot positions)")
    ax_model.axvline(window, color="k", ls=":", lw=1)
    ax_model.text(window, max_tokens * per_token * 0.6, f"  n = W = {window}", fontsize=9, va="top")
    flat_end = max_tokens * per_token
    ax_model.annotate(f"{short_bytes(flat_end)}", (max_tokens, flat_end), xytext=(-6, 0), textcoords="offset points",
                      ha="right", va="center", color=RECOMPUTE_COLOR, fontweight="bold")
    ax_model.annotate(f"{short_bytes(ring_total)} ({flat_end / ring_total:.0f}x less at n = "
                      f"{context_label(max_tokens)})", (max_tokens, ring_total), xytext=(-6, 8),
                      textcoords="offset points", ha="right", va="bottom", color=CACHED_COLOR, fontweight="bold")
    ax_model.set_xticks(np.arange(0, max_tokens + 1, max_tokens // 8),
                        [context_label(int(v)) for v in np.arange(0, max_tokens + 1, max_tokens // 8)])
    memory_ticks = np.arange(0, flat_end * 1.05, max(memory.GIB // 2, flat_end // 8))
    ax_model.set_yticks(memory_ticks)
    bytes_axis(ax_model)
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
    bytes_axis(ax_small)
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
# One window, several conventions
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
# Chunked prefill through a ring (rasbt/LLMs-from-scratch #1013)
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
    ring.attend_tokens(kv, slot_positions, 0, seq_ids, step.positions, empty, empty, window, 0, q, scale, naive,
                       shape.group_size, shape.head_dim)

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
            lost = sorted(set().union(*ev["missing"].values()))  # distinct: several queries may miss one key
            pairs = sum(len(v) for v in ev["missing"].values())
            plural = "s" if len(lost) != 1 else ""
            ax.set_title(f"write the chunk first (slot p % {window}), then attend\nring = {{{slots}}}: "
                         f"{len(lost)} needed key{plural} overwritten (key{plural} {', '.join(map(str, lost))}; "
                         f"{pairs} query-key pairs lost)\nmax |error| vs float64 "
                         f"{ev['write_first_error']:.2f}", fontsize=10, color="#d62728")
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

