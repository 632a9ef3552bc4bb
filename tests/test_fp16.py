"""kvref.fp16: the fp16 <-> float32 conversion spec, bit for bit against NumPy's ``astype``.

* f16_bits_to_f32: all 65,536 bit patterns, as plain Python and through numba.njit of the spec.
* f32_to_f16_bits: as plain Python over ~250k chosen values (every fp16 value, every tie between neighbours and
  the float32 values on either side of it, subnormals, the overflow boundary, signed zeros, inf, NaN) and through
  numba.njit over those plus >1M random float32 values.

NaN: NumPy keeps the sign and part of the payload; kvref documents that NaN -> 0x7E00 when narrowing and "NaN stays
NaN" when widening. Everything that is not NaN must be bit-identical.
"""

import numpy as np
import numba
import pytest

import kvref.fp16 as fp16

ALL_BITS = np.arange(65536, dtype=np.uint32).astype(np.uint16)


def numpy_widen_bits(bits):
    """float32 bit patterns of fp16 bit patterns, by NumPy."""
    return bits.view(np.float16).astype(np.float32).view(np.uint32)


def numpy_narrow_bits(x):
    """fp16 bit patterns of float32 values, by NumPy (round to nearest even, overflow to inf)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)


def is_f16_nan(bits):
    bits = np.asarray(bits, dtype=np.uint16)
    return ((bits & 0x7C00) == 0x7C00) & ((bits & 0x03FF) != 0)


def f32(v):
    return np.float32(v)


def special_values():
    """Hand-picked float32 values at every boundary of the fp16 format."""
    vals = [0.0, -0.0, np.inf, -np.inf,
            65504.0, -65504.0,  # largest fp16
            65519.99609375, 65520.0, 65520.00390625, -65520.0, 65536.0, 1e6, 3.4028235e38, -3.4028235e38,
            2.0**-14, 2.0**-14 * (1 - 2**-11), 2.0**-14 * (1 - 2**-12),  # smallest normal and just below
            2.0**-24, 2.0**-25, 2.0**-26, 1.5 * 2**-24, 2.5 * 2**-24, 3.5 * 2**-24,  # subnormal ties
            1023.5 * 2**-24, 1023.25 * 2**-24, 1023.75 * 2**-24,  # ties at the subnormal/normal seam
            1.0 + 2**-11, 1.0 + 3 * 2**-11, 1.0 - 2**-12, 2048.0 + 1.0, 2048.0 + 3.0,  # ties between normals
            1e-45, -1e-45, 1.1754944e-38, 1e-8, -1e-8]
    out = [f32(v) for v in vals]
    for v in (65520.0, 2.0**-25, 2.0**-14, 1.0 + 2**-11, 1.5 * 2**-24):
        for direction in (-np.inf, np.inf):
            out.append(np.nextafter(f32(v), f32(direction)))
            out.append(-np.nextafter(f32(v), f32(direction)))
    return np.array(out, dtype=np.float32)


def tie_values():
    """Every float32 exactly halfway between two neighbouring finite fp16 values, and one float32 ulp either side.

    A midpoint needs 12 significant bits, so it is exact in float32; NumPy decides the rounding (ties to even).
    """
    finite = ALL_BITS[(ALL_BITS & 0x7C00) != 0x7C00].view(np.float16).astype(np.float64)
    positive = np.unique(finite[finite >= 0])  # 0, subnormals, normals up to 65504
    mids = ((positive[:-1] + positive[1:]) / 2).astype(np.float32)
    assert np.array_equal(mids.astype(np.float64), (positive[:-1] + positive[1:]) / 2), "midpoints are exact"
    below = np.nextafter(mids, np.float32(-np.inf))
    above = np.nextafter(mids, np.float32(np.inf))
    ties = np.concatenate([mids, below, above, np.float32([65520.0])])
    return np.concatenate([ties, -ties])


def nan_values():
    patterns = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FFFFFFF, 0x7F802000,
                         0x7FC00001], dtype=np.uint32)
    return patterns.view(np.float32)


def random_values(rng, n):
    """n float32 values whose exponents span fp16's whole range and beyond (2**-27 .. 2**17), random mantissas,
    plus n // 4 values from completely random bit patterns."""
    sign = rng.integers(0, 2, n, dtype=np.uint32) << 31
    exponent = rng.integers(127 - 27, 127 + 18, n, dtype=np.uint32) << 23
    mantissa = rng.integers(0, 1 << 23, n, dtype=np.uint32)
    structured = (sign | exponent | mantissa).view(np.float32)
    raw = rng.integers(0, 2**32, n // 4, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([structured, raw])


def python_values(rng):
    widened = ALL_BITS.view(np.float16).astype(np.float32)
    return np.concatenate([special_values(), widened, tie_values(), random_values(rng, 20_000)])


def check_narrowed(x, got):
    """got: kvref's fp16 bits of x. Equal to NumPy's everywhere except NaN inputs, which must give 0x7E00."""
    x = np.asarray(x, dtype=np.float32)
    got = np.asarray(got, dtype=np.uint16)
    expected = numpy_narrow_bits(x)
    nan = np.isnan(x)
    assert np.all(is_f16_nan(expected[nan]))
    assert np.all(got[nan] == 0x7E00), "NaN narrows to 0x7E00 (documented)"
    bad = np.flatnonzero((got != expected) & ~nan)
    assert bad.size == 0, (f"{bad.size} mismatches, first: x={x[bad[:5]]!r} "
                           f"kvref={[hex(b) for b in got[bad[:5]]]} numpy={[hex(b) for b in expected[bad[:5]]]}")


def check_widened(got_f32):
    """got_f32: kvref's float32 of every fp16 pattern, in order. Bit-identical to NumPy except NaN stays NaN."""
    got_f32 = np.asarray(got_f32, dtype=np.float32)
    assert got_f32.shape == (65536,)
    nan = is_f16_nan(ALL_BITS)
    assert nan.sum() == 2 * 1023
    assert np.all(np.isnan(got_f32[nan]))
    expected = numpy_widen_bits(ALL_BITS)
    bad = np.flatnonzero((got_f32.view(np.uint32) != expected) & ~nan)
    assert bad.size == 0, f"{bad.size} mismatches, first patterns {[hex(b) for b in ALL_BITS[bad[:5]]]}"


# ---------------------------------------------------------------------------------------------------------------
# The plain-Python spec
# ---------------------------------------------------------------------------------------------------------------
def test_f16_bits_to_f32_python_all_patterns():
    got = np.empty(65536, dtype=np.float32)
    for i, b in enumerate(ALL_BITS):
        value = fp16.f16_bits_to_f32(b)
        assert isinstance(value, np.float32)
        got[i] = value
    check_widened(got)


def test_f32_to_f16_bits_python(rng):
    x = python_values(rng)
    x = np.concatenate([x, nan_values()])
    assert x.size > 200_000
    got = np.empty(x.size, dtype=np.uint16)
    for i, v in enumerate(x):
        got[i] = fp16.f32_to_f16_bits(v)
    check_narrowed(x, got)


def test_f32_to_f16_bits_python_known_patterns():
    """A few patterns written out from the IEEE 754 binary16 definition, independent of NumPy."""
    # (float32 value, its fp16 pattern, whether the value is itself an fp16 value)
    cases = [(1.0, 0x3C00, True), (-2.0, 0xC000, True), (65504.0, 0x7BFF, True), (65520.0, 0x7C00, False),
             (2.0**-24, 0x0001, True), (2.0**-25, 0x0000, False), (2.0**-14, 0x0400, True),
             (1.0 + 2**-11, 0x3C00, False), (1.0 + 3 * 2**-11, 0x3C02, False), (-0.0, 0x8000, True),
             (np.inf, 0x7C00, True), (-np.inf, 0xFC00, True), (1.5 * 2**-24, 0x0002, False),
             (2.5 * 2**-24, 0x0002, False), (0.333251953125, 0x3555, True)]
    for value, bits, exact in cases:
        assert fp16.f32_to_f16_bits(np.float32(value)) == bits, value
        if exact:
            widened = fp16.f16_bits_to_f32(np.uint16(bits))
            assert widened == np.float32(value) and np.signbit(widened) == np.signbit(value), value


def test_round_half_even_python_and_njit(rng):
    x = np.concatenate([np.arange(-20, 20, 0.25), rng.normal(0, 1e3, 5000), [0.5, 1.5, 2.5, -0.5, -2.5, 1e15 + 0.5]])
    expected = np.rint(x)  # IEEE round half to even
    got = np.array([fp16.round_half_even(float(v)) for v in x])
    assert np.array_equal(got, expected)
    compiled = numba.njit(fp16.round_half_even)
    got_njit = np.array([compiled(float(v)) for v in x])
    assert np.array_equal(got_njit, expected)


def test_widen_python_dispatches_on_storage_type():
    assert fp16.widen(np.uint16(0x3C00)) == np.float32(1.0)
    assert fp16.widen(np.uint16(0xC100)) == np.float32(-2.5)
    assert isinstance(fp16.widen(np.float32(0.1)), np.float32)
    assert fp16.widen(np.float32(0.1)) == np.float32(0.1)


def test_to_bits_from_bits_are_numpy_views(rng):
    a = rng.normal(size=(3, 5)).astype(np.float16)
    bits = fp16.to_bits(a)
    assert bits.dtype == np.uint16 and bits.shape == a.shape
    assert np.array_equal(bits, a.view(np.uint16))
    assert np.shares_memory(bits, a), "zero-copy"
    back = fp16.from_bits(bits)
    assert back.dtype == np.float16 and np.array_equal(back.view(np.uint16), a.view(np.uint16))


# ---------------------------------------------------------------------------------------------------------------
# The same spec compiled with numba.njit
# ---------------------------------------------------------------------------------------------------------------
spec_widen_njit = numba.njit(fp16.f16_bits_to_f32)
spec_narrow_njit = numba.njit(fp16.f32_to_f16_bits)


@numba.njit
def _widen_all(bits, out):
    for i in range(bits.size):
        out[i] = spec_widen_njit(bits[i])


@numba.njit
def _narrow_all(x, out):
    for i in range(x.size):
        out[i] = spec_narrow_njit(x[i])


@numba.njit
def _narrow_all_global(x, out):
    """Calls the spec by its global name, as the kernels do (the generic overload register_jitable made)."""
    for i in range(x.size):
        out[i] = fp16.f32_to_f16_bits(x[i])


def test_f16_bits_to_f32_njit_spec_all_patterns():
    out = np.empty(65536, dtype=np.float32)
    _widen_all(ALL_BITS, out)
    check_widened(out)


@pytest.mark.parametrize("kernel", [_narrow_all, _narrow_all_global], ids=["njit_spec", "global_name"])
def test_f32_to_f16_bits_njit_over_a_million_values(rng, kernel):
    x = np.concatenate([python_values(rng), nan_values(), random_values(rng, 1_000_000)])
    assert x.size > 1_000_000
    out = np.empty(x.size, dtype=np.uint16)
    kernel(x, out)
    check_narrowed(x, out)


def test_round_trip_every_fp16_value_njit():
    """Widening then narrowing returns every non-NaN pattern unchanged (fp16 values are exact in float32)."""
    wide = np.empty(65536, dtype=np.float32)
    _widen_all(ALL_BITS, wide)
    back = np.empty(65536, dtype=np.uint16)
    _narrow_all(wide, back)
    nan = is_f16_nan(ALL_BITS)
    assert np.array_equal(back[~nan], ALL_BITS[~nan])
    assert np.all(back[nan] == 0x7E00)
