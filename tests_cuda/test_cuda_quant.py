"""kvref.quant with backend="cuda": ggml's bytes, against the gguf package, from the CUDA kernels.

Runs in the CUDA simulator by default (see conftest.py); every launch is tiny (a few rows of a few blocks: one
simulated thread per 32-element block). With ``KVREF_CUDA=gpu`` the same tests run on a real GPU, where the kernels
use the CUDA overload of ``quant.mul_rn`` (an unfused multiply); :func:`test_quantize_ptx_has_no_fma` checks that
overload in the compiled PTX, without a GPU, when the CUDA 13 compiler is installed (``kvref[cu13]``).
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
    out[name] = {"fma": ptx.count("fma."), "mul_rn": ptx.count("mul.rn.f32"), "lines": ptx.count("\n")}
print("KVREF_PTX " + json.dumps(out))
"""


def test_quantize_ptx_has_no_fma():
    """Compiled for sm_90 (in a child process, on the real CUDA target, no GPU needed): the quantize kernel
    multiplies with ``mul.rn.f32`` (quant.mul_rn's CUDA overload) and contains no FMA anywhere, so
    ``(int8_t)(x * id + 8.5f)`` rounds twice, as ggml does; the dequantize kernel (``d * c + m``) has no FMA either."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("KVREF_PTX ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("KVREF_PTX "):])
    if result["skip"]:
        pytest.skip(result["skip"])
    assert result["quant.quantize"]["fma"] == 0 and result["quant.quantize"]["mul_rn"] > 0, result
    assert result["quant.dequantize"]["fma"] == 0 and result["quant.dequantize"]["mul_rn"] > 0, result
