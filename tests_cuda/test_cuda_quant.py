"""kvref.quant with backend="cuda": ggml's bytes, against the gguf package, from the CUDA kernels.

Runs in the CUDA simulator by default (see conftest.py); every launch is tiny (a few rows of a few blocks;
quantize runs one warp per 32-element block, 4 simulated lanes, dequantize one thread per block). With
``KVREF_CUDA=gpu`` the same tests run on a real GPU, where the kernels use the CUDA overload of ``quant.mul_rn`` (an
unfused multiply); :func:`test_quantize_ptx_has_no_fma` checks that overload in the compiled PTX, without a GPU, when
the CUDA 13 compiler is installed (``kvref[cu13]``).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from kvref import quant
from kvref.backends import backend_ops
from kvref.cuda import quant as cuda_quant
from kvref.errors import NonFiniteError
from numba.core import config

ON_SIMULATOR = bool(config.ENABLE_CUDASIM)

FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
B = 32


def _gguf():
    """The oracle, gguf's NumPy quantizers (imported lazily: the PTX check below runs without gguf)."""
    return pytest.importorskip("gguf")


def gguf_quantize(x, fmt):
    gguf = _gguf()
    with np.errstate(all="ignore"):
        return gguf.quants.quantize(np.ascontiguousarray(x, np.float32), gguf.GGMLQuantizationType[fmt.upper()])


def gguf_dequantize(blocks, fmt):
    gguf = _gguf()
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[fmt.upper()])


def small_data(rng):
    """3 rows of 2 blocks: ordinary values, an exact q8_0 tie block, the q4_0 clamp (+a and -a), an all-zero block,
    a one-signed block (q4_1's min > 0) and fp16-subnormal scale values."""
    x = rng.standard_normal((3, 2 * B)).astype(np.float32)
    x[0, B:] = (np.arange(B) - 15.5).astype(np.float32)  # k + 1/2 ...
    x[0, B] = 127.0  # ... and amax 127, so d = 1 and id = 1: for q8_0 every other element is a roundf tie
    x[1, :B] = rng.uniform(-1, 1, B)
    x[1, 3], x[1, 17] = 2.0, -2.0  # q4_0 / q5_0 clamp of the opposite extreme
    x[1, B:] = 0.0
    x[2, :B] = rng.uniform(0.5, 1.0, B)
    x[2, B:] *= np.float32(1e-7)
    return x


def test_cuda_quant_ops_is_the_backend():
    assert backend_ops("quant", "cuda") is cuda_quant.OPS
    assert set(cuda_quant.KERNELS) == {"quant.quantize", "quant.dequantize"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_bytes_equal_gguf(rng, fmt):
    x = small_data(rng)
    got = quant.quantize(x, fmt, backend="cuda")
    expected = gguf_quantize(x, fmt)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, quant.quantize(x, fmt, backend="python"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_more_than_two_dimensions(rng, fmt):
    x = rng.standard_normal((2, 1, 2, B)).astype(np.float32)
    got = quant.quantize(x, fmt, backend="cuda")
    assert got.shape == (2, 1, 2, quant.FORMATS[fmt][1])
    np.testing.assert_array_equal(got, gguf_quantize(x, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_equals_gguf_bit_for_bit(rng, fmt):
    """Bytes from real data and random bytes (every code, fp16 scales of every kind): float32 bits equal."""
    x = small_data(rng)
    nbytes = quant.FORMATS[fmt][1]
    blocks = np.concatenate([gguf_quantize(x, fmt), rng.integers(0, 256, (1, 2 * nbytes), dtype=np.uint8)])
    got = quant.dequantize(blocks, fmt, (4, 2 * B), backend="cuda")
    expected = gguf_dequantize(blocks, fmt).reshape(4, 2 * B)
    same = (got.view(np.uint32) == expected.view(np.uint32)) | (np.isnan(got) & np.isnan(expected))
    assert same.all(), np.argwhere(~same)[:5]


def lane_tie_blocks(rng):
    """Blocks whose statistics are decided by a tie between elements that different lanes hold (lane l of L holds
    elements l, l + L, ...; with L = 4 in the simulator, 32 on a GPU, the tied elements sit in different lanes
    either way): the q4_0 / q5_0 extreme +M and -M (the first one wins), a q4_1 / q5_1 minimum or maximum that is
    a tie of +0.0 and -0.0 (the first one is stored), an all-zero block with -0.0 first (ggml's C keeps +0.0, so
    d = -0.0), and random blocks with repeated values."""
    blocks = rng.uniform(-1.0, 1.0, (12, B)).astype(np.float32)
    blocks[0, 6], blocks[0, 9] = -3.0, 3.0  # extreme tie, -3 first (lane 2 of 4), +3 later (lane 1)
    blocks[1, 9], blocks[1, 6] = -3.0, 3.0  # +3 first
    blocks[2, 31], blocks[2, 0] = -2.5, 2.5  # first and last element
    blocks[3] = np.abs(blocks[3]) + 0.25
    blocks[3, 4], blocks[3, 1] = -0.0, 0.0  # min a tie of zeros: +0.0 at 1 (lane 1) before -0.0 at 4 (lane 0)
    blocks[4] = np.abs(blocks[4]) + 0.25
    blocks[4, 1], blocks[4, 4] = -0.0, 0.0  # -0.0 first
    blocks[5] = -np.abs(blocks[5]) - 0.25
    blocks[5, 1], blocks[5, 4] = 0.0, -0.0  # max a tie of zeros, +0.0 first
    blocks[6] = -np.abs(blocks[6]) - 0.25
    blocks[6, 1], blocks[6, 4] = -0.0, 0.0  # -0.0 first
    blocks[7] = 0.0
    blocks[7, 0] = -0.0  # all zeros, -0.0 first
    blocks[8] = -0.0
    blocks[9] = rng.choice(np.float32([-1.5, -0.5, 0.5, 1.5]), B)  # many ties of every statistic
    blocks[10] = np.float32(1e-38) * rng.standard_normal(B).astype(np.float32)  # 1/d overflows: id = 0
    blocks[11] = (np.arange(B) - 15.5).astype(np.float32)
    blocks[11, 0] = 127.0  # q8_0: d = 1, every other element a roundf tie
    return blocks


@pytest.mark.parametrize("fmt", FORMATS)
def test_warp_quantize_equals_one_thread_spec_on_lane_ties(rng, fmt):
    """One warp per ggml block (the lanes' max / min / or reductions, the smallest index breaking ties) writes the
    bytes of the one-thread spec, ``quantize_block``, which tests/test_quant.py checks against gguf and against
    ggml's C on the signed-zero corners."""
    from kvref.cuda.quant import QUANT_LANES

    assert QUANT_LANES == (4 if ON_SIMULATOR else 32)
    x = lane_tie_blocks(rng)
    got = quant.quantize(x, fmt, backend="cuda")
    expected = quant.quantize(x, fmt, backend="python")
    for row in range(x.shape[0]):
        np.testing.assert_array_equal(got[row], expected[row], err_msg=f"block {row}")
    if fmt in ("q4_1", "q5_1"):  # the stored minimum keeps the sign of the first tied zero
        m_bits = got[:, 2].astype(np.int64) | (got[:, 3].astype(np.int64) << 8)
        assert m_bits[3] == 0x0000 and m_bits[4] == 0x8000
    if fmt in ("q4_0", "q5_0"):  # d = extreme / -half keeps the extreme's sign: -3 first gives d > 0
        d = got[:, 0].astype(np.int64) | (got[:, 1].astype(np.int64) << 8)
        assert d[0] < 0x8000 and d[1] >= 0x8000 and d[7] == 0x8000


def test_launchers_fill_device_arrays_in_place(rng):
    from numba import cuda

    x = rng.standard_normal((2, 2 * B)).astype(np.float32)
    d_blocks = cuda.device_array((2, quant.row_bytes(2 * B, "q4_1")), np.uint8)
    cuda_quant.quantize_rows(cuda.to_device(x), quant.Q4_1, d_blocks)
    np.testing.assert_array_equal(d_blocks.copy_to_host(), gguf_quantize(x, "q4_1"))
    d_x = cuda.device_array(x.shape, np.float32)
    cuda_quant.dequantize_rows(d_blocks, quant.Q4_1, d_x)
    np.testing.assert_array_equal(d_x.copy_to_host(), gguf_dequantize(gguf_quantize(x, "q4_1"), "q4_1"))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_raises_before_any_launch(bad):
    x = np.ones((2, B), np.float32)
    x[1, 5] = bad
    with pytest.raises(NonFiniteError) as info:
        quant.quantize(x, "q8_0", backend="cuda")
    assert info.value.argument == "x" and "(1, 5)" in str(info.value)


_PTX_SCRIPT = r"""
import json, sys
from numba import cuda
out = {"skip": None}
try:
    cuda.compile_ptx(lambda a: None, "void(float32[::1])", cc=(9, 0))
except Exception as exc:
    out["skip"] = f"no CUDA compiler here ({type(exc).__name__}); install kvref[cu13]"
    print("KVREF_PTX " + json.dumps(out)); sys.exit(0)
import numba.cuda.dispatcher as dispatcher
class Sm90:
    compute_capability = (9, 0)
    name = "sm_90 stand-in"
dispatcher.get_current_device = lambda: Sm90  # see tests/test_ptx.py: compiling device calls asks the driver
from kvref.cuda import quant as cq
for name, (body, sigs) in cq.KERNELS.items():
    ptx, _ = cuda.compile_ptx(body, sigs[0], cc=(9, 0))
    out[name] = {"fma": ptx.count("fma."), "mul_rn": ptx.count("mul.rn.f32"), "shfl": ptx.count("shfl.sync"),
                 "lines": ptx.count("\n")}
print("KVREF_PTX " + json.dumps(out))
"""


def test_quantize_ptx_has_no_fma():
    """Compiled for sm_90 (in a child process, on the real CUDA target, no GPU needed): the quantize kernel
    multiplies with ``mul.rn.f32`` (quant.mul_rn's CUDA overload) and contains no FMA anywhere, so
    ``(int8_t)(x * id + 8.5f)`` rounds twice, as ggml does; the dequantize kernel (``d * c + m``) has no FMA either.
    The quantize kernel's lane reductions are warp shuffles (``shfl.sync``), one warp per ggml block."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("KVREF_PTX ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("KVREF_PTX "):])
    if result["skip"]:
        pytest.skip(result["skip"])
    assert result["quant.quantize"]["fma"] == 0 and result["quant.quantize"]["mul_rn"] > 0, result
    assert result["quant.quantize"]["shfl"] > 0, result
    assert result["quant.dequantize"]["fma"] == 0 and result["quant.dequantize"]["mul_rn"] > 0, result
