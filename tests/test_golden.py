"""The golden suite (kvref.golden): the committed files are what the spec writes today, byte for byte; the checker
passes kvref's backends and fails on every kind of mismatch; compare() follows its stated rule.

Adapters for external code (torch SDPA, gguf, Hugging Face) and the deliberately broken implementations are tested
in tests/test_golden_adapters.py; the C consumer in tests/test_golden_c.py; the cuda backend in
tests_cuda/test_cuda_golden.py.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvref.check import compare
from kvref.golden import FORMAT, FORMAT_VERSION, SuiteError, load_case, read_manifest
from kvref.golden.__main__ import main
from kvref.golden.format import manifest_bytes
from kvref.golden.cases import all_cases
from kvref.golden.impl import Kvref
from kvref.golden.run import check_suite, exit_status, format_table
from kvref.golden.write import SUITE_VERSION, GoldenWriteError, build_suite

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "golden" / f"v{SUITE_VERSION}"


@pytest.fixture(scope="module")
def fresh():
    """The suite as the spec writes it now: (manifest, {file name: bytes})."""
    return build_suite()


# ---------------------------------------------------------------------------------------------------------------
# The committed suite is the spec's output, byte for byte
# ---------------------------------------------------------------------------------------------------------------
def test_writing_twice_gives_identical_bytes(fresh):
    _, again = build_suite()
    assert again.keys() == fresh[1].keys()
    for name, data in fresh[1].items():
        assert again[name] == data, name


def test_committed_suite_equals_a_fresh_write(fresh):
    """A change to the spec that moves any expected value fails here: write a new suite version instead
    (golden/v2), never overwrite v1 silently."""
    committed = {p.name for p in SUITE.iterdir()}
    assert committed == set(fresh[1]), f"files added to or missing from {SUITE.name}"
    manifest = json.loads(fresh[1]["manifest.json"])
    assert manifest["suite_version"] == SUITE_VERSION
    # the version of kvref that wrote the suite is information, not content: a release that moves no expected value
    # keeps the committed suite (its manifest names the version that wrote it)
    manifest["kvref_version"] = json.loads((SUITE / "manifest.json").read_text())["kvref_version"]
    fresh = {**fresh[1], "manifest.json": manifest_bytes(manifest)}
    for name, data in fresh.items():
        assert (SUITE / name).read_bytes() == data, (
            f"{SUITE.name}/{name} differs from what the spec writes now: if the change is meant, bump SUITE_VERSION in "
            f"kvref/golden/write.py and commit the new suite (python -m kvref.golden write golden/v"
            f"{SUITE_VERSION + 1})")


def test_suite_is_small_and_covers_every_kind_and_variant():
    manifest = read_manifest(SUITE)
    total = sum(p.stat().st_size for p in SUITE.iterdir())
    assert total < 5 * 2 ** 20, f"golden/v1 is {total} bytes; keep the committed suite a few MB"
    kinds = {c["kind"] for c in manifest["cases"]}
    variants = {c["variant"] for c in manifest["cases"] if c["kind"] == "cache"}
    assert kinds == {"cache", "attention", "paged_attention", "quantize"}
    assert variants == {"flat", "ring", "two_tier", "pooled"}
    formats = {c["config"]["format"] for c in manifest["cases"] if c["kind"] == "quantize"}
    assert formats == {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1"}
    errors = {s["error"] for c in manifest["cases"] for s in c["steps"]} - {None}
    assert errors == {"CacheOverflowError", "PoolExhaustedError"}


def test_manifest_describes_every_tensor_of_every_file():
    """Each tensor in a file is named in the manifest with its dtype and shape, and each expected or state tensor
    has a tolerance; nothing in the manifest is missing from the file."""
    manifest = read_manifest(SUITE)
    assert manifest["format"] == FORMAT and manifest["format_version"] == FORMAT_VERSION
    for case in manifest["cases"]:
        tensors = load_case(SUITE, case)
        described = {}
        for step in case["steps"]:
            for group in ("inputs", "expected", "logical", "physical"):
                for desc in step[group].values():
                    described[desc["tensor"]] = desc
                    assert desc["tensor"].startswith(step["name"] + "/")
                    if group != "inputs":
                        assert desc["atol"] >= 0 and desc["rtol"] >= 0
            if step["op"] == "append":
                assert tensors[f"{step['name']}/input/seq_ids"].tolist() == step["args"]["seq_ids"]
        assert described.keys() == tensors.keys(), case["name"]
        for name, desc in described.items():
            assert tensors[name].dtype.name == desc["dtype"] and list(tensors[name].shape) == desc["shape"]


def test_every_boundary_named_in_the_design_is_recorded():
    """The ring wraps at W-1, W and W+1 tokens; two-tier migrates at R-1, R, R+1 and evicts at M-1, M, M+1; the
    pooled cache crosses B-1, B, B+1: each length is held by some sequence after some step."""
    manifest = read_manifest(SUITE)

    def lengths_seen(name):
        case = next(c for c in manifest["cases"] if c["name"] == name)
        tensors = load_case(SUITE, case)
        seen = set()
        for step in case["steps"]:
            seen |= set(tensors[step["physical"]["lengths"]["tensor"]].tolist())
        return case["config"], seen

    config, seen = lengths_seen("ring_wrap")
    assert {config["window"] - 1, config["window"], config["window"] + 1} <= seen
    config, seen = lengths_seen("two_tier_migration_q8_0")
    assert {config["tail_tokens"] - 1, config["tail_tokens"], config["tail_tokens"] + 1} <= seen
    config, seen = lengths_seen("two_tier_eviction_q8_0")
    assert {config["max_tokens"] - 1, config["max_tokens"], config["max_tokens"] + 1} <= seen
    config, seen = lengths_seen("pooled_block_boundaries")
    assert {config["block_size"] - 1, config["block_size"], config["block_size"] + 1} <= seen


def test_writer_refuses_a_spec_that_disagrees_with_the_reference(monkeypatch):
    """The writer cross-checks each expected value; a spec that is off makes it raise, not write."""
    original = Kvref.attention

    def off(self, *args):
        return original(self, *args) + np.float32(1e-3)

    monkeypatch.setattr(Kvref, "attention", off)
    with pytest.raises(GoldenWriteError, match="attention_decode_g1"):
        build_suite()


@pytest.mark.parametrize("case_name, tensor, corrupt", [
    ("flat_crop_reset", "lengths", lambda a: a + 1),
    ("ring_wrap", "slot_positions", lambda a: a[..., ::-1].copy()),
    ("ring_wrap", "k_slots", lambda a: a + np.float32(1)),
    ("ring_prefill_longer_than_window", "step_slots", lambda a: np.abs(a)),
    ("two_tier_migration_q8_0", "tiers", lambda a: a + np.array([0, 1, 0])),
    ("two_tier_migration_q4_0_f16", "seq1/store_v", lambda a: a ^ np.uint8(16)),
    ("pooled_block_boundaries", "block_tables", lambda a: a[:, ::-1].copy()),
    ("pooled_block_boundaries", "slot_mapping", lambda a: a + 1),
    ("pooled_fork_copy_on_write", "ref_counts", lambda a: a + 1),
    ("pooled_release_reuse", "free_queue", lambda a: a[1:]),
    ("pooled_eviction", "kv_indices", lambda a: np.roll(a, 1)),
    ("pooled_eviction", "kv_last_page_len", lambda a: a - 1),
], ids=lambda p: p if isinstance(p, str) else "")
def test_writer_refuses_a_physical_layout_that_breaks_the_rules(monkeypatch, case_name, tensor, corrupt):
    """The recorded physical layout is checked against each variant's rules restated in kvref/golden/crosscheck.py,
    not taken on the spec's word: a corrupted layout makes the writer raise."""
    from kvref.golden.impl import KvrefCache
    from kvref.golden.write import RECORDERS

    original = KvrefCache.physical

    def corrupted(self):
        layout = original(self)
        if tensor in layout and layout[tensor].size:
            layout[tensor] = corrupt(layout[tensor])
        return layout

    monkeypatch.setattr(KvrefCache, "physical", corrupted)
    case = next(c for c in all_cases() if c.name == case_name)
    with pytest.raises(GoldenWriteError, match=case_name):
        RECORDERS[case.kind](case, Kvref("python"), np.random.default_rng(0))


def test_record_state_last_records_the_state_after_the_last_step_only():
    from kvref.golden.cases import append, cache_case
    from kvref.golden.write import record_cache_case

    case = cache_case("tiny", "flat", "two appends", [append([0], 2), append([0], 1)], batch=1, max_tokens=4,
                      record_state="last")
    rec = record_cache_case(case, Kvref("python"), np.random.default_rng(0))
    assert not [n for n in rec.tensors if n.startswith("step00/state/")]
    assert rec.tensors["step01/state/seq0/positions"].tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------------
# kvref's own backends pass; the checker fails what it should
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["python", "cpu"])
def test_kvref_backends_pass_the_committed_suite(backend):
    manifest, results = check_suite(SUITE, Kvref(backend))
    assert len(results) == len(manifest["cases"]) == len(all_cases())
    assert exit_status(results) == 0, format_table(results)
    assert all(r.status == "ok" and not r.not_provided for r in results), format_table(results)


class Silent:
    """An implementation that supports nothing."""


class NoRefusal:
    """A flat cache that never refuses: an overflow must be reported as FAIL (seed 001 wrote past the end)."""

    def open_cache(self, variant, config):
        if variant != "flat":
            return None
        inner = Kvref("python").open_cache(variant, config)

        class Cache:
            def append(self, seq_ids, k, v, q):
                try:
                    return inner.append(seq_ids, k, v, q)
                except Exception:
                    return None  # swallows the overflow

            def __getattr__(self, name):
                return getattr(inner, name)

        return Cache()


def test_check_fails_an_implementation_that_does_not_refuse_overflow():
    _, results = check_suite(SUITE, NoRefusal(), names=["flat_overflow", "flat_crop_reset"])
    table = format_table(results)
    assert exit_status(results) == 1
    by_name = {r.name: r for r in results}
    assert by_name["flat_crop_reset"].status == "ok"
    assert by_name["flat_overflow"].status == "FAIL"
    assert "case flat_overflow, step01" in table and "expected an error (CacheOverflowError" in table


def test_check_fails_when_no_case_runs(capsys):
    _, results = check_suite(SUITE, Silent())
    assert all(r.status == "skip" for r in results) and exit_status(results) == 1
    assert "no case ran" in format_table(results)


def test_check_names_case_step_and_tensor_of_a_wrong_value():
    class Shifted(Kvref):
        def dequantize(self, blocks, fmt, head_dim):
            x = super().dequantize(blocks, fmt, head_dim)
            x[3, 5] += 0.01
            return x

    _, results = check_suite(SUITE, Shifted("python"), names=["quant_q8_0"])
    table = format_table(results)
    assert exit_status(results) == 1
    assert "FAIL case quant_q8_0, step01, tensor step01/expected/x" in table and "[3, 5]" in table


# ---------------------------------------------------------------------------------------------------------------
# A broken suite is refused (exit 2)
# ---------------------------------------------------------------------------------------------------------------
def copy_suite(tmp_path):
    target = tmp_path / "suite"
    shutil.copytree(SUITE, target)
    return target


def test_a_changed_file_fails_its_sha256(tmp_path, capsys):
    suite = copy_suite(tmp_path)
    path = suite / "ring_wrap.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(SuiteError, match="sha256"):
        check_suite(suite, Kvref("python"), names=["ring_wrap"])
    assert main(["check", str(suite), "--impl", "kvref.golden.impl:Kvref", "--case", "ring_wrap"]) == 2
    assert "sha256" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, message", [("format_version", 99, "format_version: expected 1 .*, got 99"),
                                                    ("format", "other", "format: expected 'kvref-golden', got 'other'")])
def test_a_manifest_of_another_version_or_format_is_refused(tmp_path, capsys, field, value, message):
    suite = copy_suite(tmp_path)
    manifest = json.loads((suite / "manifest.json").read_text())
    manifest[field] = value
    (suite / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SuiteError, match=message):
        read_manifest(suite)
    assert main(["list", str(suite)]) == 2


def test_a_missing_suite_or_impl_is_a_clear_error(tmp_path, capsys):
    assert main(["check", str(tmp_path), "--impl", "kvref.golden.impl:Kvref"]) == 2
    assert "manifest.json: expected a readable JSON manifest" in capsys.readouterr().err
    assert main(["check", str(SUITE), "--impl", "no_such_module:X"]) == 2
    assert "cannot load --impl" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------
def test_cli_check_list_show_and_write(tmp_path, capsys):
    assert main(["check", str(SUITE), "--impl", "kvref.golden.impl:Kvref", "--case", "ring_sinks", "--case",
                 "quant_q4_1"]) == 0
    out = capsys.readouterr().out
    assert "ring_sinks" in out and "quant_q4_1" in out and "2 cases: 2 ok, 0 FAIL" in out
    assert main(["list", str(SUITE)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(read_manifest(SUITE)["cases"])
    assert main(["show", str(SUITE), "ring_wrap"]) == 0
    out = capsys.readouterr().out
    assert "step00/state/slot_positions" in out and "exact" in out and "mask" not in out.split("config")[0]
    assert main(["show", str(SUITE), "nope"]) == 2
    assert main(["write", str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / "manifest.json").read_bytes() == (SUITE / "manifest.json").read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# compare(): its rule against NumPy's isclose, masks, shapes, non-finite values
# ---------------------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(-1e3, 1e3)),
       hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(-1e-2, 1e-2)),
       st.sampled_from([0.0, 1e-4, 1e-2]), st.sampled_from([0.0, 1e-4, 1e-2]))
def test_compare_follows_the_allclose_rule(expected, noise, atol, rtol):
    noise = np.resize(noise, expected.shape)
    actual = expected + noise
    result = compare(actual, expected, "x", atol, rtol)
    assert result.ok == bool(np.all(np.abs(actual - expected) <= atol + rtol * np.abs(expected)))
    assert result.max_abs == pytest.approx(float(np.max(np.abs(actual - expected))))
    assert result.compared == expected.size and result.skipped == 0
    energy = float(np.sum(expected ** 2))
    if energy > 0:
        assert result.nmse == pytest.approx(float(np.sum((actual - expected) ** 2)) / energy)
    if not result.ok:
        index, got, want = result.worst[0]
        assert abs(got - want) > atol + rtol * abs(want)


def test_compare_skips_masked_and_empty_entries_and_reports_the_worst():
    expected = np.zeros((2, 3, 4))
    actual = expected.copy()
    actual[1, 2, 3] = 7.0  # in a masked row
    actual[0, 1, 0] = 0.5
    mask = np.array([[True, True, True], [True, True, False]])
    result = compare(actual, expected, "k_slots", 0.1, 0.0, mask=mask)
    assert not result.ok and result.skipped == 4 and result.compared == 20
    assert result.worst[0] == ((0, 1, 0), 0.5, 0.0) and result.max_abs == 0.5
    assert compare(np.zeros((0, 3)), np.zeros((0, 3)), "empty").ok
    assert compare(actual, expected, "all masked", mask=np.zeros((2, 3), bool)).ok


def test_compare_fails_shapes_and_non_finite_values():
    assert "shape (3,), expected (4,)" in compare(np.zeros(3), np.zeros(4), "x").message
    result = compare(np.array([1.0, np.nan]), np.array([1.0, 2.0]), "x", 1.0, 1.0)
    assert not result.ok and result.max_abs == np.inf
    assert compare(np.array([np.inf]), np.array([np.inf]), "x").ok
    assert compare(np.array([255], np.uint8), np.array([255], np.uint8), "bytes").ok
    assert not compare(np.array([254], np.uint8), np.array([255], np.uint8), "bytes").ok


def test_compare_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    from kvref.golden.run import as_numpy

    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert compare(as_numpy(t), np.arange(6.0).reshape(2, 3), "t").ok

    class DLPackOnly:  # no __array__: as_numpy must go through DLPack
        def __dlpack__(self, **kwargs):
            return t.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return t.__dlpack_device__()

    assert np.array_equal(as_numpy(DLPackOnly()), t.numpy())


def test_large_suite_adds_realistic_shapes_and_records_them():
    """``write DIR --size large`` (not committed, ~200 MB) adds llama-3-8b shapes; its expected values come from the
    compiled spec and are cross-checked like the default suite's. Recorded here: the n = 4096 decode attention."""
    from kvref.golden.cases import seed_of
    from kvref.golden.write import RECORDERS

    large = {c.name: c for c in all_cases("large")}
    assert set(large) - {c.name for c in all_cases()} == {
        "attention_llama3_8b_decode_4096", "flat_llama3_8b_4096", "ring_llama3_8b_window_4096"}
    case = large["attention_llama3_8b_decode_4096"]
    rec = RECORDERS[case.kind](case, Kvref("cpu"), np.random.default_rng(seed_of(case.name)))  # cross-checked
    assert rec.tensors["step00/input/k"].shape == (4096, 8, 128)
    assert rec.tensors["step00/expected/out"].shape == (1, 32, 128)
    with pytest.raises(ValueError, match="size"):
        all_cases("huge")


def test_an_implementation_that_raises_outside_a_step_fails_that_case_only():
    class Exploding:
        def open_cache(self, variant, config):
            raise RuntimeError("no GPU here")

        def quantize(self, x, fmt):
            return Kvref("python").quantize(x, fmt)

    _, results = check_suite(SUITE, Exploding(), names=["ring_wrap", "quant_q8_0"])
    assert [r.status for r in results] == ["FAIL", "ok"]
    assert "raised RuntimeError: no GPU here" in format_table(results)


def test_supports_runs_on_any_true_value_and_skips_with_its_reason():
    class Picky(Kvref):
        def supports(self, case):
            return np.True_ if case["name"] == "quant_q4_0" else "only q4_0 here"

    _, results = check_suite(SUITE, Picky("python"), names=["quant_q4_0", "quant_q8_0"])
    assert [r.status for r in results] == ["ok", "skip"] and results[1].skipped == "only q4_0 here"


def test_an_unknown_case_name_is_refused(capsys):
    with pytest.raises(SuiteError, match="case: expected one of .*ring_wrap.*, got 'ring_warp'"):
        check_suite(SUITE, Kvref("python"), names=["ring_warp"])
    assert main(["check", str(SUITE), "--impl", "kvref.golden.impl:Kvref", "--case", "ring_warp"]) == 2


def test_a_refused_step_records_no_slots():
    manifest = read_manifest(SUITE)
    case = next(c for c in manifest["cases"] if c["name"] == "pooled_exhaustion")
    refused, after = case["steps"][1], case["steps"][2]
    assert refused["error"] == "PoolExhaustedError" and "slot_mapping" not in refused["physical"]
    assert "slot_mapping" in after["physical"] and "slot_mapping" in case["steps"][0]["physical"]


def test_compare_matches_an_expected_nan_only_with_a_nan():
    assert compare(np.array([np.nan]), np.array([np.nan]), "x").ok
    assert not compare(np.array([1.0]), np.array([np.nan]), "x", 1e9, 1e9).ok
