"""Figures of the flat cache (``kvref/flat.py``): a real FlatCache's length across append, a rejected overflow, crop
and reset next to seed 001's corrupted position (:func:`flat_timeline_figure`), and the element offsets of the
head-major and token-major layouts (:func:`layouts_figure`)."""

import numpy as np
from matplotlib.figure import Figure

from .. import CacheOverflowError, CacheShape, FlatCache
from ..shapes import element_offset
from .style import CACHED_COLOR, RECOMPUTE_COLOR


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
# Head-major vs token-major layout
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

