"""``python -m kvref.plots``: every figure and index.html are written, with memory numbers computed here
independently, and a backend that fails its check aborts the run before anything is timed or written."""

import numpy as np
import pytest

import kvref.plots as plots
from oracle import causal_chunk_attention

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
    assert plots.FIGURE_NAMES == ("memory", "cost", "flat_timeline", "layouts")
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
