"""``python -m kvref.plots``: every figure and index.html are written, with memory numbers computed here
independently, and a backend that fails its check aborts the run before anything is timed or written. The data
behind the ring figures is checked against expectations written out here (slot p % W holds p, keys per row of each
window convention, the keys a write-first ring loses), and the data behind the two-tier figures against the facts
file's numbers and the tier rules restated here (quantization error per format, llama.cpp's metric, the tiers of
every position, measured bytes, attention error vs the tail length), and the data behind the pooled figures against
the block rules restated here (ref counts, copy-on-write, the free queue's order, ceil(L / B) blocks per sequence)."""

import html
import math

import numpy as np
import pytest

import kvref.plots as plots
from matplotlib.figure import Figure

from kvref import memory
from kvref.shapes import CacheShape
from oracle import window_keys

GIB = 2 ** 30
MIB = 2 ** 20


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    status = plots.main(["--quick", "--out", str(out)])
    return status, out


def test_quick_run_writes_every_figure(quick_run):
    status, out = quick_run
    assert status == 0
    assert plots.FIGURE_NAMES == ("memory", "cost", "flat_timeline", "layouts", "ring_timeline", "ring_memory",
                                  "window_conventions", "chunked_prefill", "quant_blocks", "quant_error",
                                  "two_tier_timeline", "two_tier_memory", "two_tier_error", "pooled_tables",
                                  "pooled_memory")
    assert sorted(n for _, _, names in plots.FIGURE_GROUPS for n in names) == sorted(plots.FIGURE_NAMES)
    for name in plots.FIGURE_NAMES:  # --quick writes PNG only
        path = out / f"{name}.png"
        assert path.is_file() and path.stat().st_size > 1000, path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not (out / f"{name}.svg").exists()


def test_save_writes_png_and_svg(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2), layout="constrained")
    fig.subplots().plot([0, 1], [1, 0])
    paths = plots.save(fig, "tiny", tmp_path)
    assert [p.rsplit(".", 1)[1] for p in paths] == ["png", "svg"]
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "tiny.svg").read_bytes()[:2000]
    assert fig.get_layout_engine() is not None  # restored after the SVG


def test_index_html_has_contents_by_topic_and_the_seeds(quick_run):
    _, out = quick_run
    index = (out / "index.html").read_text()
    assert "<h2>Contents</h2>" in index and "Seeds 000-004" in index and "tests/test_seeds.py" in index
    for title, key, names in plots.FIGURE_GROUPS:
        assert f"href='#topic-{key}'" in index and f"id='topic-{key}'" in index
        for name in names:
            assert f"href='#{name}'" in index and f"id='{name}'" in index and f"src='{name}.png'" in index
    # a backend that cannot run here is one row, not one per variant and dtype
    assert index.count("<td>skipped</td>") <= 1


def test_cli_help_is_plain_text(capsys):
    from kvref.plots.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--quick" in text and "--jobs" in text and "``" not in text and ":func:" not in text


def test_index_html_has_memory_table_and_machine(quick_run):
    _, out = quick_run
    index = (out / "index.html").read_text()
    # Llama-3-8B (32 layers, 8 KV heads, head_dim 128), fp16, 8192 tokens: K and V of every layer = exactly 1 GiB
    llama3_8k = 2 * 32 * 8 * 128 * 2 * 8192
    assert llama3_8k == GIB
    assert f'data-bytes="{llama3_8k}"' in index and "1.00 GiB" in index
    # Llama-2-7B (32 layers, 32 KV heads, head_dim 128), fp16, 32768 tokens = 16 GiB
    llama2_32k = 2 * 32 * 32 * 128 * 2 * 32768
    assert f'data-bytes="{llama2_32k}"' in index and "16.00 GiB" in index
    # GPT-2 (12 layers, 12 heads, head_dim 64), fp16, 2048 tokens = 72 MiB
    gpt2_2k = 2 * 12 * 12 * 64 * 2 * 2048
    assert gpt2_2k == 72 * MIB and f'data-bytes="{gpt2_2k}"' in index
    # seed 003's TinyLlama row: 22 layers, 4 KV heads, head_dim 64, fp32, 2048 tokens = 88 MiB, not 144 MB
    tinyllama = 2 * 22 * 4 * 64 * 4 * 2048
    assert tinyllama == 88 * MIB
    assert f'data-bytes="{tinyllama}"' in index and "88.0 MiB" in index and "144 MB" in index
    # seed 002's count and the machine info
    assert "9,950" in index and "5,050" in index
    for text in ("Backend check", "python", "cpu", "numpy", "numba", "cores", "Machine"):
        assert text in index
    for name in plots.FIGURE_NAMES:
        assert f"{name}.png" in index and f"{name}.svg" not in index  # --quick writes PNG only
        assert html.escape(plots.FIGURE_CAPTIONS[name]) in index


def test_backend_check_covers_every_variant(quick_run):
    _, out = quick_run
    index = (out / "index.html").read_text()
    for backend in ("python", "cpu"):
        for variant in ("flat", "ring", "two_tier", "pooled"):
            for dtype in ("float32", "float16"):
                assert f"<td>{backend}</td><td>{variant}</td><td>{dtype}</td>" in index


def test_index_html_has_quant_and_two_tier_tables(quick_run):
    _, out = quick_run
    index = (out / "index.html").read_text()
    assert "Quantization error of ggml's formats" in index and "Two-tier memory table" in index
    # llama.cpp's printed totals (facts file §4) appear next to kvref's, and every format passes
    for printed in ("0.000074", "0.001121", "0.001144", "0.000591", "0.000556"):
        assert index.count(printed) >= 2
    assert index.count("<span class='ok'>pass</span>") == 6
    # Llama-3-8B, M = 8192, R = 256, B = 64: 256 fp16 tokens of 128 KiB + S = 8192 - 256 + 63 store slots of
    # 2 * 32 layers * 8 KV heads * (128 / 32 * 34) bytes
    q8 = 256 * 2 * 32 * 8 * 128 * 2 + (8192 - 256 + 63) * 2 * 32 * 8 * (128 // 32 * 34)
    q4 = 256 * 2 * 32 * 8 * 128 * 2 + (8192 - 256 + 63) * 2 * 32 * 8 * (128 // 32 * 18)
    assert f'data-bytes="{q8}"' in index and f'data-bytes="{q4}"' in index
    assert "head_dim 80 is not a multiple of 32" in index  # phi-2 cannot use ggml blocks


def test_failed_backend_check_aborts(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(plots.TOLERANCES, "python", 0.0)  # this process only: --jobs 1 checks here
    assert plots.main(["--quick", "--jobs", "1", "--out", str(tmp_path)]) == 1
    assert "ABORT" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "index.html").exists()


def test_timeline_is_recorded_from_a_real_cache():
    events = plots.flat_timeline_events(max_tokens=16)
    kinds = [e["kind"] for e in events]
    assert kinds.count("rejected") == 2 and "crop" in kinds and kinds[-4] == "reset"
    for before, e in zip(events, events[1:]):
        if e["kind"] == "rejected":
            assert e["length"] == before["length"]  # checked first: nothing changed
            assert e["seed001"] > 16  # seed 001 had already moved past the end
    assert max(e["length"] for e in events) == 16


def test_format_bytes():
    assert plots.format_bytes(GIB) == "1.00 GiB"
    assert plots.format_bytes(88 * MIB) == "88.0 MiB"
    assert plots.short_bytes(128 * MIB) == "128 MiB" and plots.short_bytes(1.5 * GIB) == "1.5 GiB"


# ---------------------------------------------------------------------------------------------------------------
# ring figures
# ---------------------------------------------------------------------------------------------------------------
def expected_slot(p, window, sinks):
    """Written out here: sinks keep slot p; the rest share the W - S other slots in turn."""
    return p if p < sinks else sinks + (p - sinks) % (window - sinks)


@pytest.mark.parametrize("sinks", [0, 2])
def test_ring_timeline_events_match_slot_rule(sinks):
    window = 8
    events = plots.ring_timeline_events(window=window, sinks=sinks)
    assert events[0]["slot_positions"] == [-1] * window
    fed = 0
    for e in events[1:]:
        assert e["positions"] == list(range(fed, fed + e["tokens"]))
        fed += e["tokens"]
        assert e["length"] == fed
        held = [p for p in e["slot_positions"] if p >= 0]
        assert sorted(held) == window_keys(fed - 1, window, sinks)  # what the last query saw
        assert len(held) == min(fed, window)
        for slot, p in enumerate(e["slot_positions"]):
            if p >= 0:
                assert slot == expected_slot(p, window, sinks)
                if sinks == 0:
                    assert slot == p % window
        for slot, old, new in e["overwritten"]:
            assert new - old == window - sinks and old >= sinks  # the position that just left the window
        assert e["deferred"] == (e["tokens"] >= 2 and fed - 1 >= window)
        assert e["max_error"] < 1e-5
    # the default steps reach p = W - 1, W, W + 1 and 2W, and the one chunk wraps (and so is deferred)
    reached = {p for e in events for p in e["positions"]}
    assert {window - 1, window, window + 1, 2 * window} <= reached
    assert [e["deferred"] for e in events].count(True) == 1
    first_wrap = next(e for e in events if window in e["positions"])
    assert first_wrap["overwritten"] == ([(0, 0, window)] if sinks == 0 else [(sinks, sinks, window)])


def test_ring_timeline_figure():
    fig = plots.ring_timeline_figure(window=8, sinks=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    titles = [ax.get_title() for ax in fig.axes]
    assert "no sinks" in titles[0] and "S = 2 sinks" in titles[1]
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "p = W-1 = 7" in texts and "p = W = 8" in texts and "p = 2W = 16" in texts
    assert "8\nwas 0" in texts


def test_ring_memory_samples_are_measured_and_match_formulas():
    samples = plots.ring_memory_samples(window=16, total=64, chunk_at=40, chunk=6)
    shape, window = samples["shape"], samples["window"]
    per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * shape.element_bytes
    assert samples["n"][-1] >= 64 and window < samples["n"][-1]
    for n, nbytes, held, flat, positions in zip(samples["n"], samples["nbytes"], samples["held_bytes"],
                                                samples["flat_nbytes"], samples["position_bytes"]):
        assert nbytes == window * per_token == memory.ring_bytes(shape, 1, window)  # flat in n
        assert held == min(n, window) * per_token
        assert flat == n * per_token
        assert positions == shape.layers * window * 8
    at, pending = samples["pending"]
    assert at == 40 and pending == 6 * per_token  # the deferred chunk's K/V, every layer, until advance


def test_ring_memory_figure():
    fig = plots.ring_memory_figure()
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    model_ax, small_ax = fig.axes
    assert "mistral-7b" in model_ax.get_title() and "W = 4096" in model_ax.get_title()
    # Mistral-7B fp16: 128 KiB per token; a ring of 4096 slots = 512 MiB, a flat cache at 32k tokens = 4 GiB
    labels = [line.get_label() for line in model_ax.lines]
    assert any("512 MiB" in label for label in labels)
    assert any(t.get_text() == "4 GiB" for t in model_ax.texts)
    flat = model_ax.lines[0].get_ydata()
    ring = model_ax.lines[1].get_ydata()
    assert flat[-1] == 4 * 2 ** 30 and ring[-1] == 512 * 2 ** 20 and ring.max() == 512 * 2 ** 20
    assert "RingCache.nbytes" in " ".join(line.get_label() for line in small_ax.lines)


def test_window_masks_keys_per_row():
    T, W, S = 10, 4, 2
    masks = plots.window_masks(T, W, S)
    assert {name: m["keys"] for name, m in masks.items()} == {
        "kvref": W, "flash_left": W, "llama_cpp": W, "flash_misuse": W + 1, "mistral_ref": W + 1, "kvref_sinks": W}
    for i in range(T):
        assert np.flatnonzero(masks["kvref"]["mask"][i]).tolist() == window_keys(i, W)
        assert np.flatnonzero(masks["kvref_sinks"]["mask"][i]).tolist() == window_keys(i, W, S)
        # the W + 1 conventions see exactly one more key once the row is long enough: j = i - W
        for name in ("flash_misuse", "mistral_ref"):
            row = np.flatnonzero(masks[name]["mask"][i]).tolist()
            assert row == list(range(max(0, i - W), i + 1))
    for name in ("flash_left", "llama_cpp"):
        assert np.array_equal(masks[name]["mask"], masks["kvref"]["mask"])


def test_window_conventions_figure():
    fig = plots.window_conventions_figure(T=10, window=4, sinks=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    titles = [ax.get_title() for ax in fig.axes]
    assert [("keys per row: 5 = W + 1" in t) for t in titles] == [False, False, False, True, True, False]
    assert all("keys per row: 4 = W" in t for t in titles[:3] + titles[5:])


def test_chunked_prefill_events():
    ev = plots.chunked_prefill_events(window=4, prefix=3, chunk=3)
    assert ev["queries"] == [3, 4, 5] and ev["deferred"]
    assert ev["ring_before"] == [0, 1, 2, -1]
    assert ev["write_first"] == [4, 5, 2, 3]  # positions 3, 4, 5 at slots 3, 0, 1
    assert ev["needed"] == {3: [0, 1, 2, 3], 4: [1, 2, 3, 4], 5: [2, 3, 4, 5]}
    assert ev["missing"] == {3: [0, 1], 4: [1], 5: []}
    assert ev["kvref_sees"] == ev["needed"]
    assert ev["kvref_error"] < 1e-5 and ev["write_first_error"] > 1e-2
    # a chunk that does not wrap loses nothing either way
    small = plots.chunked_prefill_events(window=8, prefix=3, chunk=3)
    assert not small["deferred"] and all(not m for m in small["missing"].values())
    assert small["write_first_error"] < 1e-5


def test_chunked_prefill_figure():
    fig = plots.chunked_prefill_figure()
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    naive, kvref_ax = fig.axes
    # keys 0 and 1 are gone: 2 distinct keys, missed by 3 (query, key) pairs (query 3 misses both, query 4 key 1)
    assert "2 needed keys overwritten (keys 0, 1; 3 query-key pairs lost)" in naive.get_title()
    assert "deferred = True" in kvref_ax.get_title()
    assert sum("gone" in t.get_text() for t in naive.texts) == 3
    assert not any("gone" in t.get_text() for t in kvref_ax.texts)


# ---------------------------------------------------------------------------------------------------------------
# ggml formats: the quantization error of each format, and the bytes of one block
# ---------------------------------------------------------------------------------------------------------------
#: facts file §4, a NumPy port of ggml's _ref formulas: (true RMSE, max |error|) on llama.cpp's test data, RMSE on
#: N(0, 1)
FACTS_ERRORS = {"q8_0": (0.00476, 0.0089, 0.0054), "q4_0": (0.0718, 0.131, 0.086), "q4_1": (0.0732, 0.134, 0.078)}
#: facts file §4: llama.cpp's test-quantize-fns -v "total error" (array_rmse), printed to 6 decimals
FACTS_LLAMA_CPP = {"f16": 0.000004, "q8_0": 0.000074, "q4_0": 0.001121, "q4_1": 0.001144, "q5_0": 0.000591,
                   "q5_1": 0.000556}


@pytest.fixture(scope="module")
def quant_rows():
    return {r["format"]: r for r in plots.quant_error_rows()}


def test_llama_cpp_test_data_and_metric():
    x = plots.llama_cpp_test_data(4096)
    assert x.dtype == np.float32 and x.shape == (4096,)
    assert x[0] == np.float32(2.1) and x[1] == np.float32(0.1 + 2 * math.cos(1.0))
    # array_rmse divides sqrt(sum e^2) by n: four errors of 1 give 0.5, while the true RMSE is 1
    assert plots.llama_cpp_rmse(np.zeros(4), np.ones(4)) == 0.5
    assert plots.llama_cpp_rmse(np.zeros(4096), np.ones(4096)) == 1 / 64


def test_quant_error_rows_match_the_facts(quant_rows):
    assert list(quant_rows) == ["f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
    for fmt, (cos_rmse, cos_max, normal_rmse) in FACTS_ERRORS.items():
        r = quant_rows[fmt]
        assert r["cos_rmse"] == pytest.approx(cos_rmse, rel=5e-3)
        assert r["cos_max"] == pytest.approx(cos_max, rel=5e-3)
        assert r["normal_rmse"] == pytest.approx(normal_rmse, rel=0.03)  # a different N(0, 1) sample
    for fmt, printed in FACTS_LLAMA_CPP.items():
        r = quant_rows[fmt]
        assert abs(r["llama_cpp_metric"] - printed) <= 5e-7, fmt  # what llama.cpp itself printed
        assert r["llama_cpp_measured"] == printed
        # the quirk: llama.cpp's metric is the true RMSE / sqrt(4096) = / 64, so 0.002 allows a true RMSE of 0.128
        assert r["llama_cpp_metric"] == pytest.approx(r["cos_rmse"] / 64, rel=1e-6)
        assert r["llama_cpp_passes"] and r["llama_cpp_metric"] < 0.002 and r["cos_rmse"] < 0.128
    bits = {"f16": 16, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0}
    assert {f: r["bits"] for f, r in quant_rows.items()} == bits
    # more bits, less error, in each family; q4_0 has the worst max error of all (the clamp)
    assert quant_rows["q8_0"]["normal_rmse"] < quant_rows["q5_0"]["normal_rmse"] < quant_rows["q4_0"]["normal_rmse"]
    assert quant_rows["q5_1"]["normal_rmse"] < quant_rows["q4_1"]["normal_rmse"]
    assert max(quant_rows, key=lambda f: quant_rows[f]["normal_max"]) == "q4_0"


def test_quant_error_worst_block_is_within_its_bound(quant_rows):
    """max |error| / amax (or range) of the worst block: at most the bound of the formulas plus the fp16 rounding
    of d and m (below 2^-10 of the block's statistic on this data); the q4_0 clamp (amax/8) is really reached."""
    ideal = {"f16": 1 / 2048, "q8_0": 1 / 254, "q4_0": 1 / 8, "q4_1": 1 / 30, "q5_0": 1 / 16, "q5_1": 1 / 62}
    for fmt, r in quant_rows.items():
        assert r["bound"] == pytest.approx(ideal[fmt])
        assert r["worst_block"] <= ideal[fmt] + 2.0 ** -10, fmt
        assert r["worst_block"] >= 0.85 * ideal[fmt], fmt  # the bound is tight on 1000+ blocks
    assert quant_rows["q4_0"]["worst_block"] > 0.12  # facts file: 0.1251 amax, the clamp case


def test_quant_round_trip_is_within_the_per_element_bound(rng):
    from oracle import quant_error_bound

    x = rng.standard_normal((64, 128)).astype(np.float32) * rng.uniform(0.01, 10, (64, 1)).astype(np.float32)
    for fmt in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1"):
        err = np.abs(plots.round_trip(x, fmt).astype(np.float64) - x)
        assert np.all(err <= quant_error_bound(x, fmt)), fmt
    assert np.array_equal(plots.round_trip(x, "f16"), x.astype(np.float16).astype(np.float32))


def test_quant_error_rows_are_the_same_on_cpu(quant_rows):
    """The figure quantizes with the python spec (no compiling); the compiled twin gives the same numbers."""
    cpu = {r["format"]: r for r in plots.quant_error_rows(backend="cpu")}
    assert cpu == quant_rows


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_quant_block_layout_reads_the_bytes(fmt, rng):
    from kvref import quant

    x = rng.standard_normal(32).astype(np.float32)
    b = plots.quant_block_layout(x, fmt)
    raw = quant.quantize(x, fmt, backend="python")
    assert b["bytes"] == raw.tolist() and len(b["bytes"]) == quant.FORMATS[fmt][1]
    assert b["d"] == float(raw[:2].view("<f2")[0]) and b["d_bits"] == int(raw[:2].view("<u2")[0])
    np.testing.assert_array_equal(b["dequantized"], quant.dequantize(raw, fmt, (32,), backend="python"))
    codes = np.array(b["codes"])
    if fmt == "q8_0":
        assert b["fields"] == [(0, 2, "d"), (2, 32, "qs")]
        assert b["codes"] == raw[2:].view(np.int8).tolist()
        amax = np.abs(x).max()
        assert b["d"] == float(np.float16(amax / np.float32(127)))
        assert np.all(np.abs(codes - x / (amax / np.float32(127))) <= 0.5 + 1e-4)
        return
    qs = {"q4_0": 2, "q4_1": 4, "q5_0": 6, "q5_1": 8}[fmt]
    for j in range(16):  # element j in the low nibble of byte j, element j + 16 in its high nibble
        assert raw[qs + j] == (codes[j] & 15) | ((codes[j + 16] & 15) << 4)
    if fmt in ("q5_0", "q5_1"):
        qh = int(raw[qs - 4:qs].view("<u4")[0])
        assert all(((qh >> j) & 1) == codes[j] >> 4 for j in range(32))
    if fmt in ("q4_0", "q5_0"):
        half = 8 if fmt == "q4_0" else 16
        extreme = int(np.argmax(np.abs(x)))
        assert codes[extreme] == 0 and b["zero"] == half  # the signed extreme maps to -half * d exactly
        assert b["d"] == float(np.float16(x[extreme] / np.float32(-half)))
        assert b["m"] is None
    else:
        assert b["m"] == float(np.float16(x.min())) and b["zero"] == 0


def test_quant_figures():
    fig = plots.quant_blocks_figure()
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("q8_0") and titles[2].startswith("q4_0")
    strip = " ".join(t.get_text() for t in fig.axes[3].texts)
    assert "lo x0=" in strip and "hi x16=" in strip and "hi x31=" in strip
    fig = plots.quant_error_figure()
    assert isinstance(fig, Figure)
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "true RMSE below 0.128" in titles and "amax/8" in titles


# ---------------------------------------------------------------------------------------------------------------
# two-tier figures
# ---------------------------------------------------------------------------------------------------------------
def expected_tiers(length, tail_tokens, migration_batch, max_tokens):
    """The tier rule, restated: (e, m) = (tokens evicted, tokens migrated) after ``length`` tokens."""
    migrated = migration_batch * math.ceil((length - tail_tokens) / migration_batch) if length > tail_tokens else 0
    return max(0, length - max_tokens), migrated


def test_two_tier_timeline_events_follow_the_tier_rule():
    R, B, M = 8, 4, 24
    events = plots.two_tier_timeline_events(tail_tokens=R, migration_batch=B, max_tokens=M)
    assert events[0]["tier"] == [] and events[0]["length"] == 0
    fed = 0
    e_prev, m_prev = 0, 0
    for ev in events[1:]:
        assert ev["positions"] == list(range(fed, fed + ev["tokens"]))
        L_prev, fed = fed, fed + ev["tokens"]
        assert ev["length"] == fed
        e, m = expected_tiers(fed, R, B, M)
        assert ev["tiers"] == {"evicted": (0, e), "store": (e, m), "tail": (m, fed)}
        # the tiers partition 0 .. L-1
        assert ev["tier"] == ["evicted"] * e + ["store"] * (m - e) + ["tail"] * (fed - m)
        assert ev["counts"] == {"evicted": e, "store": m - e, "tail": fed - m}
        assert ev["migrated"] == list(range(max(m_prev, e), min(m, L_prev)))  # old tail tokens, quantized now
        assert ev["direct"] == list(range(max(L_prev, e), min(m, fed)))  # new tokens, straight into the store
        assert ev["evicted"] == list(range(e_prev, e))
        assert len(ev["migrated"] + ev["direct"]) % B == 0 or e > m_prev  # whole batches unless eviction took some
        assert min(fed, M) == m - e + fed - m  # exactly M held once past M
        assert ev["max_error"] < 1e-5
        e_prev, m_prev = e, m
    # the default steps: a prefill longer than R, a batch migrated by one decode token, a chunk that migrates,
    # stores new tokens directly and evicts, then one eviction per decode step
    assert events[1]["op"] == "prefill p 0..10" and events[1]["direct"] == [0, 1, 2, 3]
    assert any(ev["tokens"] == 1 and len(ev["migrated"]) == B for ev in events)
    chunk = next(ev for ev in events if ev["op"].startswith("chunk"))
    assert chunk["migrated"] and chunk["direct"] and chunk["evicted"]
    assert [len(ev["evicted"]) for ev in events[-4:]] == [1, 1, 1, 1]


def test_two_tier_timeline_figure():
    fig = plots.two_tier_timeline_figure()
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    main, counts = fig.axes
    assert "R = 8" in main.get_title() and "M = 24" in main.get_title()
    labels = [t.get_text() for t in main.get_yticklabels()]
    assert labels[0] == "new" and labels[1] == "prefill p 0..10"
    assert "e = 8, m = 24, L = 32" in [t.get_text() for t in main.texts]


def test_two_tier_reference_sees_the_store(rng):
    """The backend check's reference reads positions below m through the store's round trip: with the boundary
    ignored (everything as fed), a q4_0 cache's attention is far from it; with it, within float32 rounding."""
    import kvref

    shape = CacheShape(layers=1, q_heads=4, kv_heads=2, head_dim=32, dtype="float16")
    cache = kvref.TwoTierCache(shape, tail_tokens=4, max_tokens=32, store_format="q4_0", migration_batch=2,
                               backend="python")
    history = plots.TwoTierHistory(shape.kv_heads, shape.head_dim, "q4_0")
    scale = 1 / math.sqrt(shape.head_dim)
    for num_tokens in (20, 1):
        step = cache.plan(num_tokens)
        k, v, q = plots.random_step_inputs(rng, shape, 1, num_tokens)
        cache.write(step, 0, k, v)
        out = cache.attend(step, 0, q)
        history.add(k[0], v[0])
        cache.advance(step)
    migrated = int(step.tiers[0, 0])
    assert migrated == 16
    right = history.expected(q[0], step.positions[0], migrated, 32, scale)
    wrong = history.expected(q[0], step.positions[0], 0, 32, scale)
    assert np.max(np.abs(out[0] - right)) < 1e-5
    assert np.max(np.abs(out[0] - wrong)) > 1e-3


def test_two_tier_backend_check_formats():
    assert plots.two_tier_backend_max_error("python", "float16", formats=("q4_1", "q5_0")) < 1e-5


def test_two_tier_memory_samples_are_measured_and_match_formulas():
    samples = plots.two_tier_memory_samples(tail_tokens=16, max_tokens=48, migration_batch=4, total=72, prefill=24)
    # 2 layers, 2 KV heads, head_dim 32: a tail token is 2 * 2 * 2 * 32 * 2 bytes (fp16), a q4_0 store token
    # 2 * 2 * 2 * (32 / 32 * 18) bytes
    tail_token, store_token = 2 * 2 * 2 * 32 * 2, 2 * 2 * 2 * 18
    assert samples["n"] == list(range(24, 73))
    for n, used, tail, nbytes, formula, flat in zip(samples["n"], samples["bytes_used"], samples["tail_held"],
                                                    samples["nbytes"], samples["formula"], samples["flat_nbytes"]):
        e, m = expected_tiers(n, 16, 4, 48)
        assert tail == n - m and 13 <= tail <= 16
        assert used == formula == tail * tail_token + (m - e) * store_token
        assert nbytes == 16 * tail_token + (48 - 16 + 4 - 1) * store_token  # allocated: R + S slots, flat in n
        assert flat == n * tail_token
    assert max(samples["bytes_used"]) <= samples["nbytes"][0]


def test_two_tier_memory_figure():
    fig = plots.two_tier_memory_figure(context=8192, tail_tokens=256, migration_batch=64)
    model_ax, small_ax = fig.axes
    lines = {line.get_label().split(":")[0]: line for line in model_ax.lines}
    per_token = 2 * 32 * 8 * 128 * 2  # Llama-3-8B fp16: 128 KiB
    flat = lines["FlatCache float16"]
    assert np.nanmax(flat.get_ydata()) == 8192 * per_token == GIB
    for fmt, block in (("q8_0", 34), ("q4_0", 18)):
        held = lines[f"two-tier {fmt}, held"].get_ydata()
        # at n >= M: 256 - 0 .. 63 tail tokens (M - R = 7936 is a multiple of B = 64, so exactly 256) + the rest
        assert held[-1] == 256 * per_token + (8192 - 256) * 2 * 32 * 8 * (128 // 32 * block)
        assert held.max() == held[-1]  # flat in n past M
        # one ratio per format: flat bytes / allocated two-tier bytes (R + M - R + B - 1 slots), as index.html's table
        allocated = 256 * per_token + (8192 - 256 + 63) * 2 * 32 * 8 * (128 // 32 * block)
        ratios = [t.get_text() for t in model_ax.texts if "x less" in t.get_text() and t.get_color() ==
                  lines[f"two-tier {fmt}, held"].get_color()]
        assert len(ratios) == 1 and f"{GIB / allocated:.2f}x less than flat" in ratios[0]
    assert sum("x less" in t.get_text() for t in model_ax.texts) == 2
    assert not any("x less" in line.get_label() for line in model_ax.lines)
    assert "TwoTierCache.stats()['bytes_used']" in " ".join(line.get_label() for line in small_ax.lines)


@pytest.fixture(scope="module")
def error_rows():
    return plots.two_tier_error_rows(context=128, tails=(1, 32, 64, 96, 128), decode=8, migration_batch=16)


def test_two_tier_error_rows(error_rows):
    rows = error_rows
    n = rows["context"]
    for fmt in ("q8_0", "q4_0"):
        nmse = rows["nmse"][fmt]
        assert rows["quantized"][fmt] == [n - 1, n - 32, n - 64, n - 96, 0]
        # R = n: every token in the fp16 tail, the error of fp16 K/V alone (an fp16 FlatCache's)
        assert nmse[-1] == pytest.approx(rows["fp16_nmse"], rel=1e-3)
        assert nmse[0] > nmse[2] > nmse[3] > 50 * nmse[-1]
        # with random data every token weighs alike: the error follows the number of tokens quantized
        for r, value in zip(rows["tails"][1:-1], nmse[1:-1]):
            assert value / nmse[0] == pytest.approx((n - r) / (n - 1), rel=0.3)
    # q4_0 is far worse than q8_0; everything quantized, q8_0 stays below llama.cpp's FA NMSE threshold, q4_0 not
    assert all(a > 20 * b for a, b in zip(rows["nmse"]["q4_0"][:-1], rows["nmse"]["q8_0"][:-1]))
    assert rows["nmse"]["q8_0"][0] < plots.LLAMA_CPP_FA_NMSE < rows["nmse"]["q4_0"][0]
    assert rows["fp16_nmse"] < 1e-6


def test_prefill_tier_rows_vs_quantizing_the_whole_prompt():
    rows = plots.prefill_tier_rows(prompts=(16, 40, 96), tail_tokens=32, decode=4, migration_batch=8)
    # kvref quantizes nothing of a prompt that fits the tail, then whole batches of B: 8 * ceil((P - R) / 8)
    assert rows["kvref_quantized"] == [0, 8, 64]
    for fmt in ("q8_0", "q4_0"):
        kvref_nmse, hf = rows["kvref"][fmt], rows["hf"][fmt]
        assert kvref_nmse[0] == pytest.approx(rows["fp16"][0], rel=1e-3)  # P + decode <= R: all fp16
        assert hf[0] > 100 * kvref_nmse[0]  # HF quantized all 16 prompt tokens (#35185)
        assert all(k < h for k, h in zip(kvref_nmse, hf))


def test_two_tier_error_figure(error_rows):
    prefill = plots.prefill_tier_rows(prompts=(16, 40), tail_tokens=32, decode=2, migration_batch=8)
    fig = plots.two_tier_error_figure(error_rows, prefill)
    tail_ax, prefill_ax = fig.axes[:2]
    labels = " ".join(line.get_label() for line in tail_ax.lines)
    assert "q8_0 store" in labels and "q4_0 store" in labels and "FlatCache fp16" in labels
    assert "#35185" in " ".join(line.get_label() for line in prefill_ax.lines)


# ---------------------------------------------------------------------------------------------------------------
# pooled figures
# ---------------------------------------------------------------------------------------------------------------
def test_pooled_backend_check_sees_copy_on_write_reuse_and_eviction(monkeypatch):
    """The pooled backend check really exercises what it claims: a copy-on-write copy, blocks reused from the free
    queue and (with evict='oldest') a window that starts mid-block."""
    import kvref

    seen = []
    advance = kvref.PooledCache.advance

    def spy(self, step):
        advance(self, step)
        stats = self.stats()
        seen.append((self.evict, stats["cow_copies"], stats["reuses"], stats["evicted_tokens"],
                     [self.first_position(s) % self.block_size for s in self.live_sequences()]))

    monkeypatch.setattr(kvref.PooledCache, "advance", spy)
    assert plots.pooled_backend_max_error("python", "float16") < 1e-5
    plain = [s for s in seen if s[0] is None]
    evicting = [s for s in seen if s[0] == "oldest"]
    assert plain[-1][1] >= 1 and plain[-1][2] >= 1 and plain[-1][3] == 0
    assert evicting[-1][1] >= 1 and evicting[-1][2] >= 1 and evicting[-1][3] > 0
    assert any(any(offset for offset in s[4]) for s in evicting)  # some sequence starts mid-block


def test_pooled_tables_events_follow_the_block_rules():
    B, N = 4, 8
    events = plots.pooled_tables_events(num_blocks=N, block_size=B)
    assert [e["op"] for e in events] == ["new pool", "prefill seq 0: p 0..9", "fork seq 0 -> seq 1",
                                         "append seq 1: p 10", "append seq 0: p 10..12", "release seq 0"]
    new, prefill, fork, cow, parent, release = events
    assert new["free_queue"] == list(range(N)) and new["ref_counts"] == [0] * N
    # 10 tokens: ceil(10 / 4) = 3 blocks from the free queue's head; block 2 holds p8, p9 and two empty slots
    assert prefill["tables"] == {0: [0, 1, 2]} and prefill["new_blocks"] == [0, 1, 2]
    assert [r and r[0] for r in prefill["stored"][2]] == [8, 9, None, None]
    # fork: the same table, every ref count + 1, nothing copied or taken
    assert fork["tables"] == {0: [0, 1, 2], 1: [0, 1, 2]} and fork["ref_counts"][:3] == [2, 2, 2]
    assert fork["new_blocks"] == [] and fork["free_queue"] == prefill["free_queue"]
    # the child appends into the shared partial block 2: copied to block 3 (the head), written there
    assert cow["copies"] == [(2, 3)] and cow["tables"][1] == [0, 1, 3] and cow["tables"][0] == [0, 1, 2]
    assert cow["ref_counts"][:4] == [2, 2, 1, 1]
    assert [r and r[0] for r in cow["stored"][3]] == [8, 9, 10, None]
    assert [r and r[1] for r in cow["stored"][3]][:3] == [0, 0, 1]  # p8, p9 written by seq 0, copied
    # the parent, now sole owner of block 2, writes p10, p11 there; p12 crosses a boundary: one new block
    assert parent["copies"] == [] and parent["new_blocks"] == [4] and parent["tables"][0] == [0, 1, 2, 4]
    assert [r[0] for r in parent["stored"][2]] == [8, 9, 10, 11]
    # release: last block first to the free queue's tail; shared blocks only lose a reference
    assert release["tables"] == {1: [0, 1, 3]} and release["ref_counts"] == [1, 1, 0, 1, 0, 0, 0, 0]
    assert release["free_queue"] == [5, 6, 7, 4, 2]
    assert release["stored"][2][0] == (8, 0) and release["held"][2][0] == []  # stale, not cleared


def test_pooled_tables_figure():
    fig = plots.pooled_tables_figure()
    assert isinstance(fig, Figure)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "copy-on-write: block 2 -> 3" in texts
    assert "block 0: ref 2" in texts and "block 2: free #4" in texts
    assert any("free queue (head first): [5, 6, 7, 4, 2]" in t for t in texts)


def test_request_lengths():
    lengths = plots.request_lengths(n=200, median=256, sigma=1.0, min_len=8, max_len=2048, seed=1)
    assert lengths == plots.request_lengths(n=200, median=256, sigma=1.0, min_len=8, max_len=2048, seed=1)
    assert len(lengths) == 200 and min(lengths) >= 8 and max(lengths) <= 2048
    assert 180 < float(np.median(lengths)) < 340 and np.mean(lengths) > np.median(lengths)  # a long tail


def test_pooled_memory_samples_are_measured_and_match_formulas():
    lengths = [45, 8, 25, 22, 100, 1]
    samples = plots.pooled_memory_samples(lengths=lengths, block_sizes=(1, 4, 16, 64), detail_block_size=16)
    small = samples["shape"]
    per_token = 2 * small.layers * small.kv_heads * small.head_dim * small.element_bytes
    assert samples["scale"] * per_token == 2 * 32 * 8 * 128 * 2  # Llama-3-8B fp16: 128 KiB per token
    assert samples["flat_nbytes"] == 6 * 100 * per_token
    assert samples["held_bytes"] == sum(lengths) * per_token
    for B, used, blocks, frag in zip((1, 4, 16, 64), samples["bytes_used"], samples["blocks_used"],
                                     samples["internal_fragmentation"]):
        assert blocks == sum(math.ceil(n / B) for n in lengths)
        assert used == blocks * B * per_token
        assert frag == blocks * B - sum(lengths) and all(math.ceil(n / B) * B - n < B for n in lengths)
    assert samples["internal_fragmentation"][0] == 0 and samples["bytes_used"][0] == samples["held_bytes"]
    assert samples["detail"] == {"block_size": 16, "allocated": [48, 16, 32, 32, 112, 16]}


def test_pooled_memory_figure():
    fig = plots.pooled_memory_figure()
    ax, ax_seq = fig.axes[:2]
    labels = " ".join(line.get_label() for line in ax.lines)
    assert "FlatCache sized for the longest" in labels and "PooledCache.stats()['bytes_used']" in labels
    lengths = plots.request_lengths()
    per_token = 2 * 32 * 8 * 128 * 2
    flat = next(line for line in ax.lines if line.get_label().startswith("FlatCache"))
    assert flat.get_ydata()[0] == len(lengths) * max(lengths) * per_token
    measured = next(line for line in ax.lines if line.get_label().startswith("measured"))
    assert list(measured.get_xdata()) == [1, 8, 16, 32, 128]
    for B, y in zip(measured.get_xdata(), measured.get_ydata()):
        assert y == sum(math.ceil(n / B) for n in lengths) * B * per_token
