"""The benchmark's command line (kvref/bench/): plain-text help, the report goes to stdout unless asked, and a failed
backend check stops it before anything is timed. Nothing here times anything: the full benchmark takes many minutes.
"""

import subprocess
import sys
import types
from pathlib import Path

import pytest

from kvref.bench.__main__ import REPORT_FILE, build_parser, main
from kvref.bench.report import report

ROOT = Path(__file__).resolve().parents[1]


def check_row(backend, variant="flat", dtype="float32", ok=True):
    return {"backend": backend, "variant": variant, "dtype": dtype, "available": ok is not None,
            "reason": "test row", "max_error": None if ok is None else (1e-7 if ok else 1.0), "tolerance": 1e-4,
            "ok": ok, "seconds": 0.0}


@pytest.fixture
def fake_check(monkeypatch):
    """Replace kvref.check with a stub whose check_backends returns the rows the test sets; forbid subprocesses."""
    rows = []

    def check_backends(names=None, dtypes=("float32", "float16"), variants=(), progress=None):
        for row in rows:
            progress(row)
        return rows

    monkeypatch.setitem(sys.modules, "kvref.check", types.SimpleNamespace(check_backends=check_backends))

    def no_subprocess(*args, **kwargs):
        raise AssertionError("the benchmark must not start timing here")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    return rows


def test_help_is_plain_text():
    done = subprocess.run([sys.executable, "-m", "kvref.bench", "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--write" in done.stdout and "--check-only" in done.stdout
    for rest in ("``", ":func:", ":class:", ":mod:"):
        assert rest not in done.stdout


def test_report_goes_to_stdout_unless_asked():
    parser = build_parser()
    assert parser.parse_args([]).out == "-"
    assert parser.parse_args(["--quick"]).out == "-"
    assert parser.parse_args(["--write"]).out == REPORT_FILE == "BENCHMARKS.md"
    assert parser.parse_args(["--out", "/tmp/bench.md"]).out == "/tmp/bench.md"
    with pytest.raises(SystemExit):
        parser.parse_args(["--write", "--out", "/tmp/bench.md"])


def test_check_only_writes_nothing(fake_check, tmp_path, monkeypatch, capsys):
    committed = (ROOT / REPORT_FILE).read_bytes()
    fake_check += [check_row("python"), check_row("cpu", "ring", "float16"), check_row("cuda", ok=None)]
    monkeypatch.chdir(tmp_path)
    assert main(["--check-only"]) == 0
    assert (ROOT / REPORT_FILE).read_bytes() == committed
    assert list(tmp_path.iterdir()) == []
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "skipped" in captured.err and "ok" in captured.err


@pytest.mark.parametrize("argv", [[], ["--check-only"], ["--quick", "--write"]])
def test_failed_check_stops_before_timing(fake_check, tmp_path, monkeypatch, capsys, argv):
    fake_check += [check_row("python"), check_row("cpu", "two_tier", "float16", ok=False)]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert "backend check failed (cpu two_tier float16); nothing was timed" in err


def fake_results():
    """The smallest per-thread results report() accepts: every section once, made-up times."""
    sizes, results = (1024, 65536), []
    for threads in (1, 2):
        r = {"threads": threads, "bandwidth": {"read_GBps": 20.0, "copy_GBps": 15.0, "read_readings": [19.0, 20.0]},
             "attention": [{"dtype": d, "kv_heads": h, "n": n, "bytes": 2 * h * n * 128 * 4,
                            "times": {"kvref": 1e-3, "numpy": 3e-3, "torch_sdpa": 5e-3, "torch_matmul": 2e-3}}
                           for d in ("float32", "float16") for h in (8, 32) for n in sizes],
             "ring": [{"dtype": "float32", "kv_heads": 8, "n": 4096, "ring": 1.05e-3, "flat": 1e-3, "ratio": 1.05}],
             "two_tier": [{"kv_heads": 8, "n": 4096, "flat": 2e-3, "q8_0": 2.5e-3, "q4_0": 1.5e-3,
                           "bytes": {"flat": 10**6, "q8_0": 53 * 10**4, "q4_0": 28 * 10**4}}],
             "pooled": [{"dtype": "float16", "kv_heads": 8, "n": 4096, "pooled": 1.1e-3, "flat": 1e-3, "ratio": 1.1}]}
        if threads == 1:
            r["append"] = [{"n": n, "kvref": 2e-6, "torch_cat": 1e-3} for n in (1024, 16384, 65536)]
            r["append_host"] = {"layers": 32, "append_all": 1e-5, "plan": 1.5e-5, "write": 1.5e-5,
                                "advance": 7e-6, "torch_copy": 2e-6}
            r["ring_memory"] = {"window": 4096, "kv_heads": 8, "dtype": "float16",
                                "rows": [{"n": n, "ring_nbytes": 10**6, "position_bytes": 10**4, "flat_bytes": 2 * n}
                                         for n in (1024, 4096, 65536)]}
            r["quantize"] = [{"format": "q8_0", "bytes": 2**24, "kvref": 1e-3, "kvref_loop": 6e-4,
                              "finite_check": 4e-4, "gguf": 2e-2, "kvref_deq": 1e-3, "gguf_deq": 5e-3,
                              "identical": True}]
            r["pooled_memory"] = {"lengths": [1, 8192], "tokens": 8193, "flat_nbytes": 10**8, "token_bytes": 4096,
                                  "pooled": [{"block_size": 16, "bytes_used": 4 * 10**7, "internal_fragmentation": 15}]}
        results.append(r)
    return results


def test_report_renders_every_section():
    text, targets = report(fake_results(), {"cpu": "test", "cores": 2})
    assert text.startswith("# kvref benchmarks\n")
    assert "`python -m kvref.bench --write`" in text
    for heading in ("## Memory bandwidth", "## Decode attention, 1 thread(s)", "## Decode attention, 2 thread(s)",
                    "## Append one token", "## Host time of a decode step", "## Ring vs flat", "## Ring memory",
                    "## ggml quantization",
                    "## Two-tier vs flat fp16 decode attention", "## Pooled (paged", "## Pooled memory",
                    "## Targets", "## Why targets are missed", "## GPU"):
        assert heading in text, heading
    assert all(len(t) == 3 for t in targets) and len(targets) >= 10


def test_the_stub_matches_kvref_check():
    import inspect

    from kvref.check import check_backends

    assert "progress" in inspect.signature(check_backends).parameters


def test_gpu_bench_without_a_gpu_says_so_and_measures_nothing(tmp_path):
    """``--gpu`` on a machine without a CUDA GPU (CI, this suite): a sentence on stderr, exit status 0, no report."""
    out = tmp_path / "gpu.md"
    env = {key: value for key, value in __import__("os").environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-m", "kvref.bench", "--gpu", "--out", str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env=env)
    if "on NVIDIA" in done.stderr:
        pytest.skip("this machine has a GPU: the benchmark ran")
    assert done.returncode == 0, done.stderr
    assert "no GPU benchmark on this machine" in done.stderr and "Nothing was measured" in done.stderr
    assert not out.exists()


def test_gpu_bench_refuses_to_overwrite_the_whole_report(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--gpu", "--write"])
    assert stop.value.code == 2
    assert "--out FILE" in capsys.readouterr().err


def test_gpu_bench_counts_the_bytes_of_each_layout():
    """The attend's bytes (the bandwidth's numerator): every visible K and V row once, in its storage format."""
    import kvref
    from kvref.bench.gpu import kv_bytes_read

    shape = kvref.CacheShape(layers=1, q_heads=8, kv_heads=2, head_dim=64, dtype="float16")
    flat = kvref.FlatCache(shape, batch=1, max_tokens=100, backend="python")
    assert kv_bytes_read(flat, shape, 3, 100) == 3 * 2 * 100 * 2 * 64 * 2
    ring = kvref.RingCache(shape, window=40, backend="python")
    assert kv_bytes_read(ring, shape, 1, 100) == 2 * 40 * 2 * 64 * 2  # only the window is read
    tiered = kvref.TwoTierCache(shape, tail_tokens=10, max_tokens=200, store_format="q8_0", backend="python")
    # q8_0: 34 bytes per 32 values; the 10 tail rows in fp16
    assert kv_bytes_read(tiered, shape, 1, 100) == 2 * 2 * 64 * (90 * 34 / 32 + 10 * 2)


def test_split_k_bench_times_both_thread_counts():
    """``python -m kvref.bench.split_k``'s timing, on a tiny case: both thread counts timed, the answer unchanged."""
    from kvref.bench.split_k import filled_step, one_vs_two_threads

    case = ("flat", 4, 1, 32, 3000, "float32")
    best = one_vs_two_threads(case, repeats=1, calls=1)
    assert set(best) <= {1, 2} and 1 in best and all(0 < t < 60 for t in best.values())
    cache, step, q = filled_step(*case)
    assert cache.lengths[0] == 3000 and cache.attend(step, 0, q).shape == q.shape


def test_split_k_bench_bytes_and_read_ceiling():
    """The K/V bytes a case reads (2 x n x kv_heads x head_dim x itemsize, counted independently from the cache's
    own arrays) and the read bandwidth the speedup ceiling comes from (both thread counts measured, positive)."""
    from kvref.bench.split_k import filled_step, kv_bytes, read_bandwidth

    case = ("flat", 4, 2, 32, 1000, "float16")
    cache, _, _ = filled_step(*case)
    assert cache.kv.shape == (1, 2, 1, 2, 1001, 32)  # (layers, K/V, batch, kv_heads, slots, head_dim)
    assert kv_bytes(case) == 2 * 1000 * 2 * 32 * 2 == cache.kv[:, :, :, :, :1000].nbytes
    read = read_bandwidth(rounds=1, gib=1 / 64)
    assert 1 in read and all(gbps > 0 for gbps in read.values())
