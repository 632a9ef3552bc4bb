"""The golden suite against peer libraries (kvref.golden.adapters) and deliberately broken implementations
(kvref.golden.broken): the peers pass what they support, every broken one fails with rows naming case, step and
tensor."""

from pathlib import Path

import numpy as np
import pytest

from kvref.golden import broken
from kvref.golden.__main__ import main
from kvref.golden.impl import Kvref, KvrefCache
from kvref.golden.run import check_suite, exit_status, format_table

SUITE = Path(__file__).resolve().parents[1] / "golden" / "v1"
ATTENTION = ["attention_decode_g1", "attention_decode_g4_f16", "attention_decode_g8", "attention_chunked_prefill_g4",
             "attention_window", "attention_window_sinks", "attention_ring_order", "attention_positions_from_100"]
PAGED = ["paged_decode_after_fork_and_reuse", "paged_decode_f16"]
QUANT = [f"quant_{fmt}" for fmt in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")]
FLAT = ["flat_prefill_decode_mha", "flat_prefill_decode_gqa_f16", "flat_crop_reset", "flat_whole_batch",
        "flat_overflow"]
RING = ["ring_wrap", "ring_wrap_f16", "ring_prefill_longer_than_window", "ring_chunked_prefill_deferred", "ring_sinks"]
#: the flat/ring cases HF's cache layers can run: every append covers the whole batch, no sinks, no refusals
HF_RUNS = {"flat_whole_batch", "ring_wrap_f16", "ring_prefill_longer_than_window", "ring_chunked_prefill_deferred"}


def by_status(results):
    status = {}
    for r in results:
        status.setdefault(r.status, set()).add(r.name)
    return status


def test_adapters_import_without_peers_and_name_the_extra():
    from kvref.golden import adapters

    with pytest.raises(ImportError, match=r"kvref\[peers\]"):
        adapters.require("kvref_no_such_package", "Test")


def test_torch_sdpa_passes_attention_and_paged():
    torch = pytest.importorskip("torch")
    from kvref.golden.adapters import TorchSDPA

    impl = TorchSDPA()
    _, results = check_suite(SUITE, impl)
    status = by_status(results)
    assert status["ok"] == set(ATTENTION + PAGED), format_table(results)
    assert "FAIL" not in status
    assert len(status["skip"]) == len(results) - len(ATTENTION + PAGED)
    assert exit_status(results) == 0
    out = impl.attention(np.zeros((1, 2, 4), np.float32), np.zeros((3, 1, 4), np.float32),
                         np.zeros((3, 1, 4), np.float32), [2], [0, 1, 2], 0.5, 0, 0)
    assert isinstance(out, torch.Tensor)  # the checker reads it through __array__


def test_gguf_passes_every_quant_case():
    pytest.importorskip("gguf")
    from kvref.golden.adapters import GGUFQuant

    _, results = check_suite(SUITE, GGUFQuant(), names=QUANT)
    assert by_status(results) == {"ok": set(QUANT)}, format_table(results)
    assert exit_status(results) == 0


def test_hf_cache_layers_pass_the_cases_they_support():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from kvref.golden.adapters import HFCacheLayers

    _, results = check_suite(SUITE, HFCacheLayers(), names=FLAT + RING)
    table = format_table(results)
    status = by_status(results)
    assert status["ok"] == HF_RUNS, table
    assert "FAIL" not in status, table
    skipped = {r.name: r.skipped for r in results if r.status == "skip"}
    assert set(skipped) == set(FLAT + RING) - HF_RUNS
    assert "advance the whole batch" in skipped["ring_wrap"]
    assert "sinks" in skipped["ring_sinks"]
    assert "no capacity" in skipped["flat_overflow"]
    assert exit_status(results) == 0


def test_hf_flat_layers_match_kvref_on_whole_batch_steps(rng):
    """The DynamicLayer path against kvref directly, on more whole-batch steps than the one golden flat case that HF
    layers can run (flat_whole_batch): appends in both row orders, crops by a positive and a negative length,
    a reset."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from kvref.golden.adapters import HFCacheLayers

    config = {"layers": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 32, "dtype": "float32", "batch": 2,
              "max_tokens": 16, "scale": 32 ** -0.5}
    hf, spec = HFCacheLayers().open_cache("flat", config), KvrefCache("flat", config, "python")
    assert not hasattr(hf, "window_convention")

    def append(seq_ids, tokens):
        k, v = (rng.standard_normal((2, len(seq_ids), tokens, 2, 32)).astype(np.float32) for _ in range(2))
        q = rng.standard_normal((2, len(seq_ids), tokens, 4, 32)).astype(np.float32)
        np.testing.assert_allclose(hf.append(seq_ids, k, v, q), spec.append(seq_ids, k, v, q), atol=1e-5)

    for op, *args in [("append", [1, 0], 5), ("append", [0, 1], 1), ("crop", None, -2), ("append", [0, 1], 2),
                      ("crop", None, 3), ("reset", None), ("append", [0, 1], 3)]:
        if op == "append":
            append(*args)
        else:
            getattr(hf, op)(*args)
            getattr(spec, op)(*args)
        for seq in (0, 1):
            for got, want in zip(hf.read(seq), spec.read(seq)):
                np.testing.assert_array_equal(got, want)
    with pytest.raises(NotImplementedError, match="advance every sequence together"):
        hf.append([0], *(np.zeros((2, 1, 1, h, 32), np.float32) for h in (2, 2, 4)))
    with pytest.raises(NotImplementedError):
        hf.crop(0, 1)
    assert HFCacheLayers().open_cache("ring", {**config, "window": 8, "sinks": 2}) is None
    assert HFCacheLayers().open_cache("pooled", config) is None


def test_supports_hook_skips_with_its_reason():
    class Declines(Kvref):
        def supports(self, case):
            return case["name"] != "quant_q8_0" and "declined by test"

    _, results = check_suite(SUITE, Declines("python"), names=["quant_q8_0", "quant_q4_0"])
    assert [(r.name, r.status, r.skipped) for r in results] == [("quant_q8_0", "skip", "the implementation does "
                                                                 "not support it"), ("quant_q4_0", "skip",
                                                                                     "declined by test")]
    assert exit_status(results) == 1  # nothing ran


@pytest.mark.parametrize("impl, names, failing", [
    (broken.WindowOffByOne, ATTENTION, {"attention_window": "step00/expected/out",
                                        "attention_window_sinks": "step00/expected/out"}),
    (broken.IgnoresPositions, ATTENTION, {"attention_ring_order": "step00/expected/out",
                                          "attention_positions_from_100": "step00/expected/out"}),
    (broken.WrongNibbleOrder, QUANT, {f"quant_{f}": "step00/expected/blocks" for f in ("q4_0", "q4_1", "q5_0", "q5_1")}
     | {"quant_q4_0": "step01/expected/x"}),
    (broken.BlockTableOffByOne, PAGED + ["pooled_block_boundaries", "pooled_fork_copy_on_write"],
     {"paged_decode_after_fork_and_reuse": "step00/expected/out", "paged_decode_f16": "step00/expected/out",
      "pooled_block_boundaries": "step00/state/block_tables", "pooled_fork_copy_on_write": "step00/state/kv_indices"}),
    (broken.LayersShareOffset, ["flat_prefill_decode_mha", "ring_wrap"],
     {"flat_prefill_decode_mha": "step00/state/seq0/k", "ring_wrap": "step00/expected/out"}),
], ids=lambda p: getattr(p, "__name__", ""))
def test_broken_implementations_fail_naming_case_step_tensor(impl, names, failing):
    _, results = check_suite(SUITE, impl(), names=names)
    table = format_table(results)
    assert exit_status(results) == 1
    assert {r.name for r in results if r.status == "FAIL"} >= set(failing), table
    for case, tensor in failing.items():
        step = tensor.split("/")[0]
        assert f"FAIL case {case}, {step}, tensor {tensor}:" in table, table
    if impl is broken.WrongNibbleOrder:
        assert next(r for r in results if r.name == "quant_q8_0").status == "ok"  # q8_0 has no nibbles


def test_cli_exit_status(capsys):
    assert main(["check", str(SUITE), "--impl", "kvref.golden.broken:WrongNibbleOrder", "--case", "quant_q4_1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL case quant_q4_1, step00, tensor step00/expected/blocks" in out
    assert main(["check", str(SUITE), "--impl", "kvref.golden.broken:WindowOffByOne", "--case",
                 "attention_decode_g1"]) == 0  # no window: the defect does not show
    pytest.importorskip("gguf")
    assert main(["check", str(SUITE), "--impl", "kvref.golden.adapters:GGUFQuant", "--case", "quant_q5_1"]) == 0
    assert "1 cases: 1 ok, 0 FAIL" in capsys.readouterr().out
