"""Write a golden suite: run every case (``kvref/golden/cases.py``) through the spec and record it.

The expected values come from ``Kvref("python")``, the spec run as plain Python (the large suite uses its numba
twin, ``Kvref("cpu")``, and says so in the manifest). Before a value is written it is cross-checked against
something that is not the spec (``kvref/golden/crosscheck.py``): every attention output against the float64
reference of ``kvref.check``, computed from the K/V that were fed (never read back from the cache); every logical K/V
row against what was fed; every physical tensor against the variant's layout rules, restated; quantized bytes
against the ``gguf`` package (required unless ``require_gguf=False``, ``write --no-gguf``: then kvref's own
quantizer stands in, and ``write`` says so). A disagreement raises :class:`GoldenWriteError` and nothing is written.
"""

import hashlib
from pathlib import Path

import numpy as np

from .. import __version__
from ..check import decode_attention_gqa, window_keys
from ..errors import KVCacheError
from .cases import OUT_TOLERANCE, all_cases, seed_of
from .crosscheck import (GoldenWriteError, History, check_physical, expect, gguf_available, oracle_dequantize,
                         oracle_quantize)
from .format import FORMAT, FORMAT_VERSION, case_bytes, manifest_bytes
from .impl import Kvref

#: the version of the suite's content: the committed suite is golden/v<SUITE_VERSION>. A change to kvref that moves
#: any expected value bumps it and commits a new folder (tests/test_golden.py fails until then); a change to the file
#: layout bumps FORMAT_VERSION (kvref/golden/format.py) instead
SUITE_VERSION = 1
#: the largest |spec - float64 reference| the writer accepts (the spec computes in float32)
WRITE_TOLERANCE = 2e-5
#: tolerance of two-tier logical K/V (dequantized store): ggml's d * q (+ m), maybe fused into one FMA
DEQUANT_TOLERANCE = (1e-6, 1e-6)


class Recorder:
    """The tensors of one case and its manifest entry, step by step."""

    def __init__(self, case):
        self.case = case
        self.tensors = {}
        self.steps = []

    def step(self, op, args):
        """Start the manifest entry of the next step."""
        entry = {"name": f"step{len(self.steps):02d}", "op": op, "args": args, "error": None, "inputs": {},
                 "expected": {}, "logical": {}, "physical": {}}
        self.steps.append(entry)
        return entry

    def add(self, entry, group, name, array, atol=0.0, rtol=0.0, mask=None):
        """Record ``array`` as ``stepNN/<input|expected|state>/name`` in the step's ``group``."""
        array = np.ascontiguousarray(array)
        folder = {"inputs": "input", "expected": "expected"}.get(group, "state")
        tensor = f"{entry['name']}/{folder}/{name}"
        self.tensors[tensor] = array
        desc = {"tensor": tensor, "dtype": array.dtype.name, "shape": list(array.shape)}
        if group != "inputs":
            desc.update(atol=float(atol), rtol=float(rtol))
        if mask is not None:
            desc["mask"] = f"{entry['name']}/state/{mask}"
        entry[group][name] = desc
        return array

    def manifest_entry(self, file_name, digest, expected_from):
        """The case's entry in manifest.json."""
        case = self.case
        return {"name": case.name, "kind": case.kind, "variant": case.variant, "description": case.description,
                "config": case.config, "file": file_name, "sha256": digest, "expected_from": expected_from,
                "steps": self.steps}


# ---------------------------------------------------------------------------------------------------------------
# Recording each kind of case
# ---------------------------------------------------------------------------------------------------------------
def live_sequences(cache):
    """Ids of the sequences a cache holds (pooled: the live ones)."""
    inner = cache.cache
    return inner.live_sequences() if hasattr(inner, "live_sequences") else list(range(inner.batch))


def snapshot(cache):
    """Logical content of every sequence plus the physical layout."""
    return {s: cache.read(s) for s in live_sequences(cache)}, cache.physical()


def same_snapshot(a, b):
    """True iff two snapshots are equal (the slots of a step aside: they describe the step, not the state)."""
    (la, pa), (lb, pb) = a, b
    pa, pb = ({n: x for n, x in p.items() if n not in ("slot_mapping", "step_slots")} for p in (pa, pb))
    return la.keys() == lb.keys() and pa.keys() == pb.keys() and all(
        all(np.array_equal(x, y) for x, y in zip(la[s], lb[s])) for s in la) and all(
        np.array_equal(pa[n], pb[n]) for n in pa)


def record_state(rec, entry, cache, history, append=None, last=True):
    """Check the state after a step against what was fed and the variant's rules, then record it (with
    ``record_state: "last"`` in the config, only after the last step): the logical content of every live sequence,
    and the physical layout. ``append``: see :func:`kvref.golden.crosscheck.check_physical`."""
    case, c = rec.case, rec.case.config
    kv_tolerance = DEQUANT_TOLERANCE if case.variant == "two_tier" else (0.0, 0.0)
    physical = cache.physical()
    check_physical(case, entry["name"], physical, history, append)
    first_held = first_positions(cache)
    logical = {}
    for s in live_sequences(cache):
        positions, k, v = logical[s] = cache.read(s)
        rule = history.held_rule(s, first_held[s])
        expect(positions.tolist() == rule, case, entry["name"],
               f"sequence {s} holds {positions.tolist()}, the rule says {rule}")
        tiers = physical["tiers"][s] if case.variant == "two_tier" else None
        for i, p in enumerate(positions.tolist()):
            want_k, want_v = history.stored_value(s, p, tiers)
            if tiers is not None:  # dequantized store rows: within the recorded tolerance
                same = all(np.allclose(a[:, i], b, *DEQUANT_TOLERANCE[::-1]) for a, b in ((k, want_k), (v, want_v)))
            else:  # a copy of what was fed
                same = np.array_equal(k[:, i], want_k) and np.array_equal(v[:, i], want_v)
            expect(same, case, entry["name"], f"sequence {s} position {p}: K/V differ from what was fed")
    if c.get("record_state") == "last" and not last:
        return
    for s, (positions, k, v) in logical.items():
        rec.add(entry, "logical", f"seq{s}/positions", positions)
        rec.add(entry, "logical", f"seq{s}/k", k, *kv_tolerance)
        rec.add(entry, "logical", f"seq{s}/v", v, *kv_tolerance)
    for name, array in physical.items():
        mask = "slot_positions" if name in ("k_slots", "v_slots") else None
        rec.add(entry, "physical", name, array, mask=mask)


def first_positions(cache):
    """First held position of each live sequence (pooled: after its evictions; others: by their rule)."""
    inner = cache.cache
    return {s: (inner.first_position(s) if hasattr(inner, "first_position") else 0) for s in live_sequences(cache)}


def record_cache_case(case, impl, rng):
    """Replay a cache case through the spec, cross-check every step, record inputs, outputs and state."""
    rec = Recorder(case)
    c = case.config
    cache = impl.open_cache(case.variant, c)
    history = History(case)
    shape = cache.shape
    dtype = np.dtype(c["dtype"])
    atol, rtol = OUT_TOLERANCE[c["dtype"]]
    for index, (op, args) in enumerate(case.ops):
        entry = rec.step(op, dict(args))
        append = None
        if op == "append":
            ids, n_tokens = args["seq_ids"], args["num_tokens"]
            dims = (shape.layers, len(ids), n_tokens, shape.kv_heads, shape.head_dim)
            rec.add(entry, "inputs", "seq_ids", np.array(ids, np.int64))  # also in args: the file stands alone
            k = rec.add(entry, "inputs", "k", rng.standard_normal(dims).astype(dtype))
            v = rec.add(entry, "inputs", "v", rng.standard_normal(dims).astype(dtype))
            q = None
            if args.get("attend", True):
                q = rec.add(entry, "inputs", "q", rng.standard_normal(dims[:3] + (shape.q_heads, shape.head_dim))
                            .astype(np.float32))
            before = snapshot(cache)
            if args.get("error"):
                try:
                    cache.append(ids, k, v, q)
                except KVCacheError as exc:
                    entry["error"] = type(exc).__name__
                expect(entry["error"] == args["error"], case, entry["name"],
                       f"expected {args['error']}, the spec raised {entry['error']}")
                expect(same_snapshot(before, snapshot(cache)), case, entry["name"], "a refused step changed state")
            else:
                append = (ids, n_tokens, [history.length(s) for s in ids])
                out = cache.append(ids, k, v, q)
                first_after = first_positions(cache)
                worst = 0.0
                for i, s in enumerate(ids):
                    held_before = before[0][s][0].tolist()
                    tiers = before[1]["tiers"][s] if case.variant == "two_tier" else None
                    new = list(range(history.length(s), history.length(s) + n_tokens))
                    if q is not None:
                        for layer in range(shape.layers):
                            ref = history.attention(s, held_before, tiers, new, k[layer, i], v[layer, i],
                                                    q[layer, i], first_after[s], layer)
                            worst = max(worst, float(np.max(np.abs(out[layer, i] - ref))))
                    history.feed(s, k[:, i], v[:, i])
                expect(worst <= WRITE_TOLERANCE, case, entry["name"], f"attention differs from the float64 "
                       f"reference by {worst:.3g}")
                if q is not None:
                    rec.add(entry, "expected", "out", out, atol, rtol)
        else:
            call = {"crop": lambda: cache.crop(args["seq"], args["max_length"]),
                    "reset": lambda: cache.reset(args["seq"]),
                    "fork": lambda: cache.fork(args["seq"]),
                    "add_sequence": lambda: cache.add_sequence(),
                    "release": lambda: cache.release(args["seq"]),
                    "evict": lambda: cache.evict(args["seq"], args["num_tokens"])}[op]
            first_before = first_positions(cache)
            result = call()
            if op in ("fork", "add_sequence"):
                expect(result == args["child"], case, entry["name"], f"the new sequence is {result}, the case "
                       f"names {args['child']}")
            if op == "evict":  # exactly num_tokens leave, no more (seed 004 dropped a whole block)
                moved = first_positions(cache)[args["seq"]] - first_before[args["seq"]]
                expect(moved == args["num_tokens"], case, entry["name"], f"evict moved the start by {moved}")
            history.apply(op, args)
        record_state(rec, entry, cache, history, append, last=index == len(case.ops) - 1)
    return rec


def quant_inputs(rng, head_dim):
    """The rows of a quantization case, in the order of ``cases.QUANT_ROWS``."""
    def halves(n, low, high):  # values k + 0.5: exact ties once the scale is 1
        return rng.integers(low, high, n) + 0.5

    n = head_dim
    rows = [np.zeros(n), rng.standard_normal(n)]
    rows.append(np.concatenate([[127.0], halves(n - 1, -127, 126)]))            # q8_0: d = 127 / 127
    rows.append(np.concatenate([[-8.0], halves(n - 1, -8, 7)]))                 # q4_0: d = -8 / -8
    rows.append(np.concatenate([[0.0, 15.0], halves(n - 2, 0, 15)]))            # q4_1: d = 15 / 15, min 0
    rows.append(np.concatenate([[-16.0], halves(n - 1, -16, 15)]))              # q5_0: d = -16 / -16
    rows.append(np.concatenate([[0.0, 31.0], halves(n - 2, 0, 31)]))            # q5_1: d = 31 / 31, min 0
    rows.append(rng.standard_normal(n) * 3e-4)                                   # scale below fp16's 6.1e-5
    rows.append(rng.standard_normal(n) * 1e-9)                                   # scale rounds to 0 in fp16
    rows.append(rng.standard_normal(n) * 1e4)
    big = rng.standard_normal(n)
    rows.append(big / np.abs(big).max() * 6e4)  # max |x| = 6e4: every scale and min is still a finite fp16
    one = np.zeros(n)
    one[n // 3] = -2.75
    rows.append(one)
    rows.append(np.full(n, 0.625))
    return np.stack(rows).astype(np.float32)


def record_quant_case(case, impl, rng):
    """Quantize the QUANT_ROWS and dequantize the blocks; both checked against gguf."""
    rec = Recorder(case)
    fmt, head_dim = case.config["format"], case.config["head_dim"]
    x = quant_inputs(rng, head_dim)
    entry = rec.step("quantize", {})
    rec.add(entry, "inputs", "x", x)
    blocks = impl.quantize(x, fmt)
    expect(np.array_equal(blocks, oracle_quantize(x, fmt)), case, entry["name"], "bytes differ from gguf's")
    rec.add(entry, "expected", "blocks", blocks)
    entry = rec.step("dequantize", {})
    rec.add(entry, "inputs", "blocks", blocks)
    values = impl.dequantize(blocks, fmt, head_dim)
    expect(np.allclose(values, oracle_dequantize(blocks, fmt, head_dim), *DEQUANT_TOLERANCE[::-1]), case,
           entry["name"], "values differ from gguf's dequantize")
    rec.add(entry, "expected", "x", values, *DEQUANT_TOLERANCE)
    return rec


def record_attention_case(case, impl, rng):
    """One dense attention call, checked against the float64 reference."""
    rec = Recorder(case)
    c = case.config
    (op, args), = case.ops
    n, T = args["n_keys"], args["num_queries"]
    entry = rec.step(op, dict(args))
    q = rec.add(entry, "inputs", "q", rng.standard_normal((T, c["q_heads"], c["head_dim"])).astype(np.float32))
    kv_dims = (n, c["kv_heads"], c["head_dim"])
    k = rec.add(entry, "inputs", "k", rng.standard_normal(kv_dims).astype(c["dtype"]))
    v = rec.add(entry, "inputs", "v", rng.standard_normal(kv_dims).astype(c["dtype"]))
    positions = np.arange(n, dtype=np.int64)
    if args["key_order"] == "ring":  # n = W slots holding positions 13 .. 13 + W - 1 at slot p % W
        positions = np.array([13 + ((s - 13) % n) for s in range(n)], np.int64)
    elif args["key_order"] == "from_100":  # a cache whose first held position is 100
        positions = positions + 100
    k_positions = rec.add(entry, "inputs", "k_positions", positions)
    q_positions = rec.add(entry, "inputs", "q_positions", np.sort(positions)[n - T:])
    out = impl.attention(q, k, v, q_positions, k_positions, c["scale"], c["window"], c["sinks"])
    row = {int(p): r for r, p in enumerate(positions.tolist())}
    worst = 0.0
    for t, p in enumerate(q_positions.tolist()):
        seen = [row[j] for j in window_keys(p, c["window"], c["sinks"]) if j in row]
        ref = decode_attention_gqa(q[t], k[seen].transpose(1, 0, 2), v[seen].transpose(1, 0, 2), c["scale"])
        worst = max(worst, float(np.max(np.abs(out[t] - ref))))
    expect(worst <= WRITE_TOLERANCE, case, entry["name"], f"attention differs from the reference by {worst:.3g}")
    rec.add(entry, "expected", "out", out, *OUT_TOLERANCE[c["dtype"]])
    return rec


def record_paged_case(case, impl, rng):
    """Build the page table with a real pooled cache (the case's ops), then one decode query per sequence."""
    rec = Recorder(case)
    c = case.config
    cache = impl.open_cache("pooled", c)
    shape = cache.shape
    for op, args in case.ops:
        if op == "append":
            dims = (1, len(args["seq_ids"]), args["num_tokens"], shape.kv_heads, shape.head_dim)
            cache.append(args["seq_ids"], rng.standard_normal(dims).astype(c["dtype"]),
                         rng.standard_normal(dims).astype(c["dtype"]), None)
        else:
            getattr(cache, op)(args["seq"])
    layout = cache.physical()
    entry = rec.step("paged_attention", {"seqs": layout["page_table_seqs"].tolist()})
    kv = cache.cache.kv[0]  # (2, num_blocks, Hkv, B, D)
    pages = [rec.add(entry, "inputs", name, np.swapaxes(kv[i], 1, 2).view(shape.public_dtype))
             for i, name in enumerate(("k_pages", "v_pages"))]
    table = [rec.add(entry, "inputs", name, layout[name]) for name in ("kv_indptr", "kv_indices",
                                                                          "kv_last_page_len")]
    n_seq = table[0].shape[0] - 1
    q = rec.add(entry, "inputs", "q", rng.standard_normal((n_seq, shape.q_heads, shape.head_dim)).astype(
        np.float32))
    out = impl.paged_attention(q, *pages, *table, c["scale"])
    worst = 0.0
    for i in range(n_seq):  # the reference gathers the rows by the page table itself
        ids = table[1][table[0][i]:table[0][i + 1]]
        length = c["block_size"] * (len(ids) - 1) + int(table[2][i])
        k = np.concatenate([pages[0][b] for b in ids])[:length].transpose(1, 0, 2)
        v = np.concatenate([pages[1][b] for b in ids])[:length].transpose(1, 0, 2)
        worst = max(worst, float(np.max(np.abs(out[i] - decode_attention_gqa(q[i], k, v, c["scale"])))))
    expect(worst <= WRITE_TOLERANCE, case, entry["name"], f"paged attention differs from the reference by {worst}")
    rec.add(entry, "expected", "out", out, *OUT_TOLERANCE[c["dtype"]])
    return rec


RECORDERS = {"cache": record_cache_case, "quantize": record_quant_case, "attention": record_attention_case,
             "paged_attention": record_paged_case}


def build_suite(size="default", progress=None, require_gguf=True):
    """Every case of the suite recorded: returns (manifest dict, {file name: bytes}). Without the gguf package the
    quantized bytes could only be checked against kvref itself: that needs ``require_gguf=False``."""
    if require_gguf and not gguf_available():
        raise GoldenWriteError("the gguf package (the independent check of the quantized bytes) is not installed: "
                               "pip install 'kvref[peers]', or write with --no-gguf to check against kvref's own "
                               "quantizer only")
    backend = "python" if size == "default" else "cpu"
    impl = Kvref(backend)
    source = {"python": "kvref python backend (the spec)",
              "cpu": "kvref cpu backend (the spec compiled by numba)"}[backend]
    files, entries = {}, []
    for case in all_cases(size):
        rec = RECORDERS[case.kind](case, impl, np.random.default_rng(seed_of(case.name)))
        data = case_bytes(rec.tensors)
        file_name = f"{case.name}.safetensors"
        files[file_name] = data
        entries.append(rec.manifest_entry(file_name, hashlib.sha256(data).hexdigest(), source))
        if progress is not None:
            progress(case.name)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kvref_version": __version__, "suite": size,
                "suite_version": SUITE_VERSION,
                "tolerance_rule": "|actual - expected| <= atol + rtol * |expected|, element by element",
                "cases": entries}
    files["manifest.json"] = manifest_bytes(manifest)
    return manifest, files


def write_suite(folder, size="default", progress=None, require_gguf=True):
    """Write the suite of ``size`` into ``folder`` (created if needed; files of the same names are replaced).
    Returns the manifest."""
    manifest, files = build_suite(size, progress, require_gguf)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return manifest


def cross_check_note():
    """What the writer checked quantized bytes against, for the CLI to print."""
    if gguf_available():
        import gguf

        return f"quantized bytes cross-checked against gguf {getattr(gguf, '__version__', '')}".rstrip()
    return "gguf is not installed: quantized bytes checked against kvref's own quantizer only"


