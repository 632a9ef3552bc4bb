"""Figures of the pooled (paged) cache (``kvref/pooled.py``): the block tables, ref counts, copy-on-write copy and
free queue of a real PooledCache after each operation (:func:`pooled_tables_figure`), and the bytes of a batch of
mixed lengths, flat against blocks of B tokens (:func:`pooled_memory_figure`)."""

import numpy as np
from matplotlib.figure import Figure

from .. import CacheShape, FlatCache, PooledCache, memory, preset
from ..pooled import pooled_slot
from .style import CACHED_COLOR, RECOMPUTE_COLOR, bytes_axis, short_bytes


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
# Pooled memory: a batch of mixed lengths, flat vs blocks of B tokens
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
    bytes_axis(ax)
    ax.set_xlabel("block size B (tokens per block)")
    ax.set_ylabel(f"{samples['model']} K/V bytes ({shape.dtype}, {per_token // 1024} KiB/token)")
    right = ax.twinx()
    right.set_ylim(0, top / scale)
    right.set_yticks(np.arange(0, top, tick) / scale)
    bytes_axis(right)
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
                label=f"PooledCache, B = {B}: ceil(L / B) · B slots")
    ax_seq.barh(y, [lengths[i] for i in order], 0.45, color=CACHED_COLOR, label="tokens held: L")
    total_alloc = sum(detail["allocated"])
    ax_seq.set_yticks(y, [f"{lengths[i]}" for i in order], fontsize=6.5)
    ax_seq.set_ylim(n - 0.4, -0.6)
    ax_seq.set_xlabel("token slots")
    ax_seq.set_ylabel("sequences (their lengths L)")
    ax_seq.set_title(f"(b) per sequence at B = {B}: {n * max(lengths):,} slots flat, {total_alloc:,} pooled "
                     f"for {sum(lengths):,} tokens\n(the pool wastes at most B - 1 slots per sequence: "
                     f"{total_alloc - sum(lengths):,} in all)", fontsize=10)
    # below the axes: the flat cache's max(L) slots fill every row, so any spot inside would cover data
    ax_seq.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    ax_seq.grid(alpha=0.3, axis="x")
    fig.suptitle("Pooled (paged) memory: blocks of B tokens on demand instead of max(L) slots per sequence "
                 "(real caches, measured)", fontsize=12)
    return fig

