"""IEEE half precision (fp16) as uint16 bit patterns: the spec of the conversions.

Numba has no float16 type on the CPU, so kvref stores fp16 K/V as ``uint16`` bit patterns (``a.view(np.uint16)``,
zero-copy) and converts with these functions. They are bit-exact with NumPy's ``astype`` in both directions
(round to nearest, ties to even; NaN -> 0x7E00), which the tests check over all 65,536 patterns and >1M floats.

fp16 layout: 1 sign bit | 5 exponent bits (bias 15) | 10 mantissa bits

    exponent 0      : subnormal, value = mantissa * 2**-24
    exponent 1..30  : normal,    value = (1 + mantissa / 1024) * 2**(exponent - 15)
    exponent 31     : inf (mantissa 0) or NaN

The compiled CPU backend replaces :func:`f16_bits_to_f32` with one hardware instruction (``vcvtph2ps``, see
``kvref/cpu/fast_math.py``); a test proves the two identical on every bit pattern.
"""

import math

import numpy as np
from numba.extending import register_jitable


@register_jitable
def round_half_even(y):
    """Round a float64 to the nearest integer, ties to even (what IEEE conversions do). Returns a float."""
    r = math.floor(y)
    diff = y - r
    if diff > 0.5 or (diff == 0.5 and r % 2.0 == 1.0):
        r += 1.0
    return r


@register_jitable
def f16_bits_to_f32(bits):
    """Widen one fp16 bit pattern (uint16) to float32. Exact: every fp16 value is a float32 value."""
    h = int(bits)
    sign = -1.0 if (h >> 15) & 1 else 1.0
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0:  # zero or subnormal
        value = sign * math.ldexp(float(mantissa), -24)
    elif exponent == 31:  # inf or NaN
        value = sign * math.inf if mantissa == 0 else math.nan
    else:
        value = sign * math.ldexp(float(mantissa + 1024), exponent - 25)
    return np.float32(value)


@register_jitable
def f32_to_f16_bits(x):
    """Narrow one float32 to an fp16 bit pattern (uint16), round to nearest even, overflow to inf, NaN -> 0x7E00."""
    v = float(x)  # float32 -> float64 is exact, so every step below is exact until the one rounding
    if math.isnan(v):
        return np.uint16(0x7E00)
    sign = 0x8000 if math.copysign(1.0, v) < 0.0 else 0
    a = math.fabs(v)
    if a >= 65520.0:  # halfway between 65504 (largest fp16) and 65536 or beyond: rounds to inf
        return np.uint16(sign | 0x7C00)
    if a < 6.103515625e-05:  # below 2**-14, the smallest normal: subnormal steps of 2**-24
        # 1024 steps round up to bit pattern 0x0400, which is exactly the smallest normal
        return np.uint16(sign | int(round_half_even(a * 16777216.0)))
    mant, exp2 = math.frexp(a)  # a = mant * 2**exp2, mant in [0.5, 1)
    e = exp2 - 1  # a = 1.f * 2**e
    r = int(round_half_even(math.ldexp(a, 10 - e)))  # 11 significant bits, in [1024, 2048]
    if r == 2048:  # rounding carried into the next binade
        r = 1024
        e += 1
    return np.uint16(sign | ((e + 15) << 10) | (r - 1024))


def widen(x):
    """A stored element as float32: fp16 bit patterns (uint16) are converted, float32 passes through.

    This is the one place where kvref reads a stored element, so every kernel handles both storage dtypes.
    Compiled code dispatches on the element type at compile time (the overload below).
    """
    if isinstance(x, np.uint16):
        return f16_bits_to_f32(x)
    return np.float32(x)


def _install_widen_overload():
    from numba.core import types
    from numba.extending import overload

    @overload(widen, target="generic")
    def _widen(x):
        if isinstance(x, types.Integer) and x.bitwidth == 16:
            return lambda x: f16_bits_to_f32(x)
        return lambda x: np.float32(x)


_install_widen_overload()


def to_bits(a):
    """float16 array -> its uint16 bit patterns (zero-copy view)."""
    return np.asarray(a, dtype=np.float16).view(np.uint16)


def from_bits(bits):
    """uint16 bit patterns -> float16 array (zero-copy view)."""
    return np.asarray(bits, dtype=np.uint16).view(np.float16)
