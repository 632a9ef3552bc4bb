"""The benchmark's tools (kvref/bench/asm.py, the strict read limit of kvref/bench/measure.py, their report sections).

Nothing here asserts a speed: the read limit is only checked for its shape, and the assembly checks compile two tiny
functions whose vectorisation does not depend on the machine's load.
"""

import math
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from numba.core import config

from kvref.bench import asm, measure
from kvref.bench.report import report

ROOT = Path(__file__).resolve().parents[1]


def dot(a, b):
    """A float32 dot product: with fastmath (reassociation) LLVM vectorises the reduction."""
    s = np.float32(0.0)
    for i in range(a.size):
        s += a[i] * b[i]
    return s


def recurrence(a, b):
    """s = s * a[i] + b[i]: each FMA needs the previous one's result, so the loop cannot be vectorised."""
    s = np.float32(1.0)
    for i in range(a.size):
        s = s * a[i] + b[i]
    return s


X = np.linspace(0.0, 1.0, 1000).astype(np.float32)


def compiled(fn, **options):
    dispatcher = numba.njit(fastmath=True, **options)(fn)
    dispatcher(X, X)
    return dispatcher


def test_vectorised_and_scalar_verdicts_differ():
    [vector] = asm.asm_report(compiled(dot))
    [scalar] = asm.asm_report(compiled(recurrence))
    assert vector.ok and vector.verdict.startswith("vectorised:"), vector.verdict
    assert sum(vector.hot["fma"][w] for w in asm.WIDTHS) > 0 and vector.packed_fma_loops >= 1
    assert vector.source == "inspected" and vector.signature == "float32[1d], float32[1d]"
    assert not scalar.ok and scalar.verdict.startswith("SCALAR FALLBACK:"), scalar.verdict
    assert scalar.hot["fma"]["scalar"] > 0 and sum(scalar.hot["fma"][w] for w in asm.WIDTHS) == 0
    assert scalar.scalar_fma_loops >= 1 and scalar.innermost_loops >= 1
    for r in (vector, scalar):  # the hot counts are a part of the whole
        for key in ("fma", "mul", "add"):
            assert all(r.hot[key][k] <= r.whole[key][k] for k in r.hot[key])
        assert set(r.as_dict()) >= {"signature", "hot", "whole", "verdict", "ok", "source"}


def test_every_signature_is_reported():
    dispatcher = compiled(dot)
    dispatcher(X.astype(np.float64), X.astype(np.float64))
    reports = asm.asm_report(dispatcher)
    assert [r.signature for r in reports] == ["float32[1d], float32[1d]", "float64[1d], float64[1d]"]


def test_code_loaded_from_the_disk_cache_is_recompiled_for_inspection(tmp_path):
    saved = config.CACHE_DIR
    config.CACHE_DIR = str(tmp_path)
    try:
        numba.njit(fastmath=True, cache=True)(dot)(X, X)  # compiles and writes the cache
        loaded = numba.njit(fastmath=True, cache=True)(dot)
        loaded(X, X)  # loads it
    finally:
        config.CACHE_DIR = saved
    assert list(tmp_path.rglob("*.nbi")), "nothing was cached"
    [r] = asm.asm_report(loaded)
    assert r.source == "recompiled"
    assert r.ok and r.verdict.startswith("vectorised:"), r.verdict


def test_uncompiled_and_failing_dispatchers_give_a_row():
    never_called = numba.njit(dot)
    rows = asm.asm_rows([("never", never_called), ("dot", compiled(dot))])
    assert rows[0] == {"function": "never", "signature": None, "verdict": "not compiled in this run", "ok": None}
    assert rows[1]["function"] == "dot" and rows[1]["ok"] is True

    class Broken:
        signatures = ["sig"]

        def inspect_asm(self, sig):
            raise RuntimeError("no assembly")

    [row] = asm.asm_rows([("broken", Broken())])
    assert row["ok"] is None and "no assembly" in row["verdict"]


# A hand-written function: an outer loop (.LBB0_1) around a packed inner loop (.LBB0_2), a scalar remainder loop
# (.LBB0_4), and a jump back up to .LBB0_4 from a block that .LBB0_4 does not dominate (not a loop).
ASM = """\t.text
f:
\ttestq\t%rdi, %rdi
\tje\t.LBB0_5
.LBB0_1:
\txorl\t%eax, %eax
.LBB0_2:
\tvfmadd231ps\t(%rsi,%rax,4), %zmm1, %zmm0
\tvfmadd231ps\t64(%rsi,%rax,4), %zmm1, %zmm2
\tvmulps\t%ymm1, %ymm2, %ymm3
\taddq\t$32, %rax
\tcmpq\t%rax, %rdx
\tjne\t.LBB0_2
\tdecq\t%rdi
\tjne\t.LBB0_1
\tjmp\t.LBB0_6
.LBB0_4:
\tvfmadd213ss\t(%rsi,%rax,4), %xmm0, %xmm1
\tvcvtsi2ss\t%rax, %xmm2, %xmm2
\tincq\t%rax
\tcmpq\t%rax, %rdx
\tjne\t.LBB0_4
\tretq
.LBB0_5:
\tvaddss\t%xmm0, %xmm0, %xmm0
.LBB0_6:
\ttestq\t%rdx, %rdx
\tjne\t.LBB0_4
\tretq
cpython.f:
\tretq
"""


def test_loops_are_found_from_the_jumps():
    loops = {loop.header: loop for loop in asm.find_loops(ASM)}
    assert set(loops) == {".LBB0_1", ".LBB0_2", ".LBB0_4"}  # the jmp back to .LBB0_4 adds no loop
    assert not loops[".LBB0_1"].innermost and loops[".LBB0_2"].innermost and loops[".LBB0_4"].innermost
    assert loops[".LBB0_2"].blocks < loops[".LBB0_1"].blocks
    assert loops[".LBB0_2"].counts["fma"] == {"zmm": 2, "ymm": 0, "xmm": 0, "scalar": 0}
    assert loops[".LBB0_2"].counts["mul"]["ymm"] == 1
    assert loops[".LBB0_4"].counts["fma"]["scalar"] == 1 and loops[".LBB0_4"].counts["cvtsi2ss"] == 1
    r = asm.analyse_asm(ASM)
    assert (r.loops, r.innermost_loops, r.packed_fma_loops, r.scalar_fma_loops) == (3, 2, 1, 1)
    assert r.whole["add"]["scalar"] == 1 and r.hot["add"]["scalar"] == 0  # .LBB0_5 is in no loop
    assert r.ok and r.verdict.startswith("vectorised: 2 zmm FMAs in 1 innermost loop(s), 1 scalar"), r.verdict
    assert "1 vcvtsi2ss" in r.verdict


def test_verdict_without_fma():
    line, ok = asm.verdict(asm._blank_counts(), asm._blank_counts())
    assert ok and line == "no FMA in innermost loops (0 elsewhere)"


def test_strict_read_limit_structure():
    r = measure.strict_read_limit(nbytes=8 << 20, repeats=2)
    assert set(r) == {"GBps", "readings", "nbytes", "passes", "note"}
    assert r["nbytes"] == 8 << 20 and r["passes"] == 2 == len(r["readings"]) and r["note"] is None
    assert math.isfinite(r["GBps"]) and r["GBps"] > 0 and r["GBps"] == max(r["readings"])


def test_strict_read_limit_says_when_memory_is_short(monkeypatch):
    monkeypatch.setattr(measure, "available_memory", lambda: 32 << 20)
    r = measure.strict_read_limit(nbytes=64 << 20, repeats=1)
    assert r["nbytes"] == 16 << 20
    assert r["note"].startswith("memory short: ")


def test_attention_dispatchers_cover_every_variant():
    import importlib

    for variant in ("flat", "ring", "pooled", "two_tier"):  # build one specialisation of each (compiled lazily)
        module = importlib.import_module(f"kvref.cpu.{variant}")
        module.ATTEND(2, 16, 3) if variant == "pooled" else module.ATTEND(2, 16)
    names = [name for name, _ in asm.attention_dispatchers()]
    for variant in ("flat", "ring", "two_tier"):
        assert f"{variant}.attend[G=2, D=16].serial" in names and f"{variant}.attend[G=2, D=16].parallel" in names
    assert "pooled.attend[G=2, D=16, kv_heads=3].serial" in names
    assert "two_tier.attend[G=2, D=16].materialized" in names


def test_report_shows_both_references_and_the_assembly():
    from test_bench_cli import fake_results

    results = fake_results()
    for r in results:
        r["strict_read"] = {"GBps": 40.0, "readings": [39.0, 40.0], "nbytes": 1 << 30, "note": None}
        r["asm"] = [{"function": "flat.attend_tokens_serial", "signature": "float32[6d]", "ok": True,
                     "verdict": "vectorised: 29 ymm FMAs in 9 innermost loop(s), 0 scalar …ss",
                     "source": "inspected"},
                    {"function": "flat.attend_tokens_parallel", "signature": None, "ok": None,
                     "verdict": "not compiled in this run"}]
    results[1]["asm"][1] = {"function": "flat.attend_tokens_parallel", "signature": "uint16[6d]", "ok": False,
                            "verdict": "SCALAR FALLBACK: 40 vfmadd…ss in 2 innermost loop(s), no packed FMA",
                            "source": "recompiled"}
    text, targets = report(results, {"cpu": "test"})
    assert "## Strict read limit" in text and "| 1 | 40.0 | 39.0 / 40.0 | 20.0 | 50% | 1.00 GiB |" in text
    assert "| % strict | % BW |" in text
    # fp32 MHA at n = 65536 reads 2*32*65536*128*4 bytes in 1 ms: 6.7e4 %; judged against the strict limit (40)
    assert any(name.startswith("fp32 MHA") and name.endswith("of the strict read limit") for name, _, _ in targets)
    assert "## Assembly of the attention kernels" in text
    assert text.count("flat.attend_tokens_serial") == 1  # both processes compiled it: listed once
    assert "not compiled in this run" not in text  # the 2-thread process compiled the parallel one
    assert "**SCALAR FALLBACK: 40 vfmadd…ss" in text and "(recompiled)" in text
    [target] = [t for t in targets if t[0].startswith("Every timed attention specialisation vectorised")]
    assert target[1:] == ("1 of 2", False)


def test_report_without_strict_readings_still_renders():
    from test_bench_cli import fake_results

    text, targets = report(fake_results(), {"cpu": "test"})
    assert "## Strict read limit" not in text and "## Assembly" not in text
    assert any(name.endswith("of read BW") for name, _, _ in targets)


def test_asm_command_help():
    done = subprocess.run([sys.executable, "-m", "kvref.bench.asm", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--serial-only" in done.stdout


@pytest.mark.parametrize("operands, width", [("%zmm1, %zmm2, %zmm3", "zmm"), ("(%rax), %ymm1, %ymm2", "ymm"),
                                             ("%xmm0, %xmm1, %xmm2", "xmm")])
def test_packed_instructions_count_under_their_widest_register(operands, width):
    counts = asm._blank_counts()
    asm.count_instruction(counts, "vfmadd231ps", operands)
    asm.count_instruction(counts, "vcvtph2ps", operands)
    asm.count_instruction(counts, "vfnmadd213ss", "%xmm0, %xmm1, %xmm2")
    assert counts["fma"][width] == 1 and counts["fma"]["scalar"] == 1 and counts["cvtph2ps"][width] == 1
