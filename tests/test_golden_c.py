"""The golden format is language-neutral: ``examples/c/ring_check.c`` (C99, standard library only) reads
``golden/v1/ring_wrap.safetensors``, replays its ring-cache appends in its own cache and matches every step.

Skipped when there is no C compiler (``cc``) on PATH. The program is compiled into pytest's tmp directory, never
into the repository. It does not check the manifest's sha256 (the Python checker does), so the tests below can
corrupt a copy of the file and expect the C program itself to notice.
"""

import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "examples" / "c" / "ring_check.c"
CASE = ROOT / "golden" / "v1" / "ring_wrap.safetensors"
CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(path of the ring_check binary, the compiler's stderr)."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) on PATH")
    exe = tmp_path_factory.mktemp("ring_check") / "ring_check"
    proc = subprocess.run(["cc", *CFLAGS, "-o", str(exe), str(SOURCE)], capture_output=True, text=True)
    assert proc.returncode == 0, f"cc failed:\n{proc.stderr}"
    return exe, proc.stderr


def run(exe, path):
    return subprocess.run([str(exe), str(path)], capture_output=True, text=True, timeout=60)


def steps_of(path):
    """The case's steps, step00, step01, ..., from its tensor names."""
    return sorted({name.split("/")[0] for name in load_file(str(path))})


def header_of(path):
    """(header dict, start of the data buffer) of a safetensors file, read by hand."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), 8 + n


def test_compiles_warning_free(compiled):
    _, warnings = compiled
    assert warnings.strip() == "", f"cc {' '.join(CFLAGS)} warned:\n{warnings}"


@pytest.mark.parametrize("name", ["ring_wrap", "ring_prefill_longer_than_window", "ring_chunked_prefill_deferred"])
def test_c_reader_matches_every_step(compiled, name):
    """The float32 ring cases without sinks (the ones examples/c/README.md says it reads)."""
    exe, _ = compiled
    path = CASE.with_name(f"{name}.safetensors")
    steps = steps_of(path)
    manifest = json.loads((ROOT / "golden" / "v1" / "manifest.json").read_text())
    (case,) = [c for c in manifest["cases"] if c["file"] == path.name]
    assert len(steps) == len(case["steps"]) >= 2
    proc = run(exe, path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for step in steps:
        (line,) = [line for line in lines if line.startswith(step + " ")]
        for tensor in ("slot_positions", "k_slots", "v_slots", "lengths"):
            assert f"{tensor} ok" in line, line
    assert f"{len(steps)} steps" in lines[-1] and "all match" in lines[-1], proc.stdout


def test_c_reader_names_a_corrupted_k_slot(compiled, tmp_path):
    exe, _ = compiled
    steps = steps_of(CASE)
    step = steps[len(steps) // 2]
    tensors = load_file(str(CASE))
    positions = tensors[f"{step}/state/slot_positions"]  # (layers, batch, W)
    layer, seq, slot = (int(i) for i in np.argwhere(positions >= 0)[-1])  # a non-empty slot
    k_slots = tensors[f"{step}/state/k_slots"]  # (layers, batch, W, kv_heads, head_dim)
    index = (layer, seq, slot, k_slots.shape[3] - 1, 3)
    header, data_start = header_of(CASE)
    entry = header[f"{step}/state/k_slots"]
    assert entry["dtype"] == "F32" and entry["shape"] == list(k_slots.shape)
    offset = data_start + entry["data_offsets"][0] + 4 * int(np.ravel_multi_index(index, k_slots.shape))
    raw = bytearray(CASE.read_bytes())
    (value,) = struct.unpack_from("<f", raw, offset)
    assert value == k_slots[index]  # the offset arithmetic found the right float
    struct.pack_into("<f", raw, offset, value + 0.5)
    corrupted = tmp_path / CASE.name
    corrupted.write_bytes(bytes(raw))

    proc = run(exe, corrupted)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith(step + " ")]
    assert "k_slots MISMATCH" in line and "v_slots ok" in line, line
    where = ",".join(str(i) for i in index)
    assert f"{step} k_slots: first mismatch at [{where}]" in proc.stdout, proc.stdout
    for other in steps:
        if other != step:
            (line,) = [line for line in proc.stdout.splitlines() if line.startswith(other + " ")]
            assert "MISMATCH" not in line, line


def _empty(raw):
    return b""


def _truncated_header(raw):
    return raw[:100]


def _truncated_data(raw):
    return raw[: len(raw) - 1000]


def _garbage(raw):
    return bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))


def _wrong_format(raw):
    assert raw.count(b'"kvref-golden 1"') == 1
    return raw.replace(b'"kvref-golden 1"', b'"kvref-golden 9"')


@pytest.mark.parametrize("damage", [_empty, _truncated_header, _truncated_data, _garbage, _wrong_format],
                         ids=["empty", "truncated_header", "truncated_data", "garbage", "wrong_format"])
def test_c_reader_rejects_a_malformed_file(compiled, tmp_path, damage):
    exe, _ = compiled
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(CASE.read_bytes()))
    proc = run(exe, bad)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("ring_check: "), proc.stderr
