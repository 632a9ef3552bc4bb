"""kvref.quant: ggml's block formats, byte for byte against the ``gguf`` package and by ggml's own test metric.

The oracle is ``gguf.quants`` (gguf-py, the NumPy port of ggml's reference quantizers), which this file imports and
calls; nothing here is derived from kvref's spec. Every test runs the "python" backend (the spec as plain Python)
and the "cpu" backend (the spec compiled by Numba, with the CPU overloads of ``kvref/cpu/fast_math.py``); the "cuda"
backend runs the same checks in ``tests_cuda/test_cuda_quant.py``.

* bytes equal ``gguf.quants.quantize`` on random data of several shapes (1-D to 4-D) and dynamic ranges, and on
  adversarial blocks: exact rounding ties, all-zero blocks, negative zeros, fp16-subnormal scales, scales whose
  reciprocal overflows, the q4_0 clamp, first-of-ties for the signed extreme, scales near fp16's largest value;
* a Hypothesis property: random float32 blocks with special magnitudes give gguf's bytes;
* ``dequantize`` equals ``gguf.quants.dequantize`` bit for bit (float32), also on random bytes;
* error bounds per format (``../shared/reference/quant_and_ring_facts.md`` §4 and §6);
* llama.cpp's ``tests/test-quantize-fns.cpp``, ported as is (see :func:`array_rmse` for its sqrt(n) quirk);
* NaN/inf, wrong dtypes and shapes, unknown formats: the named errors;
* the format table against independent arithmetic and ``gguf.constants.GGML_QUANT_SIZES``.

Where kvref and gguf legitimately differ, the test says so and checks kvref against ggml's C reference instead:
a scale whose reciprocal overflows float32 (kvref: ``id = 0``; ggml multiplies by inf, undefined), and signed-zero
ties (kvref follows ggml's C loops; gguf's NumPy reductions pick a zero by SIMD lane order). See ``kvref/quant.py``.
"""

import math

import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvref import quant
from kvref.errors import BackendUnavailableError, DTypeError, KVCacheError, NonFiniteError, ShapeError

FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
BACKENDS = ("python", "cpu")
B = 32
SYMMETRIC = {"q8_0", "q4_0", "q5_0"}
#: the code of 0.0 in each symmetric format, and the largest code of each 4-/5-bit format
ZERO_CODE = {"q8_0": 0, "q4_0": 8, "q5_0": 16, "q4_1": 0, "q5_1": 0}
LEVELS = {"q4_0": 15, "q4_1": 15, "q5_0": 31, "q5_1": 31}
INVERSE_LIMIT = 2.0 ** -128  # 1/d overflows float32 iff |d| <= 2**-128 (checked in test_inverse_limit)


def qtype(fmt):
    return GGMLQuantizationType[fmt.upper()]


def gguf_quantize(x, fmt):
    with np.errstate(all="ignore"):  # gguf divides by zero-or-tiny d and casts inf for the overflow blocks
        return gq.quantize(np.ascontiguousarray(x, dtype=np.float32), qtype(fmt))


def gguf_dequantize(blocks, fmt):
    with np.errstate(all="ignore"):
        return gq.dequantize(blocks, qtype(fmt))


def assert_bytes_equal(got, expected, x, fmt, what=""):
    assert got.dtype == np.uint8 and got.shape == expected.shape, (got.shape, expected.shape)
    if not np.array_equal(got, expected):
        flat_got, flat_exp = got.reshape(-1, got.shape[-1]), expected.reshape(-1, got.shape[-1])
        r, c = np.argwhere(flat_got != flat_exp)[0]
        block = c // quant.FORMATS[fmt][1]
        xs = x.reshape(-1, x.shape[-1])[r, block * B:(block + 1) * B]
        raise AssertionError(f"{fmt} {what}: row {r} block {block} byte {c % quant.FORMATS[fmt][1]}: kvref "
                             f"{flat_got[r, c]} gguf {flat_exp[r, c]}; block {xs!r}")


def assert_f32_bits_equal(got, expected, nan_ok=False):
    got = np.asarray(got, np.float32)
    expected = np.asarray(expected, np.float32).reshape(got.shape)
    same = got.view(np.uint32) == expected.view(np.uint32)
    if nan_ok:
        same |= np.isnan(got) & np.isnan(expected)
    bad = np.flatnonzero(~same)
    assert bad.size == 0, f"{bad.size} differ, first at {bad[0]}: {got.flat[bad[0]]!r} vs {expected.flat[bad[0]]!r}"


def fp16(v):
    """float32 -> nearest fp16 -> float32 (NumPy), elementwise."""
    with np.errstate(over="ignore"):
        return np.asarray(v, np.float32).astype(np.float16).astype(np.float32)


def f16_bits(v):
    return int(np.float16(np.float32(v)).view(np.uint16))


def split_blocks(blocks, fmt):
    """Independent decoder of the block layout (ggml-common.h): d, m, codes of every block; codes as stored
    (0..255 for q8_0's int8 bytes read as int8; 0..15 / 0..31 for the others)."""
    nbytes = quant.FORMATS[fmt][1]
    raw = np.ascontiguousarray(blocks).reshape(-1, nbytes)
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    if fmt == "q8_0":
        return d, np.zeros_like(d), raw[:, 2:34].view(np.int8).astype(np.int64)
    m = raw[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0] if fmt.endswith("_1") else np.zeros_like(d)
    qs = raw[:, nbytes - 16:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int64)  # element j low nibble, j + 16 high
    if fmt.startswith("q5"):
        qh = raw[:, nbytes - 20:nbytes - 16].copy().view("<u4")[:, 0].astype(np.int64)
        codes |= ((qh[:, None] >> np.arange(B)) & 1) << 4
    return d, m, codes


def random_rows(rng, shape):
    """float32 data of the given shape: per row a random distribution (normal, uniform, heavy-tailed, one-signed)
    and a random scale 10**[-6, 6]."""
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    n = shape[-1]
    out = np.empty((rows, n), np.float64)
    for r in range(rows):
        kind = r % 5
        if kind == 0:
            v = rng.standard_normal(n)
        elif kind == 1:
            v = rng.uniform(-1, 1, n)
        elif kind == 2:
            v = rng.standard_t(2, n)
        elif kind == 3:
            v = rng.uniform(0, 1, n)  # all positive: q4_1's min > 0
        else:
            v = -rng.exponential(1, n)  # all negative
        out[r] = v * 10.0 ** rng.uniform(-6, 6)
    return out.astype(np.float32).reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# The format table
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_format_table_against_arithmetic_and_gguf(fmt):
    bits = 8 if fmt == "q8_0" else (4 if fmt.startswith("q4") else 5)
    scales = 2 if fmt.endswith("_1") else 1  # d, and m for the affine formats: fp16 each
    expected_bytes = 2 * scales + B * bits // 8  # the 5th bits of q5 are the 4 bytes of qh: 32 * 5 / 8 = 16 + 4
    assert quant.FORMATS[fmt] == (B, expected_bytes, expected_bytes * 8 / B)
    assert GGML_QUANT_SIZES[qtype(fmt)] == (B, expected_bytes)
    assert quant.GGML_TYPES[fmt] == int(qtype(fmt)) == quant.format_id(fmt)
    m_at, qh_at, qs_at, nbytes = quant.layout(quant.GGML_TYPES[fmt])
    assert nbytes == expected_bytes
    assert (m_at >= 0) == fmt.endswith("_1") and (qh_at >= 0) == fmt.startswith("q5")
    assert qs_at + (32 if fmt == "q8_0" else 16) == nbytes, "qs is last"
    assert quant.row_bytes(128, fmt) == 4 * expected_bytes
    assert quant.BLOCK == B


# ---------------------------------------------------------------------------------------------------------------
# Bytes: random data
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf * 0 where a heavy tail overflows fp16(d)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(32,), (3, 64), (2, 3, 96), (2, 1, 2, 128)], ids=lambda s: "x".join(map(str, s)))
def test_bytes_equal_gguf_random(rng, fmt, backend, shape):
    x = random_rows(rng, shape)
    got = quant.quantize(x, fmt, backend=backend)
    expected = gguf_quantize(x, fmt)
    assert got.shape == shape[:-1] + (shape[-1] // B * quant.FORMATS[fmt][1],)
    assert_bytes_equal(got, expected, x, fmt)
    back = quant.dequantize(got, fmt, shape, backend=backend)
    assert back.shape == shape and back.dtype == np.float32
    assert_f32_bits_equal(back, gguf_dequantize(expected, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_equal_gguf_many_blocks_cpu(rng, fmt):
    """25,000 rows of 4 blocks over scales 1e-30 .. 1e30, compiled backend."""
    x = random_rows(rng, (25_000, 128)) * np.float32(10.0) ** rng.integers(-24, 24, (25_000, 1)).astype(np.float32)
    assert_bytes_equal(quant.quantize(x, fmt), gguf_quantize(x, fmt), x, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_python_and_cpu_backends_agree_on_non_contiguous_input(rng, fmt):
    x = random_rows(rng, (6, 256))[::2, ::2]  # strided: quantize makes it contiguous first
    assert not x.flags.c_contiguous
    expected = gguf_quantize(x, fmt)
    for backend in BACKENDS:
        assert_bytes_equal(quant.quantize(x, fmt, backend=backend), expected, x, fmt, backend)


# ---------------------------------------------------------------------------------------------------------------
# Bytes: adversarial blocks
# ---------------------------------------------------------------------------------------------------------------
def check_blocks(blocks, fmt, what):
    """Quantize blocks (n, 32) with both backends; bytes must equal gguf's; returns the bytes."""
    x = np.ascontiguousarray(blocks, dtype=np.float32)
    expected = gguf_quantize(x, fmt)
    for backend in BACKENDS:
        assert_bytes_equal(quant.quantize(x, fmt, backend=backend), expected, x, fmt, f"{what} ({backend})")
    return expected


def tie_blocks(fmt):
    """Blocks whose products x_j * id land exactly on a rounding boundary, and the float32 neighbours of each.

    The extreme is chosen so that d = s = 2**e exactly (q8_0: amax = 127 s; q4_0 / q5_0: M = -8 s / -16 s; q4_1 /
    q5_1: min 0, max = levels * s), so id = 1/s and every product is exact:
    q8_0 x * id = k + 1/2 (roundf's ties, k = -127 .. 126); q4_0 / q5_0 x * id + half + 1/2 = n, an integer (the
    edge of trunc, n = 1 .. 2 half); q4_1 / q5_1 x * id + 1/2 = n (n = 1 .. levels)."""
    if fmt == "q8_0":
        head, targets = [127.0], np.arange(-127, 127) + 0.5
    elif fmt in ("q4_0", "q5_0"):
        half = 8 if fmt == "q4_0" else 16
        head, targets = [-float(half)], np.arange(1, 2 * half + 1) - half - 0.5
    else:
        head, targets = [float(LEVELS[fmt]), 0.0], np.arange(1, LEVELS[fmt] + 1) - 0.5
    targets = targets.astype(np.float32)
    blocks = []
    for values in (targets, np.nextafter(targets, np.float32(-np.inf)), np.nextafter(targets, np.float32(np.inf))):
        for start in range(0, len(values), B - len(head)):
            block = np.full(B, head[-1], np.float32)  # padding repeats a value that is already there
            block[:len(head)] = head
            chunk = values[start:start + B - len(head)]
            block[len(head):len(head) + len(chunk)] = chunk
            blocks.append(block)
    blocks = np.array(blocks, np.float32)
    return np.concatenate([blocks * np.float32(2.0 ** e) for e in (-20, -3, 0, 5, 12)])


@pytest.mark.parametrize("fmt", FORMATS)
def test_exact_rounding_ties(fmt):
    blocks = tie_blocks(fmt)
    got = check_blocks(blocks, fmt, "ties")
    d, m, codes = split_blocks(got, fmt)
    ratio = (blocks - m[:, None]) / d[:, None]
    assert np.all(d == np.repeat(np.float32(2.0) ** np.array([-20, -3, 0, 5, 12]), len(blocks) // 5))
    if fmt == "q8_0":  # roundf: halves away from zero, unlike np.round / Python round
        exact_half = (np.abs(ratio) % 1.0) == 0.5
        assert exact_half.sum() == 5 * 254
        away = np.sign(ratio) * np.floor(np.abs(ratio) + 0.5)
        assert np.array_equal(codes[exact_half], away[exact_half].astype(np.int64))
        assert not np.array_equal(codes[exact_half], np.round(ratio[exact_half]).astype(np.int64))


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_zero_blocks(fmt):
    """Blocks of +0.0: the scale is 0, id = 0 and every code is the code of 0.0 (q4_0 stores d = -0.0: 0 / -8)."""
    got = check_blocks(np.zeros((3, B), np.float32), fmt, "zeros")
    d, m, codes = split_blocks(got, fmt)
    assert np.all(d == 0) and np.all(m == 0) and np.all(codes == ZERO_CODE[fmt])
    expected_d_bits = 0x8000 if fmt in ("q4_0", "q5_0") else 0x0000
    assert np.all(got[:, 0] | (got[:, 1].astype(np.int64) << 8) == expected_d_bits)


@pytest.mark.parametrize("fmt", FORMATS)
def test_negative_zeros_inside_ordinary_blocks(rng, fmt):
    blocks = rng.standard_normal((64, B)).astype(np.float32)
    blocks[rng.random((64, B)) < 0.3] = -0.0
    blocks[::4] = np.abs(blocks[::4])  # all >= 0 except the -0.0s: q4_1's min is 0 (a -0.0 is never first here)
    blocks[::4, 0] = 1.0
    check_blocks(blocks, fmt, "negative zeros")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_signed_zero_blocks_follow_ggml_c(fmt, backend):
    """Blocks of zeros of both signs, where gguf's NumPy port and ggml's C differ; kvref follows the C loops:

    q4_0 / q5_0 (``amax = max = 0; if (amax < fabsf(v)) ...``): max stays +0.0, so d = +0.0 / -8 = -0.0 (0x8000)
    whatever the signs; gguf takes x[argmax |x|] = x[0], giving d = +0.0 when x[0] is -0.0.
    q4_1 / q5_1 (``if (v < min) min = v``): min and max are the *first* zero, so m = x[0]; d = (max - min) / levels
    is +0.0 (equal zeros subtract to +0.0). q8_0 has no sign to choose (amax >= +0.0)."""
    blocks = np.zeros((4, B), np.float32)
    blocks[0, 0] = -0.0  # -0.0 first, +0.0 after
    blocks[1] = -0.0  # all -0.0
    blocks[2, 5] = -0.0  # +0.0 first
    blocks[3] = -0.0
    blocks[3, 0] = 0.0
    got = quant.quantize(blocks, fmt, backend=backend)
    d_bits = got[:, 0] | (got[:, 1].astype(np.int64) << 8)
    d, m, codes = split_blocks(got, fmt)
    assert np.all(codes == ZERO_CODE[fmt])
    if fmt in ("q4_0", "q5_0"):
        assert np.all(d_bits == 0x8000)
    else:
        assert np.all(d_bits == 0x0000)
    if fmt.endswith("_1"):
        m_bits = got[:, 2] | (got[:, 3].astype(np.int64) << 8)
        assert list(m_bits) == [0x8000, 0x8000, 0x0000, 0x0000], "m is the first zero"
    # everything else is gguf's, and both decode to zeros
    expected = gguf_quantize(blocks, fmt)
    scale_bytes = 4 if fmt.endswith("_1") else 2
    assert np.array_equal(got[:, scale_bytes:], expected[:, scale_bytes:])
    assert np.all(quant.dequantize(got, fmt, blocks.shape, backend=backend) == 0)
    assert np.all(gguf_dequantize(expected, fmt) == 0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp16_subnormal_and_underflowing_scales(rng, fmt):
    """Scales in fp16's subnormal range (6e-8 .. 6e-5) and below it (stored as 0 while id = 1/d stays finite),
    and float32-subnormal inputs whose scale is still invertible."""
    blocks = []
    for amax in (1e-3, 5e-4, 1e-5, 3e-6, 1e-7, 1e-9, 1e-20, 1e-30, 1e-35):
        b = rng.uniform(-1, 1, (8, B))
        b[:, 3] = 1.0
        blocks.append(b * amax)
    x = np.concatenate(blocks).astype(np.float32)
    x[-8:, 10:20] = np.float32(1e-40)  # float32 subnormals in an invertible block
    got = check_blocks(x, fmt, "tiny scales")
    d, _, _ = split_blocks(got, fmt)
    assert np.any((d != 0) & (np.abs(d) < 6.1e-5)), "some scales are fp16 subnormals"
    assert np.any(d == 0), "some scales underflow to fp16 zero"


@pytest.mark.parametrize("fmt", FORMATS)
def test_inverse_overflow_policy(fmt):
    """0 < |d| <= 2**-128: 1/d overflows float32. ggml's C multiplies by inf and casts the result to an integer
    (undefined behaviour); gguf's NumPy gets inf * x = +-inf and 0 * inf = NaN and casts those to integers (NumPy
    warns 'invalid value encountered in cast' and returns whatever the platform's conversion gives, 0x80 bytes
    for q8_0 on x86, clipped junk for the nibble formats). kvref's policy is id = 0: the codes of an all-zero
    block. The stored scale is the same in all three (fp16(d) = 0: those blocks dequantize to zeros)."""
    if fmt == "q8_0":
        amax = 127 * 2.0 ** -128  # d = 2**-128 exactly
    elif fmt in ("q4_0", "q5_0"):
        amax = (8 if fmt == "q4_0" else 16) * 2.0 ** -128
    else:
        amax = LEVELS[fmt] * 2.0 ** -128  # range
    blocks = []
    for scale in (1.0, 0.5, 1e-3):
        for sign in (1.0, -1.0):
            b = np.linspace(-1, 1, B) * amax * scale
            b[0] = sign * amax * scale
            if fmt.endswith("_1"):
                b = np.linspace(0, 1, B) * amax * scale
            blocks.append(b)
    x = np.array(blocks, np.float32)
    for backend in BACKENDS:
        got = quant.quantize(x, fmt, backend=backend)
        d, m, codes = split_blocks(got, fmt)
        assert np.all(codes == ZERO_CODE[fmt]), backend
        assert np.all(d == 0), "fp16(d) underflows to 0"
        expected = gguf_quantize(x, fmt)
        scale_bytes = 4 if fmt.endswith("_1") else 2
        assert np.array_equal(got[:, :scale_bytes], expected[:, :scale_bytes]), "same scale bytes as gguf"
        assert np.all(quant.dequantize(got, fmt, x.shape, backend=backend) == 0)
    # just above the limit the scale is invertible and the bytes are gguf's again
    above = x[:2] * np.float32(1 + 2.0 ** -12)  # the two blocks (both signs) at exactly |d| = 2**-128
    assert [abs(scale_of(b, fmt)) for b in x[:2]] == [np.float32(INVERSE_LIMIT)] * 2
    assert all(abs(scale_of(b, fmt)) > INVERSE_LIMIT for b in above)
    check_blocks(above, fmt, "just invertible")


def test_inverse_limit():
    """1/d overflows float32 exactly for 0 < |d| <= 2**-128: checked on every float32 below 2**-126."""
    assert quant.INVERSE_LIMIT == np.float32(INVERSE_LIMIT)
    d = np.arange(1, 1 << 23, dtype=np.uint32).view(np.float32)  # all positive subnormals
    with np.errstate(over="ignore", divide="ignore"):
        finite = np.isfinite(np.float32(1.0) / d)
    assert np.array_equal(finite, d > np.float32(INVERSE_LIMIT))
    for v in (0.0, -0.0, 2.0 ** -128, -(2.0 ** -128), 1e-45):
        assert quant.inverse(np.float32(v)) == 0.0
    above = np.nextafter(np.float32(2.0 ** -128), np.float32(1))
    assert quant.inverse(above) == np.float32(1.0) / above and np.isfinite(quant.inverse(above))


@pytest.mark.parametrize("fmt", ["q4_0", "q5_0"])
def test_clamp_of_the_opposite_extreme(fmt):
    """+a and -a in one block: the first one is M and maps to code 0 (x~ = -half d = M exactly); the other maps to
    x * id + half + 1/2 = 2 half + 1/2, clamped to the largest code, so x~ = (half - 1) d: an error of exactly d."""
    half = 8 if fmt == "q4_0" else 16
    blocks = np.zeros((4, B), np.float32)
    blocks[0, 3], blocks[0, 20] = 2.0, -2.0
    blocks[1, 3], blocks[1, 20] = -2.0, 2.0
    blocks[2, 0], blocks[2, 31] = 1.5, -1.5
    blocks[3, 7], blocks[3, 8] = -3.0, 3.0
    got = check_blocks(blocks, fmt, "clamp")
    d, _, codes = split_blocks(got, fmt)
    firsts = [blocks[0, 3], blocks[1, 3], blocks[2, 0], blocks[3, 7]]
    seconds = [(0, 20), (1, 20), (2, 31), (3, 8)]
    for b, (first, (row, col)) in enumerate(zip(firsts, seconds)):
        assert d[b] == np.float32(first / -half)
        assert codes[b, col] == 2 * half - 1, "clamped to the largest code"
        approx = (codes[b, col] - half) * d[b]
        assert abs(approx - blocks[row, col]) == pytest.approx(abs(first) / half)


@pytest.mark.parametrize("fmt", ["q4_0", "q5_0"])
def test_first_of_ties_for_the_signed_extreme(rng, fmt):
    """Several elements share the largest |x|: the first one, with its sign, sets d (gguf: argmax's first index)."""
    blocks = rng.uniform(-1, 1, (200, B)).astype(np.float32)
    for b in range(200):
        positions = rng.choice(B, size=rng.integers(2, 6), replace=False)
        blocks[b, positions] = rng.choice([-5.0, 5.0], size=positions.size)
    got = check_blocks(blocks, fmt, "ties of the extreme")
    d, _, _ = split_blocks(got, fmt)
    first = blocks[np.arange(200), np.argmax(np.abs(blocks) == 5.0, axis=1)]
    assert np.array_equal(d, fp16(first / -(8 if fmt == "q4_0" else 16)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_scales_near_fp16_max(rng, fmt):
    """Scales around 65504 (fp16's largest finite value) and 65520 (where fp16 rounds to inf), and beyond:
    gguf stores the same (possibly infinite) scale."""
    divisor = {"q8_0": 127, "q4_0": 8, "q5_0": 16, "q4_1": 15, "q5_1": 31}[fmt]
    blocks = []
    for dv in (65504.0, 65519.0, 65520.0, 65536.0, 1e6, 1e30 / divisor):
        for step in (-1, 0, 1):
            amax = np.nextafter(np.float32(dv * divisor), np.float32(np.inf * step)) if step else np.float32(
                dv * divisor)
            b = rng.uniform(-1, 1, B) * amax
            b[5] = amax
            if fmt.endswith("_1"):
                b = rng.uniform(0, 1, B) * amax
                b[5], b[6] = amax, 0.0
            blocks.append(b)
    got = check_blocks(np.array(blocks, np.float32), fmt, "near fp16 max")
    d, _, _ = split_blocks(got, fmt)
    assert np.any(np.abs(d) == 65504.0) and np.any(np.isinf(d))


# ---------------------------------------------------------------------------------------------------------------
# Hypothesis: random blocks with special magnitudes
# ---------------------------------------------------------------------------------------------------------------
SPECIAL = [0.0, 1e-45, 1.1754944e-38, 1e-30, 1e-10, 5.9604645e-08, 6.1035156e-05, 0.5, 1.0, 1.5, 127.5, 65504.0,
           65520.0, 8319008.0, 524032.0, 1e20, 1e30]
element = st.one_of(
    st.floats(width=32, min_value=float(np.float32(-1e30)), max_value=float(np.float32(1e30)), allow_nan=False),
    st.sampled_from(SPECIAL + [-v for v in SPECIAL]))


def scale_of(block, fmt):
    """d as ggml computes it, in float32 (independent NumPy arithmetic)."""
    block = block.astype(np.float32)
    if fmt == "q8_0":
        return np.max(np.abs(block)) / np.float32(127)
    if fmt in ("q4_0", "q5_0"):
        a = np.abs(block)
        extreme = block[np.argmax(a)] if a.max() > 0 else np.float32(0.0)
        return extreme / np.float32(-8 if fmt == "q4_0" else -16)
    return (block.max() - block.min()) / np.float32(LEVELS[fmt])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(FORMATS), data=hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.just(B)),
                                                     elements=element),
       scale=st.sampled_from([1.0, 1e-20, 1e-6, 1e6]))
def test_property_bytes_equal_gguf(fmt, data, scale):
    """Signed zeros are normalised to +0.0 here (x + 0.0); they are covered by the tests above, where gguf and
    ggml's C differ. Blocks whose scale is not invertible (0 < |d| <= 2**-128) follow kvref's policy instead."""
    x = (data * np.float32(scale) + np.float32(0.0)).astype(np.float32)
    x = np.clip(x, -1e30, 1e30).astype(np.float32)  # keeps max - min finite for q4_1 / q5_1
    expected = gguf_quantize(x, fmt)
    policy = np.array([0 < abs(scale_of(b, fmt)) <= INVERSE_LIMIT for b in x])
    for backend in ("cpu", "python"):
        got = quant.quantize(x, fmt, backend=backend)
        assert_bytes_equal(got[~policy], expected[~policy], x[~policy], fmt, backend)
        if policy.any():
            assert np.all(split_blocks(got[policy], fmt)[2] == ZERO_CODE[fmt])


# ---------------------------------------------------------------------------------------------------------------
# Dequantize and the in-attention decode
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN and inf scales, as in gguf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_random_bytes_equals_gguf(rng, fmt, backend):
    """Every byte pattern decodes as gguf decodes it (fp16 scales of every kind, including inf and NaN, every
    code): float32 bits equal, NaN where gguf has NaN."""
    nbytes = quant.FORMATS[fmt][1]
    rows = 40 if backend == "python" else 4000
    blocks = rng.integers(0, 256, (rows, 4 * nbytes), dtype=np.uint8)
    got = quant.dequantize(blocks, fmt, (rows, 4 * B), backend=backend)
    assert_f32_bits_equal(got, gguf_dequantize(blocks, fmt), nan_ok=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_block_codes_give_the_dequantized_values(rng, fmt):
    """block_codes (what attention reads) turns a block into (d, m, c_j) with d * c_j + m = the dequantized x~;
    the code values are the stored codes minus the zero code."""
    import numba

    fid = quant.GGML_TYPES[fmt]
    nbytes = quant.FORMATS[fmt][1]
    x = random_rows(rng, (50, B))
    blocks = quant.quantize(x, fmt)

    @numba.njit
    def decode_all(blocks, fid, codes, dm):
        for b in range(blocks.shape[0]):
            dm[b, 0], dm[b, 1] = quant.block_codes(blocks[b], fid, codes[b])

    codes = np.empty((50, B), np.float32)
    dm = np.empty((50, 2), np.float32)
    decode_all(blocks, fid, codes, dm)
    d, m, stored = split_blocks(blocks, fmt)
    assert np.array_equal(dm[:, 0], d) and np.array_equal(dm[:, 1], m)
    assert np.array_equal(codes, (stored - ZERO_CODE[fmt]).astype(np.float32))
    for b in range(3):  # the plain-Python spec too
        py_codes = np.empty(B, np.float32)
        assert quant.block_codes(blocks[b], fid, py_codes) == (d[b], m[b])
        assert np.array_equal(py_codes, codes[b])
    with np.errstate(invalid="ignore"):  # inf * 0 where a heavy tail made fp16(d) infinite
        values = (dm[:, :1] * codes + dm[:, 1:]).astype(np.float32)
    np.testing.assert_array_equal(values, quant.dequantize(blocks, fmt, x.shape))  # (NaN where fp16(d) is inf)
    assert nbytes == blocks.shape[1]


# ---------------------------------------------------------------------------------------------------------------
# Error bounds
# ---------------------------------------------------------------------------------------------------------------
def bound(block, fmt):
    """Largest |x - x~| allowed for one block (quant_and_ring_facts.md §4/§6, derived in kvref/quant.py):
    rounding to the nearest code (half a step; a full step d for the clamped opposite extreme of q4_0/q5_0), plus
    the codes times the fp16 rounding of d, plus the fp16 rounding of m, plus a 2**-20 relative slack for the
    float32 roundings of x * id and of x~ itself."""
    block = block.astype(np.float32)
    if fmt in SYMMETRIC:
        amax = float(np.max(np.abs(block)))
        d = float(scale_of(block, fmt))
        steps = {"q8_0": (254, 127), "q4_0": (8, 8), "q5_0": (16, 16)}[fmt]
        return amax / steps[0] + steps[1] * abs(d - float(fp16(d))) + amax * 2.0 ** -20
    lo, hi = float(block.min()), float(block.max())
    d = float(scale_of(block, fmt))
    return ((hi - lo) / (2 * LEVELS[fmt]) + LEVELS[fmt] * abs(d - float(fp16(d))) + abs(lo - float(fp16(lo)))
            + max(abs(lo), abs(hi)) * 2.0 ** -20)


@pytest.mark.parametrize("fmt", FORMATS)
def test_error_bounds(rng, fmt):
    x = rng.standard_normal((3000, B)) * 10.0 ** rng.uniform(-3, 3, (3000, 1))
    x[:1000] += rng.uniform(-50, 50, (1000, 1))  # offsets: q4_1's m far from 0
    x[1000:1100, :] = rng.uniform(-1, 1, (100, B))
    x[1000:1100, 2], x[1000:1100, 9] = 1.0, -1.0  # the q4_0 / q5_0 clamp case
    x = x.astype(np.float32)
    approx = quant.dequantize(quant.quantize(x, fmt), fmt, x.shape)
    err = np.abs(approx.astype(np.float64) - x)
    limits = np.array([bound(b, fmt) for b in x])
    worst = np.argmax(err.max(axis=1) / limits)
    assert np.all(err.max(axis=1) <= limits), f"block {worst}: error {err[worst].max()} > bound {limits[worst]}"
    ratio = err.max(axis=1) / limits
    assert ratio.max() > 0.9, "the bound is tight: some block comes close to it"
    if fmt in ("q4_0", "q5_0"):
        clamp = err[1000:1100].max(axis=1) / np.abs(x[1000:1100]).max(axis=1)
        assert clamp.min() > (1 / (8 if fmt == "q4_0" else 16)) * 0.99, "the clamp case costs a whole step"


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp tests/test-quantize-fns.cpp, ported as is
# ---------------------------------------------------------------------------------------------------------------
MAX_QUANTIZATION_REFERENCE_ERROR = 0.0001
MAX_QUANTIZATION_TOTAL_ERROR = 0.002
MAX_DOT_PRODUCT_ERROR = 0.02
TEST_SIZE = 32 * 128
#: measured by building llama.cpp c392e509 and running ``test-quantize-fns -v`` (quant_and_ring_facts.md §4)
MEASURED_TOTAL_ERROR = {"q8_0": 0.000074, "q4_0": 0.001121, "q4_1": 0.001144, "q5_0": 0.000591, "q5_1": 0.000556}
MEASURED_DOT_ERROR = {"q8_0": 0.000092, "q4_0": 0.001142, "q4_1": 0.007931, "q5_0": 0.001353, "q5_1": 0.001511}


def generate_data(offset, n):
    """``dst[i] = 0.1 + 2*cosf(i + offset)``: cosf in float32, the sum in double (0.1 is a double), stored as float."""
    c = np.cos((np.arange(n) + offset).astype(np.float32)).astype(np.float64)
    return (0.1 + 2 * c).astype(np.float32)


def array_rmse(a1, a2):
    """llama.cpp's ``array_rmse``: ``sqrtf(sum (a1 - a2)**2) / n``. Despite the name this is RMSE / sqrt(n), not the
    RMSE: with n = 4096 it is 64 times smaller, so the 0.002 threshold means a true RMSE below 0.128."""
    diff = a1.astype(np.float64) - a2.astype(np.float64)
    return math.sqrt(np.sum(diff * diff)) / a1.size


def q8_1_sums(x):
    """The ``s`` field of ggml's q8_1 blocks (``quantize_row_q8_1_ref``): fp16(sum_j q_j * d), d = amax / 127 in
    float32; its codes are q8_0's, so q8_1 = q8_0's bytes plus this."""
    blocks = x.reshape(-1, B)
    d = np.max(np.abs(blocks), axis=1) / np.float32(127)
    _, _, q = split_blocks(gguf_quantize(x, "q8_0"), "q8_0")
    return fp16(q.sum(axis=1).astype(np.float32) * d)


def vec_dot(x1, fmt, x2):
    """ggml's ``vec_dot`` of x1 in ``fmt`` with x2 in its ``vec_dot_type`` (q8_0 for the _0 formats, q8_1 for the _1
    formats), in the reference's order: per block an integer sum of code products, then the fp16 scales."""
    d1, m1, c1 = split_blocks(quant.quantize(x1, fmt), fmt)
    c1 = c1 - ZERO_CODE[fmt]
    d2, _, c2 = split_blocks(quant.quantize(x2, "q8_0"), "q8_0")
    sumi = np.sum(c1 * c2, axis=1).astype(np.float32)
    total = (d1 * d2).astype(np.float32) * sumi
    if fmt.endswith("_1"):
        total = total + m1 * q8_1_sums(x2)
    return float(np.sum(total.astype(np.float64)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_llama_cpp_test_quantize_fns(fmt):
    x1 = generate_data(0.0, TEST_SIZE)
    x2 = generate_data(1.0, TEST_SIZE)
    reference = quant.dequantize(quant.quantize(x1, fmt, backend="python"), fmt, x1.shape, backend="python")
    compiled = quant.dequantize(quant.quantize(x1, fmt, backend="cpu"), fmt, x1.shape, backend="cpu")
    assert array_rmse(reference, compiled) < MAX_QUANTIZATION_REFERENCE_ERROR  # (it is 0: the same bytes)
    total = array_rmse(x1, compiled)
    assert total < MAX_QUANTIZATION_TOTAL_ERROR
    assert total == pytest.approx(MEASURED_TOTAL_ERROR[fmt], abs=5e-7), "ggml's own build gave this value"
    dot = abs(vec_dot(x1, fmt, x2) - float(np.dot(x1.astype(np.float64), x2))) / TEST_SIZE
    assert dot < MAX_DOT_PRODUCT_ERROR
    assert dot == pytest.approx(MEASURED_DOT_ERROR[fmt], abs=2e-6)


# ---------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS + ("cuda",))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises_naming_argument_and_index(backend, bad):
    """Checked before any backend runs, so even "cuda" (unavailable in this process) answers NonFiniteError."""
    x = np.ones((2, 3, 64), np.float32)
    x[1, 2, 37] = bad
    x[1, 2, 50] = np.nan
    for fmt in FORMATS:
        with pytest.raises(NonFiniteError) as info:
            quant.quantize(x, fmt, backend=backend)
        assert info.value.argument == "x"
        assert "(1, 2, 37)" in str(info.value) and repr(np.float32(bad)) in str(info.value)


@pytest.mark.parametrize("x, error", [
    (np.ones(64, np.float64), DTypeError), (np.ones(64, np.float16), DTypeError), (np.ones(64, np.int32), DTypeError),
    ([0.0] * 64, DTypeError), (np.ones(33, np.float32), ShapeError), (np.ones((2, 48), np.float32), ShapeError),
    (np.ones((), np.float32), ShapeError)], ids=["float64", "float16", "int32", "list", "n33",
                                                                   "n48", "0d"])
def test_quantize_refuses_bad_input(x, error):
    with pytest.raises(error) as info:
        quant.quantize(x, "q8_0")
    assert info.value.argument == "x"


def test_unknown_format_and_backend():
    x = np.ones(32, np.float32)
    for bad in ("q2_k", "Q8_0", "f16", 8):
        with pytest.raises(DTypeError) as info:
            quant.quantize(x, bad)
        assert info.value.argument == "fmt"
        with pytest.raises(DTypeError):
            quant.dequantize(np.zeros(34, np.uint8), bad, (32,))
        with pytest.raises(DTypeError):
            quant.row_bytes(32, bad)
    with pytest.raises(BackendUnavailableError):
        quant.quantize(x, "q8_0", backend="gpu")
    assert issubclass(NonFiniteError, KVCacheError) and issubclass(NonFiniteError, ValueError)


def test_dequantize_refuses_bad_input():
    good = np.zeros((2, 68), np.uint8)
    assert quant.dequantize(good, "q8_0", (2, 64)).shape == (2, 64)
    with pytest.raises(DTypeError) as info:
        quant.dequantize(good.astype(np.int8), "q8_0", (2, 64))
    assert info.value.argument == "blocks"
    with pytest.raises(ShapeError) as info:
        quant.dequantize(good, "q8_0", (2, 96))
    assert info.value.argument == "blocks"
    with pytest.raises(ShapeError) as info:
        quant.dequantize(good, "q8_0", (2, 65))
    assert info.value.argument == "shape"
    with pytest.raises(ShapeError):
        quant.row_bytes(33, "q4_0")


# ---------------------------------------------------------------------------------------------------------------
# The compiled backend really uses its fast primitives
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_cpu_kernels_use_the_vector_primitives(fmt, monkeypatch):
    from kvref.cpu import quant as cpu_quant

    fid = quant.GGML_TYPES[fmt]
    monkeypatch.setenv("KVREF_NUMBA_CACHE", "0")  # compiled here, not loaded from the disk cache (which keeps no IR)
    kernel = cpu_quant._with_format(quant.quantize_rows, fid)
    kernel(np.ones((1, 32), np.float32), np.empty((1, quant.FORMATS[fmt][1]), np.uint8))
    ir = "\n".join(kernel.inspect_llvm().values())
    assert "load <32 x float>" in ir, "the block reduction is one vector load (kvref/cpu/fast_math.py)"
    if fmt == "q8_0":
        assert "llvm.round" in ir, "roundf is llvm.round"
