"""kvref/cpu/fast_math.py: the compiled-CPU forms of spec primitives, against the spec and independent sources.

* ``f16_bits_to_f32`` compiled (LLVM ``fpext half -> float``) is bit-identical to the spec and to NumPy on all 65,536
  patterns; NaN stays NaN.
* ``f32_to_f16_bits`` compiled (LLVM ``fptrunc``) equals NumPy on every fp16 value, every tie and its neighbours and
  NaN, and the spec on every 251st float32 bit pattern (17 million).
* ``exp_f32`` compiled (range reduction + polynomial) is within 2e-7 relative of float64 ``exp`` on a dense grid of
  [-87, 0]; below -87 (and -inf) it is 0.
* ``quant.roundf`` compiled (``llvm.round.f32``) equals the spec on all 2**32 float32 bit patterns.
* ``quant.abs_max`` / ``signed_max`` / ``min_max`` compiled (one 32-lane vector reduction each) equal the spec bit for
  bit on adversarial blocks (signed-zero ties, +a/-a ties in both orders, NaN and inf in every lane, subnormals) and
  on a million random blocks; non-contiguous blocks keep the spec's loop.

``kvref.cpu`` is imported first: importing it registers the overloads, and the LLVM IR checks below prove that the
compiled functions really use them (otherwise the comparisons would only test the spec against itself). The spec side
of each comparison is the plain-Python function, or ``numba.njit`` of the spec function itself, which compiles its
own body and so involves no overload.
"""

import math

import numpy as np
import numba
import pytest

import kvref.cpu  # noqa: F401  (registers the CPU overloads before anything below compiles)
from kvref import quant
from kvref.attention import exp_f32
from kvref.cpu import ATTENTION_FASTMATH
from kvref.cpu.fast_math import _int_bits_to_float
from kvref.fp16 import f16_bits_to_f32, f32_to_f16_bits, widen

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


# ---------------------------------------------------------------------------------------------------------------
# fp16 narrowing (f32_to_f16_bits)
# ---------------------------------------------------------------------------------------------------------------
@numba.njit
def _narrow_compiled(x, out):
    for i in range(x.size):
        out[i] = f32_to_f16_bits(x[i])  # resolved through the CPU overload (fptrunc)


_narrow_spec = numba.njit(f32_to_f16_bits)  # the spec's own body, compiled (no overload involved)


@numba.njit
def _narrow_sweep(stride, offset):
    """Compare overload and spec on every stride-th float32 bit pattern: (compared, mismatches, first bad)."""
    n = 0
    bad = 0
    first = np.int64(-1)
    for i in range(offset, 1 << 32, stride):
        v = _int_bits_to_float(np.uint32(i))
        if f32_to_f16_bits(v) != _narrow_spec(v):
            bad += 1
            if first < 0:
                first = i
        n += 1
    return n, bad, first


def test_compiled_f16_narrowing_uses_the_hardware_conversion():
    _narrow_compiled(np.float32([1.0]), np.empty(1, np.uint16))
    assert "fptrunc float" in _llvm(_narrow_compiled)


def test_compiled_f16_narrowing_equals_spec_and_numpy(rng):
    """Every fp16 value, every tie between fp16 neighbours and one ulp either side, NaNs, and every 251st float32
    bit pattern (17 million, all exponents), against the spec; the chosen values also against NumPy."""
    from test_fp16 import check_narrowed, nan_values, python_values  # tests/ is on sys.path (conftest.py)

    x = np.concatenate([python_values(rng), nan_values()])
    out = np.empty(x.size, np.uint16)
    _narrow_compiled(x, out)
    check_narrowed(x, out)
    n, bad, first = _narrow_sweep(251, int(rng.integers(0, 251)))
    assert n > 17_000_000 and bad == 0, f"{bad} mismatches, first at bit pattern {first:#010x}"


# ---------------------------------------------------------------------------------------------------------------
# The quantizers' primitives (kvref/quant.py): roundf and the block reductions
# ---------------------------------------------------------------------------------------------------------------
_roundf_spec = numba.njit(quant.roundf)  # the spec's own body (float64 copysign/floor), compiled


@numba.njit
def _roundf_mismatches(lo, hi):
    """How many float32 bit patterns in lo..hi-1 give different results from roundf's CPU overload and its spec (a
    branch-free count, so that LLVM vectorises the sweep)."""
    bad = 0
    for i in range(lo, hi):
        v = _int_bits_to_float(np.uint32(i))
        a = _roundf_spec(v)
        b = quant.roundf(v)  # the overload: llvm.round.f32
        same = (a == b and math.copysign(1.0, a) == math.copysign(1.0, b)) or (a != a and b != b)
        bad += not same
    return bad


def _first_roundf_mismatch(lo, hi):
    """Bisect to the first mismatching pattern, for the failure message."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _roundf_mismatches(lo, mid) else (mid, hi)
    return lo


def test_compiled_roundf_uses_llvm_round():
    @numba.njit
    def f(v):
        return quant.roundf(v)

    f(np.float32(0.5))
    assert "llvm.round.f32" in _llvm(f)
    _roundf_spec(np.float32(0.5))
    assert "llvm.round" not in _llvm(_roundf_spec), "the spec itself is copysign(floor(|v| + 0.5), v)"


def test_compiled_roundf_equals_spec_on_every_float32():
    """All 2**32 float32 bit patterns: every tie k + 1/2, signed zeros, subnormals, huge values, inf, NaN."""
    bad = _roundf_mismatches(0, 1 << 32)
    assert bad == 0, f"{bad} mismatches, first at bit pattern {_first_roundf_mismatch(0, 1 << 32):#010x}"


def test_roundf_sweep_can_fail():
    """The comparison above is not vacuous: a round-half-even stand-in for the overload differs at the ties."""
    @numba.njit
    def count_half_even_differences(lo, hi):
        n = 0
        for i in range(lo, hi):
            v = _int_bits_to_float(np.uint32(i))
            if np.rint(np.float64(v)) != _roundf_spec(v):
                n += 1
        return n

    one_half, two_and_a_half = 0x3F000000, 0x40200000  # 0.5 and 2.5: round-half-even gives 0 and 2
    assert count_half_even_differences(one_half, one_half + 1) == 1
    assert count_half_even_differences(two_and_a_half, two_and_a_half + 1) == 1
    assert _roundf_spec(np.float32(-2.5)) == -3.0 and _roundf_spec(np.float32(0.49999997)) == 0.0


def _block_values(rng):
    """Adversarial 32-float blocks for the reductions: signed zeros in every arrangement, ties between +a and -a
    (both orders), repeated extremes, NaN and inf in each lane, subnormals, float32 extremes; then random blocks."""
    B = quant.BLOCK
    nan, inf = np.float32(np.nan), np.float32(np.inf)
    blocks = [np.zeros(B), -np.zeros(B), np.full(B, nan), np.full(B, inf), np.full(B, -inf),
              np.full(B, 3.0), np.full(B, -3.0)]
    for j in range(B):
        for fill, special in ((0.0, -0.0), (-0.0, 0.0), (1.0, nan), (1.0, -nan), (-1.0, inf), (1.0, -inf),
                              (0.0, 5.0), (0.0, -5.0), (nan, 2.0), (0.0, nan), (2.0, -2.0), (-2.0, 2.0),
                              (1e-45, -1e-45), (3.4028235e38, -3.4028235e38)):
            b = np.full(B, fill)
            b[j] = special
            blocks.append(b)
        for k in range(j + 1, B, 7):  # +a and -a as the only extremes, in both orders
            b = rng.uniform(-1, 1, B)
            b[j], b[k] = 4.0, -4.0
            blocks.append(b)
            blocks.append(-b)
            b = rng.choice([0.0, -0.0, 1.0, -1.0], B)  # many ties and signed zeros
            blocks.append(b)
    random = rng.standard_normal((2000, B)) * np.exp(rng.uniform(-100, 80, (2000, 1)))
    bits = rng.integers(0, 2**32, (2000, B), dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([np.array(blocks, dtype=np.float32), random.astype(np.float32), bits])
    return np.ascontiguousarray(x)


@numba.njit
def _reduce_blocks_compiled(x, amax, smax, low, high):
    for b in range(x.shape[0]):
        block = x[b]  # a C-contiguous 1-D block: the CPU overloads apply
        amax[b] = quant.abs_max(block)
        smax[b] = quant.signed_max(block)
        low[b], high[b] = quant.min_max(block)


def _reduce_blocks_python(x):
    out = np.empty((4, x.shape[0]), np.float32)
    for b in range(x.shape[0]):
        out[0, b] = quant.abs_max(x[b])
        out[1, b] = quant.signed_max(x[b])
        out[2, b], out[3, b] = quant.min_max(x[b])
    return out


def test_compiled_block_reductions_use_vector_reductions():
    x = np.zeros((1, quant.BLOCK), np.float32)
    _reduce_blocks_compiled(x, *np.empty((4, 1), np.float32))
    ir = _llvm(_reduce_blocks_compiled)
    assert "load <32 x float>" in ir, "one 32-lane load per block (LLVM may rewrite the reduce into maxnum shuffles)"
    assert "llvm.cttz.i32" in ir, "first-of-ties lookup"


def test_compiled_block_reductions_equal_the_spec_bit_for_bit(rng):
    """Overload vs the plain-Python spec, float32 bits compared (NaN bits too, signed zeros too)."""
    x = _block_values(rng)
    assert x.shape[0] > 4_000
    got = np.empty((4, x.shape[0]), np.float32)
    _reduce_blocks_compiled(x, *got)
    expected = _reduce_blocks_python(x)
    for name, g, e in zip(("abs_max", "signed_max", "min", "max"), got, expected):
        bad = np.flatnonzero(g.view(np.uint32) != e.view(np.uint32))
        assert bad.size == 0, f"{name}: block {x[bad[0]]!r}: compiled {g[bad[0]]!r}, spec {e[bad[0]]!r}"


def test_compiled_block_reductions_equal_the_spec_on_many_random_blocks(rng):
    """A million random blocks against the spec's own loops compiled (numba.njit of the spec body: no overload)."""
    spec_abs_max, spec_signed_max, spec_min_max = (numba.njit(f) for f in
                                                   (quant.abs_max, quant.signed_max, quant.min_max))

    @numba.njit
    def spec_all(x, amax, smax, low, high):
        for b in range(x.shape[0]):
            amax[b] = spec_abs_max(x[b])
            smax[b] = spec_signed_max(x[b])
            low[b], high[b] = spec_min_max(x[b])

    n = 1 << 20
    x = rng.standard_normal((n, quant.BLOCK)).astype(np.float32)
    x[: n // 4] = np.round(x[: n // 4])  # many exact ties and zeros (np.round keeps -0.0)
    got = np.empty((4, n), np.float32)
    expected = np.empty((4, n), np.float32)
    _reduce_blocks_compiled(x, *got)
    spec_all(x, *expected)
    assert "<32 x float>" not in _llvm(spec_all), "the reference really is the spec's loop"
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_non_contiguous_blocks_keep_the_spec():
    @numba.njit
    def strided(x):
        return quant.abs_max(x[::2]), quant.signed_max(x[::2]), quant.min_max(x[::2])

    x = np.arange(64, dtype=np.float32) - 40
    assert strided(x) == (quant.abs_max(x[::2]), quant.signed_max(x[::2]), quant.min_max(x[::2]))
    assert "<32 x float>" not in _llvm(strided)
