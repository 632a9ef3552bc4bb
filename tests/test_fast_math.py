"""kvref/cpu/fast_math.py: the compiled-CPU forms of two spec primitives, against the spec and independent sources.

* ``f16_bits_to_f32`` compiled (LLVM ``fpext half -> float``) is bit-identical to the spec and to NumPy on all 65,536
  patterns; NaN stays NaN.
* ``exp_f32`` compiled (range reduction + polynomial) is within 2e-7 relative of float64 ``exp`` on a dense grid of
  [-87, 0]; below -87 (and -inf) it is 0.

``kvref.cpu`` is imported first: importing it registers the overloads, and the LLVM IR checks below prove that the
compiled functions really use them (otherwise the comparisons would only test the spec against itself).
"""

import math

import numpy as np
import numba
import pytest

import kvref.cpu  # noqa: F401  (registers the CPU overloads before anything below compiles)
from kvref.attention import exp_f32
from kvref.cpu import ATTENTION_FASTMATH
from kvref.fp16 import f16_bits_to_f32, widen

ALL_BITS = np.arange(65536, dtype=np.uint32).astype(np.uint16)
F16_NAN = ((ALL_BITS & 0x7C00) == 0x7C00) & ((ALL_BITS & 0x03FF) != 0)
EXP_REL_BOUND = 2e-7


@numba.njit
def _widen_all_compiled(bits, out):
    for i in range(bits.size):
        out[i] = f16_bits_to_f32(bits[i])


@numba.njit
def _widen_generic_all_compiled(bits, out):
    for i in range(bits.size):
        out[i] = widen(bits[i])


def _exp_kernel(fastmath):
    def exp_all(x, out):
        for i in range(x.size):
            out[i] = exp_f32(x[i])

    return numba.njit(fastmath=set(fastmath) if fastmath else False)(exp_all)


EXP_KERNELS = {"plain": _exp_kernel(False), "attention_fastmath": _exp_kernel(ATTENTION_FASTMATH)}


def _llvm(dispatcher):
    return "\n".join(dispatcher.inspect_llvm().values())


# ---------------------------------------------------------------------------------------------------------------
# fp16 widening
# ---------------------------------------------------------------------------------------------------------------
def test_compiled_f16_widening_uses_the_hardware_conversion():
    _widen_all_compiled(ALL_BITS[:1], np.empty(1, np.float32))
    assert "fpext half" in _llvm(_widen_all_compiled)


@pytest.mark.parametrize("kernel", [_widen_all_compiled, _widen_generic_all_compiled], ids=["f16_bits_to_f32", "widen"])
def test_compiled_f16_widening_equals_spec_and_numpy_on_every_pattern(kernel):
    got = np.empty(65536, dtype=np.float32)
    kernel(ALL_BITS, got)
    spec = np.array([f16_bits_to_f32(b) for b in ALL_BITS], dtype=np.float32)  # the plain-Python spec
    numpy = ALL_BITS.view(np.float16).astype(np.float32)
    assert np.all(np.isnan(got[F16_NAN])), "NaN stays NaN"
    assert np.all(np.isnan(spec[F16_NAN]))
    ok = ~F16_NAN
    assert np.array_equal(got[ok].view(np.uint32), spec[ok].view(np.uint32))
    assert np.array_equal(got[ok].view(np.uint32), numpy[ok].view(np.uint32))
    # signed zeros and infinities survive
    assert np.signbit(got[0x8000]) and got[0x8000] == 0
    assert got[0x7C00] == np.inf and got[0xFC00] == -np.inf


def test_compiled_widen_passes_float32_through():
    @numba.njit
    def widen_f32(x, out):
        for i in range(x.size):
            out[i] = widen(x[i])

    x = np.array([0.1, -3.5, np.inf, -0.0, 1e-40], dtype=np.float32)
    out = np.empty_like(x)
    widen_f32(x, out)
    assert np.array_equal(out.view(np.uint32), x.view(np.uint32))


# ---------------------------------------------------------------------------------------------------------------
# exp
# ---------------------------------------------------------------------------------------------------------------
def exp_grid():
    """float32 points covering [-87, 0]: a dense uniform grid, log-spaced magnitudes near 0, the float32 neighbours
    of every range-reduction seam k * ln2 / 2, and random points."""
    rng = np.random.default_rng(20240601)
    uniform = np.linspace(-87.0, 0.0, 2_000_001).astype(np.float32)
    tiny = -np.logspace(-40, math.log10(87.0), 100_000).astype(np.float32)
    seams = (-np.arange(0, 252) * math.log(2) / 2).astype(np.float32)
    seams = seams[seams >= -87]
    near_seams = np.concatenate([seams + k * np.spacing(seams) for k in range(-3, 4)]).astype(np.float32)
    random = rng.uniform(-87.0, 0.0, 500_000).astype(np.float32)
    edges = np.float32([0.0, -0.0, -87.0, np.nextafter(np.float32(-87.0), np.float32(0)), -1e-45, -1.0, -0.5])
    x = np.concatenate([uniform, tiny, near_seams, random, edges])
    return x[(x >= -87.0) & (x <= 0.0)]


@pytest.mark.parametrize("name", list(EXP_KERNELS))
def test_compiled_exp_uses_the_polynomial_not_libm(name):
    kernel = EXP_KERNELS[name]
    kernel(np.float32([-1.0]), np.empty(1, np.float32))
    ir = _llvm(kernel)
    assert "llvm.exp" not in ir and "@expf" not in ir and "@exp(" not in ir
    spec = numba.njit(exp_f32)  # the spec function itself, compiled (no overload involved)
    spec(np.float32(-1.0))
    assert "llvm.exp" in _llvm(spec) or "expf" in _llvm(spec), "the spec itself calls libm exp"


@pytest.mark.parametrize("name", list(EXP_KERNELS))
def test_compiled_exp_relative_error_on_dense_grid(name):
    kernel = EXP_KERNELS[name]
    x = exp_grid()
    assert x.size > 2_500_000
    out = np.empty_like(x)
    kernel(x, out)
    assert out.dtype == np.float32
    truth = np.exp(x.astype(np.float64))
    rel = np.abs(out.astype(np.float64) - truth) / truth
    worst = int(np.argmax(rel))
    assert rel[worst] <= EXP_REL_BOUND, \
        f"x={x[worst]!r}: got {out[worst]!r}, exp={truth[worst]!r}, rel {rel[worst]:.3g}"


@pytest.mark.parametrize("name", list(EXP_KERNELS))
def test_compiled_exp_edge_cases(name):
    kernel = EXP_KERNELS[name]
    x = np.float32([0.0, -0.0, -87.0, -87.5, -88.0, -100.0, -1e30, -np.inf])
    out = np.empty_like(x)
    kernel(x, out)
    assert out[0] == 1.0 and out[1] == 1.0
    assert abs(float(out[2]) - math.exp(-87.0)) <= EXP_REL_BOUND * math.exp(-87.0)
    assert np.all(out[3:] == 0.0), "x < -87 (including -inf) gives 0"
    assert not np.any(np.signbit(out[3:]))


def test_spec_exp_in_python_is_float32_exp():
    for v in (0.0, -1.0, -10.5, -87.0, -87.5):
        got = exp_f32(np.float32(v))
        assert isinstance(got, np.float32)
        assert got == np.float32(math.exp(float(np.float32(v))))
    assert exp_f32(np.float32(-np.inf)) == 0.0


def test_compiled_exp_propagates_nan():
    """The spec's math.exp gives NaN for NaN; the compiled polynomial must too (under the attention fast-math)."""
    for fastmath in (False, ATTENTION_FASTMATH):
        kernel = _exp_kernel(fastmath)
        out = np.empty(3, np.float32)
        kernel(np.array([np.nan, -np.inf, -1.0], np.float32), out)
        assert np.isnan(out[0])
        assert out[1] == 0.0
        assert abs(out[2] - np.float32(np.exp(-1.0))) < 1e-7
