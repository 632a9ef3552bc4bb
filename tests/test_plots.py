"""``python -m kvref.plots``: every figure and index.html are written, with memory numbers computed here
independently, and a backend that fails its check aborts the run before anything is timed or written. The data
behind the ring figures is checked against expectations written out here (slot p % W holds p, keys per row of each
window convention, the keys a write-first ring loses)."""

import html

import numpy as np
import pytest

import kvref.plots as plots
from matplotlib.figure import Figure

from kvref import memory
from oracle import causal_chunk_attention, window_chunk_attention, window_keys

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
                                  "window_conventions", "chunked_prefill")
    for name in plots.FIGURE_NAMES:
        for ext in ("png", "svg"):
            path = out / f"{name}.{ext}"
            assert path.is_file() and path.stat().st_size > 1000, path
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (out / f"{name}.svg").read_bytes()[:2000]


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
        assert f"{name}.svg" in index and f"{name}.png" in index
        assert html.escape(plots.FIGURE_CAPTIONS[name]) in index


def test_backend_check_covers_the_ring(quick_run):
    _, out = quick_run
    index = (out / "index.html").read_text()
    for backend in ("python", "cpu"):
        for variant in ("flat", "ring"):
            assert f"<td>{backend}</td><td>{variant}</td>" in index


def test_failed_backend_check_aborts(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(plots.TOLERANCES, "python", 0.0)
    assert plots.main(["--quick", "--out", str(tmp_path)]) == 1
    assert "ABORT" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "index.html").exists()


def test_reference_attention_matches_oracle(rng):
    q = rng.standard_normal((3, 4, 8))
    k = rng.standard_normal((2, 6, 8))
    v = rng.standard_normal((2, 6, 8))
    positions = np.array([3, 4, 5])
    got = plots.reference_attention(q, k, v, positions, 0.35)
    np.testing.assert_allclose(got, causal_chunk_attention(q, k, v, positions, 0.35), rtol=1e-12, atol=1e-12)


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


def test_reference_attention_with_window_matches_oracle(rng):
    q = rng.standard_normal((4, 4, 8))
    k = rng.standard_normal((2, 12, 8))
    v = rng.standard_normal((2, 12, 8))
    positions = np.array([6, 9, 10, 11])
    for window, sinks in [(4, 0), (5, 2), (1, 0), (12, 3)]:
        got = plots.reference_attention(q, k, v, positions, 0.3, window, sinks)
        expected = window_chunk_attention(q, k, v, positions, window, 0.3, sinks)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_check_backends_lists_flat_and_ring():
    rows = plots.check_backends(names=["python"])
    assert [(r["variant"], r["dtype"]) for r in rows] == [("flat", "float32"), ("flat", "float16"),
                                                          ("ring", "float32"), ("ring", "float16")]
    assert all(r["ok"] for r in rows)


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
    assert "3 needed keys overwritten" in naive.get_title() and "deferred = True" in kvref_ax.get_title()
    assert sum("gone" in t.get_text() for t in naive.texts) == 3
    assert not any("gone" in t.get_text() for t in kvref_ax.texts)
