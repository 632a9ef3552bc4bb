"""The independent side of the writer (``kvref/golden/write.py``): what was fed, the variants' rules restated, and
the outside oracles, so that no expected value is the spec's word alone.

* :class:`History` keeps every K/V row fed to each sequence (float64, by position) and computes the float64
  reference attention (``kvref.check``) of a step from it, never from what the cache reads back.
* :func:`oracle_quantize` / :func:`oracle_dequantize` are the ``gguf`` package's ggml quantizers.
* :func:`check_physical` restates each variant's layout rules (ring slots, two-tier tiers, pooled block tables, free
  queue, ref counts, FlashInfer and vLLM exports) from the docstrings of ``kvref/ring.py``, ``kvref/two_tier.py``,
  ``kvref/pooled.py`` and ``kvref/pool.py`` and checks the recorded physical state against them.

Taken from the spec without a restated rule: *which* block the pooled cache evicts when the pool runs dry, and the
free queue's order (it is checked to hold exactly the unlisted blocks, once each).
"""

import numpy as np

from .. import quant
from ..check import decode_attention_gqa, window_keys


class GoldenWriteError(AssertionError):
    """The spec and an independent check disagree while writing the suite."""


def gguf_available():
    """True if the gguf package (the independent quantizer) can be imported."""
    try:
        import gguf.quants  # noqa: F401
    except ImportError:
        return False
    return True


def oracle_quantize(x, fmt):
    """ggml blocks by the gguf package (the independent oracle), or by kvref's spec when gguf is not installed."""
    x = np.ascontiguousarray(x, np.float32)
    if gguf_available():
        from gguf import GGMLQuantizationType, quants

        return quants.quantize(x, getattr(GGMLQuantizationType, fmt.upper()))
    return quant.quantize(x, fmt, backend="python")


def oracle_dequantize(blocks, fmt, head_dim):
    """float32 rows of ggml blocks by gguf (or by kvref when gguf is not installed)."""
    if gguf_available():
        from gguf import GGMLQuantizationType, quants

        return quants.dequantize(np.ascontiguousarray(blocks), getattr(GGMLQuantizationType, fmt.upper())).astype(
            np.float32)
    return quant.dequantize(blocks, fmt, (blocks.shape[0], head_dim), backend="python")


def expect(condition, case, step, what):
    """Raise GoldenWriteError naming the case and step unless ``condition``."""
    if not condition:
        raise GoldenWriteError(f"case {case.name}, {step}: {what}")


# ---------------------------------------------------------------------------------------------------------------
# The independent side of a cache case: what was fed, and the rules of each variant, restated
# ---------------------------------------------------------------------------------------------------------------
class History:
    """Every K/V row fed to each sequence (float64, by position), the variants' visibility and holding rules, and
    the float64 reference attention of a step."""

    def __init__(self, case):
        self.case = case
        self.config = case.config
        self.rows = {s: {} for s in range(case.config.get("batch", 1))}  # seq -> {position: (k, v)}

    def length(self, seq):
        """Tokens fed to ``seq`` (its length L)."""
        return len(self.rows[seq])

    def feed(self, seq, k, v):
        """k, v: (layers, T, Hkv, D) of one sequence, appended at its length."""
        start = self.length(seq)
        for t in range(k.shape[1]):
            self.rows[seq][start + t] = (np.asarray(k[:, t], np.float64), np.asarray(v[:, t], np.float64))

    def apply(self, op, args):
        """Apply a non-append op (crop, reset, fork, add_sequence, release) to the history."""
        if op == "crop":
            for s in (self.rows if args["seq"] is None else [args["seq"]]):
                length = self.length(s)
                target = args["max_length"] if args["max_length"] >= 0 else length + args["max_length"]
                self.rows[s] = {p: r for p, r in self.rows[s].items() if p < target}
        elif op == "reset":
            for s in (self.rows if args["seq"] is None else [args["seq"]]):
                self.rows[s] = {}
        elif op == "fork":
            self.rows[args["child"]] = dict(self.rows[args["seq"]])
        elif op == "add_sequence":
            self.rows[args["child"]] = {}
        elif op == "release":
            del self.rows[args["seq"]]

    def stored_value(self, seq, position, tiers):
        """The row a query reads for ``position``: as fed, or its quantize/dequantize round trip when the two-tier
        cache keeps it in the store (``tiers`` = (e, m, L) of that sequence)."""
        k, v = self.rows[seq][position]
        if self.case.variant == "two_tier" and position < tiers[1]:
            fmt, head_dim = self.config["store_format"], self.config["head_dim"]
            k, v = (oracle_dequantize(oracle_quantize(x.reshape(-1, head_dim), fmt), fmt, head_dim).reshape(x.shape)
                    for x in (k, v))
        return np.asarray(k, np.float64), np.asarray(v, np.float64)

    def visible(self, position, first_held):
        """Positions a query at ``position`` may see by the variant's rule (before intersecting with those held)."""
        c = self.config
        if self.case.variant == "ring":
            return window_keys(position, c["window"], c.get("sinks", 0))
        if self.case.variant == "two_tier":
            return window_keys(position, c["max_tokens"])
        return list(range(first_held, position + 1))

    def held_rule(self, seq, first_held):
        """The positions ``seq`` must hold after a step, by the variant's rule."""
        length = self.length(seq)
        if length == 0:
            return []
        return self.visible(length - 1, first_held)

    def attention(self, seq, held_before, tiers_before, new_positions, k_new, v_new, q, first_after, layer):
        """Float64 reference output (T, Hq, D) of one sequence's step queries in one layer."""
        rows = {}
        for p in held_before:
            k, v = self.stored_value(seq, p, tiers_before)
            rows[p] = (k[layer], v[layer])
        for t, p in enumerate(new_positions):
            rows[p] = (np.asarray(k_new[t], np.float64), np.asarray(v_new[t], np.float64))
        out = []
        for t, p in enumerate(new_positions):
            seen = [j for j in self.visible(p, first_after) if j in rows]
            k = np.stack([rows[j][0] for j in seen], axis=1)  # (Hkv, n, D); seen holds p itself
            v = np.stack([rows[j][1] for j in seen], axis=1)
            out.append(decode_attention_gqa(q[t], k, v, self.config["scale"]))
        return np.stack(out)




# ---------------------------------------------------------------------------------------------------------------
# The physical layout of each variant, restated
# ---------------------------------------------------------------------------------------------------------------
def ring_slot(position, window, sinks):
    """The ring's slot of a position: ``p`` for a sink (p < S), else ``S + (p - S) % (W - S)`` (``p % W`` when
    S = 0)."""
    return position if position < sinks else sinks + (position - sinks) % (window - sinks)


def step_ring_slots(start, num_tokens, window, sinks):
    """Slots of a step's tokens at positions start .. start+T-1: -1 where a later token of the step takes the
    same slot (it is never written)."""
    slots = [ring_slot(p, window, sinks) for p in range(start, start + num_tokens)]
    return [-1 if slot in slots[t + 1:] else slot for t, slot in enumerate(slots)]


def check_ring(case, step, physical, history, append):
    """Ring: each slot holds the position the slot rule puts there (or is empty or stale), as fed; the
    step's slots follow the same rule, -1 where a later token of the step takes the slot."""
    c = case.config
    window, sinks = c["window"], c.get("sinks", 0)
    for s in range(c["batch"]):
        length = history.length(s)
        want = np.full(window, -1)
        for p in (window_keys(length - 1, window, sinks) if length else []):
            want[ring_slot(p, window, sinks)] = p
        for layer in range(c["layers"]):
            held = physical["slot_positions"][layer, s]
            stale = (want < 0) & ((held < 0) | (held >= length))  # empty, or cropped away (never visible)
            expect(np.all((held == want) | stale), case, step, f"ring slot positions of sequence {s}, layer {layer}:"
                   f" {held.tolist()}, the rule p -> slot gives {want.tolist()}")
            for slot in np.flatnonzero(want >= 0).tolist():
                fed_k, fed_v = history.rows[s][int(want[slot])]
                expect(np.array_equal(physical["k_slots"][layer, s, slot], fed_k[layer]) and np.array_equal(
                    physical["v_slots"][layer, s, slot], fed_v[layer]), case, step,
                    f"ring slot {slot} of sequence {s}, layer {layer} does not hold position {want[slot]} as fed")
    if append:
        ids, num_tokens, starts = append
        want = [step_ring_slots(start, num_tokens, window, sinks) for start in starts]
        expect(physical["step_slots"].tolist() == want, case, step, f"step slots {physical['step_slots'].tolist()}"
               f", the rule gives {want}")


def check_two_tier(case, step, physical, history):
    """Two-tier: the tiers [e, m, L] obey the migration and eviction rules, and the store holds ggml's
    (gguf's) bytes of the rows fed."""
    c = case.config
    for s in range(c["batch"]):
        evicted, migrated, length = physical["tiers"][s].tolist()
        expect(length == history.length(s) and evicted == max(0, length - c["max_tokens"])
               and evicted <= migrated <= length and length - migrated <= c["tail_tokens"]
               and migrated % c["migration_batch"] == 0, case, step,
               f"tiers [e, m, L] = {[evicted, migrated, length]} of sequence {s}: want L = {history.length(s)}, "
               f"e = max(0, L - M), e <= m <= L, L - m <= R, m a multiple of the migration batch")
        for kv, name in enumerate(("store_k", "store_v")):  # the store's bytes: ggml's quantization of the rows fed
            for i, p in enumerate(range(evicted, migrated)):
                row = history.rows[s][p][kv]  # (layers, Hkv, D)
                want = oracle_quantize(row.reshape(-1, c["head_dim"]), c["store_format"])
                expect(np.array_equal(physical[f"seq{s}/{name}"][:, i], want.reshape(row.shape[:2] + (-1,))),
                       case, step, f"sequence {s} position {p}: {name} bytes differ from ggml's")


def check_pooled(case, step, physical, history, append):
    """Pooled: tables list ceil(L / B) - e // B blocks each; ref counts count the tables listing a block;
    the free queue holds the rest once each; the FlashInfer page table and vLLM slot_mapping follow from the tables."""
    c = case.config
    block = c["block_size"]
    tables, starts, lengths = physical["block_tables"], physical["starts"], physical["lengths"]
    live = sorted(history.rows)
    listed = {}  # block -> how many tables list it
    pages, last_page_len = [], []
    for s in range(tables.shape[0]):
        row = tables[s]
        if s not in live:
            expect(np.all(row == -1) and lengths[s] == 0 and starts[s] == 0, case, step,
                   f"row {s} is not live but lists blocks or a length")
            continue
        length, first = history.length(s), int(starts[s])
        n_blocks = -(-length // block) - first // block if length > first else 0
        expect(lengths[s] == length and 0 <= first <= length and np.all(row[:n_blocks] >= 0)
               and np.all(row[n_blocks:] == -1), case, step,
               f"sequence {s}: length {lengths[s]} (fed {length}), start {first}, table {row.tolist()}: it must list "
               f"ceil(L / B) - e // B = {n_blocks} blocks, then -1")
        for b in row[:n_blocks].tolist():
            listed[b] = listed.get(b, 0) + 1
        if n_blocks:
            pages.append(row[:n_blocks].tolist())
            last_page_len.append(length - (-(-length // block) - 1) * block)
    ref_counts, free = physical["ref_counts"], physical["free_queue"].tolist()
    expect(all(ref_counts[b] == listed.get(b, 0) for b in range(c["num_blocks"])), case, step,
           f"ref counts {ref_counts.tolist()} differ from the number of tables listing each block {listed}")
    expect(sorted(free) == sorted(set(range(c["num_blocks"])) - set(listed)), case, step,
           f"free queue {free}: it must hold every unlisted block once")
    if pages:  # FlashInfer: the CSR of the held blocks of the live sequences holding a token
        expect(physical["kv_indptr"].tolist() == np.cumsum([0] + [len(p) for p in pages]).tolist()
               and physical["kv_indices"].tolist() == sum(pages, [])
               and physical["kv_last_page_len"].tolist() == last_page_len, case, step,
               "the FlashInfer page table differs from the block tables")
    if append:  # vLLM: slot = table[p // B - e // B] * B + p % B for each new token, sequence by sequence
        ids, num_tokens, step_starts = append
        want = []
        for s, start in zip(ids, step_starts):
            first = int(starts[s]) // block
            want += [int(tables[s, p // block - first]) * block + p % block for p in range(start, start + num_tokens)]
        expect(physical["slot_mapping"].tolist() == want, case, step,
               f"slot_mapping {physical['slot_mapping'].tolist()}, the block tables give {want}")


def check_physical(case, step, physical, history, append=None):
    """Check a cache's recorded physical layout against the variant's rules and what was fed. ``append`` is (seq
    ids, T, first position of each) when the step appended, else None."""
    c = case.config
    if case.variant != "pooled":
        want = [history.length(s) for s in range(c["batch"])]
        expect(physical["lengths"].tolist() == want, case, step, f"lengths {physical['lengths'].tolist()}, fed {want}")
    if case.variant == "ring":
        check_ring(case, step, physical, history, append)
    elif case.variant == "two_tier":
        check_two_tier(case, step, physical, history)
    elif case.variant == "pooled":
        check_pooled(case, step, physical, history, append)
