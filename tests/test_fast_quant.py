"""kvref/cpu/fast_quant.py: the compiled-CPU block decode of quantized rows, against the plain-Python spec.

* ``quant.dequantize(..., backend="cpu")`` equals ``backend="python"`` bit for bit (float32 patterns, NaN matching
  NaN) on all five formats, on adversarial blocks: every byte value in every byte position of a block (so every
  code in every lane, every qh bit, and both bytes of every scale), over three backgrounds (random, all 0x00, all
  0xFF); special fp16 scales and mins (+-0, subnormals, the smallest normal, the largest finite, +-inf, quiet and
  signalling NaN of both signs) crossed with code patterns; and random blocks.
* every one of the 65,536 fp16 patterns as d (and as m for q4_1 / q5_1): against the spec's ``block_codes`` compiled
  from its own body (no overload involved) and the spec's float32 formula in NumPy, and on every 61st pattern
  against the plain-Python spec itself.
* a compiled ``dequantize_row`` (the format a run-time argument, as in attention; with and without attention's
  fast-math flags) and a compiled ``block_codes`` equal the plain-Python spec.
* the compiled decode is packed vector code: no scalar ``cvtsi2ss``, packed ``cvtdq2ps`` / ``mulps`` and a packed
  byte widening (``pmovsxbd`` / ``pmovzxbd``; AVX2 or AVX-512 forms), and the affine formats' multiply and add stay
  separate under attention's fast-math (no ``contract``, no FMA), as the spec's ``mul_rn`` requires.
"""

import re

import numba
import numpy as np
import pytest

import kvref.cpu  # noqa: F401  (registers the CPU overloads before anything below compiles)
from kvref import quant
from kvref.cpu import ATTENTION_FASTMATH
from kvref.cpu import quant as cpu_quant

FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
AFFINE = ("q4_1", "q5_1")
B = quant.BLOCK
D = 128  # head_dim of the row tests: 4 blocks per row

#: fp16 patterns of interest as scales and mins
SPECIAL_F16 = (0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x83FF, 0x0400, 0x8400, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF,
               0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7C01, 0xFC01, 0x7FFF, 0xFFFF, 0x1234, 0x0200)


def nbytes(fmt):
    return quant.FORMATS[fmt][1]


def set_f16(blocks, at, bits):
    blocks[:, at] = np.asarray(bits) & 0xFF
    blocks[:, at + 1] = np.asarray(bits) >> 8


def every_byte_everywhere(fmt, rng):
    """For each of three backgrounds (random, 0x00, 0xFF) and each byte position, 256 blocks with that byte = 0..255."""
    n = nbytes(fmt)
    out = []
    for background in (rng.integers(0, 256, n, dtype=np.uint8), np.zeros(n, np.uint8), np.full(n, 0xFF, np.uint8)):
        for position in range(n):
            blocks = np.tile(background, (256, 1))
            blocks[:, position] = np.arange(256)
            out.append(blocks)
    return np.concatenate(out)


def special_scales(fmt, rng):
    """Special d (and m) crossed with code patterns: all codes lowest, all highest, a ramp, random."""
    n = nbytes(fmt)
    m_at, qh_at, qs_at, _ = quant.layout(quant.GGML_TYPES[fmt])
    patterns = [np.zeros(n, np.uint8), np.full(n, 0xFF, np.uint8), np.arange(n, dtype=np.uint8) * 37,
                rng.integers(0, 256, n, dtype=np.uint8)]
    if fmt == "q8_0":
        patterns.append(np.full(n, 0x80, np.uint8))  # every code -128
    scales = SPECIAL_F16
    mins = SPECIAL_F16 if m_at >= 0 else (None,)
    out = []
    for pattern in patterns:
        for d in scales:
            for m in mins:
                block = pattern.copy()[None, :]
                set_f16(block, 0, d)
                if m is not None:
                    set_f16(block, m_at, m)
                out.append(block)
    return np.concatenate(out)


def adversarial_blocks(fmt, rng):
    blocks = np.concatenate([every_byte_everywhere(fmt, rng), special_scales(fmt, rng),
                             rng.integers(0, 256, (2000, nbytes(fmt)), dtype=np.uint8)])
    pad = (-blocks.shape[0]) % (D // B)  # whole rows of head_dim D
    return np.concatenate([blocks, rng.integers(0, 256, (pad, nbytes(fmt)), dtype=np.uint8)])


def python_decode(blocks, fmt):
    """The plain-Python spec, one block per row: (n, 32) float32."""
    return quant.dequantize(blocks, fmt, (blocks.shape[0], B), backend="python")


def assert_same_bits(got, want):
    """Equal float32 bit patterns, except that any NaN matches any NaN."""
    assert got.dtype == np.float32 and want.dtype == np.float32 and got.shape == want.shape
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), "NaN in the same places"
    bad = np.flatnonzero(got.view(np.uint32)[~nan] != want.view(np.uint32)[~nan])
    assert bad.size == 0, f"{bad.size} differ, first: got {got[~nan][bad[0]]!r}, want {want[~nan][bad[0]]!r}"


@pytest.fixture(scope="module", params=FORMATS)
def case(request):
    """(fmt, adversarial blocks, their plain-Python decode), once per format."""
    fmt = request.param
    rng = np.random.default_rng(14 + FORMATS.index(fmt))
    blocks = adversarial_blocks(fmt, rng)
    with np.errstate(invalid="ignore"):  # inf * 0 in the spec, for the infinite scales
        return fmt, blocks, python_decode(blocks, fmt)


# ---------------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------------
def test_dequantize_cpu_equals_python_on_adversarial_blocks(case):
    fmt, blocks, want = case
    got = quant.dequantize(blocks, fmt, (blocks.shape[0], B), backend="cpu")
    assert_same_bits(got, want)
    # the same bytes as rows of head_dim D (several blocks per row)
    rows = blocks.reshape(-1, D // B * nbytes(fmt))
    assert_same_bits(quant.dequantize(rows, fmt, (rows.shape[0], D), backend="cpu"), want.reshape(-1, D))


_spec_block_codes = numba.njit(quant.block_codes)  # the spec's own body, compiled: no overload of it involved


@numba.njit
def _spec_codes_all(blocks, fid, codes, dm):
    for b in range(blocks.shape[0]):
        dm[b, 0], dm[b, 1] = _spec_block_codes(blocks[b], fid, codes[b])


@pytest.mark.parametrize("fmt, field", [(fmt, "d") for fmt in FORMATS] + [(fmt, "m") for fmt in AFFINE])
def test_every_fp16_scale_and_min(fmt, field):
    """All 65,536 fp16 patterns as d (or m): equal to the spec's compiled block_codes and its float32 formula
    (x = d * c, or d * c rounded then + m rounded), and on every 61st pattern to the plain-Python spec."""
    m_at = quant.layout(quant.GGML_TYPES[fmt])[0]
    fid = quant.GGML_TYPES[fmt]
    rng = np.random.default_rng(1400 + fid)
    blocks = rng.integers(0, 256, (65536, nbytes(fmt)), dtype=np.uint8)
    set_f16(blocks, 0 if field == "d" else m_at, np.arange(65536))
    got = quant.dequantize(blocks, fmt, (65536, B), backend="cpu")
    codes = np.empty((65536, B), np.float32)
    dm = np.empty((65536, 2), np.float32)
    _spec_codes_all(blocks, fid, codes, dm)
    with np.errstate(invalid="ignore", over="ignore"):
        want = dm[:, :1] * codes
        if fmt in AFFINE:
            want = want + dm[:, 1:]
        assert_same_bits(got, want.astype(np.float32))
        subset = np.concatenate([np.arange(0, 65536, 61), np.array(SPECIAL_F16)])
        assert_same_bits(got[subset], python_decode(blocks[subset], fmt))


def _row_decoder(fastmath):
    def decode_rows(rows, fid, out):
        codes = np.empty(quant.BLOCK, np.float32)
        for r in range(rows.shape[0]):
            quant.dequantize_row(rows[r], fid, out[r], codes)  # the format a run-time value, as in attention

    return numba.njit(fastmath=set(fastmath) if fastmath else False)(decode_rows)


ROW_DECODERS = {"plain": _row_decoder(False), "attention_fastmath": _row_decoder(ATTENTION_FASTMATH)}


@pytest.mark.parametrize("name", list(ROW_DECODERS))
def test_compiled_dequantize_row_equals_python(case, name):
    fmt, blocks, want = case
    rows = blocks.reshape(-1, D // B * nbytes(fmt))
    got = np.empty((rows.shape[0], D), np.float32)
    ROW_DECODERS[name](rows, quant.GGML_TYPES[fmt], got)
    assert_same_bits(got, want.reshape(-1, D))
    # and the plain-Python dequantize_row itself, on a few rows
    row, codes = np.empty(D, np.float32), np.empty(B, np.float32)
    for r in range(0, rows.shape[0], max(1, rows.shape[0] // 7)):
        with np.errstate(invalid="ignore"):
            quant.dequantize_row(rows[r], quant.GGML_TYPES[fmt], row, codes)
        assert_same_bits(got[r], row)


@numba.njit
def _codes_all(blocks, fid, codes, dm):
    for b in range(blocks.shape[0]):
        dm[b, 0], dm[b, 1] = quant.block_codes(blocks[b], fid, codes[b])  # through the CPU overload


def test_compiled_block_codes_equal_python(case):
    fmt, blocks, _ = case
    fid = quant.GGML_TYPES[fmt]
    codes = np.empty((blocks.shape[0], B), np.float32)
    dm = np.empty((blocks.shape[0], 2), np.float32)
    _codes_all(blocks, fid, codes, dm)
    for b in range(0, blocks.shape[0], 13):
        py_codes = np.empty(B, np.float32)
        d, m = quant.block_codes(blocks[b], fid, py_codes)
        assert_same_bits(codes[b], py_codes)
        assert_same_bits(dm[b], np.array([d, m], np.float32))


# ---------------------------------------------------------------------------------------------------------------
# The compiled code is the vector decode
# ---------------------------------------------------------------------------------------------------------------
def _block_decoder(fid, fastmath=False):
    def decode(block, x, codes):
        quant.dequantize_block(block, fid, x, codes)  # fid a constant: only that format's code is left

    return numba.njit(fastmath=set(fastmath) if fastmath else False)(decode)


def _compiled(fmt, fastmath=False):
    kernel = _block_decoder(quant.GGML_TYPES[fmt], fastmath)
    kernel(np.zeros(nbytes(fmt), np.uint8), np.zeros(B, np.float32), np.zeros(B, np.float32))
    return kernel


def _instructions(asm):
    return re.findall(r"^\s+([a-z][a-z0-9]*)\b", asm, re.M)


@pytest.mark.parametrize("fmt", FORMATS)
def test_compiled_decode_is_packed_vector_code(fmt):
    kernel = _compiled(fmt)
    ops = _instructions(kernel.inspect_asm(kernel.signatures[0]))
    assert ops, "the assembly was read"
    assert not [op for op in ops if "cvtsi2s" in op], "no scalar int -> float conversion"
    assert any(op.endswith("cvtdq2ps") for op in ops), "packed int32 -> float32 (cvtdq2ps, AVX2 or AVX-512)"
    assert any(op.endswith("mulps") for op in ops), "packed multiply by the scale"
    assert any(re.fullmatch(r"v?pmov[sz]x(bd|bw|bq)", op) for op in ops), "packed byte widening (pmovsxbd/pmovzxbd)"
    if fmt in AFFINE:
        assert any(op.endswith("addps") for op in ops), "packed add of the min"


def test_the_spec_loop_alone_compiles_to_scalar_conversions():
    """The check above can fail: the spec's own block_codes body compiles to scalar cvtsi2ss."""
    _spec_block_codes(np.zeros(34, np.uint8), quant.Q8_0, np.zeros(B, np.float32))
    ops = _instructions(_spec_block_codes.inspect_asm(_spec_block_codes.signatures[0]))
    assert [op for op in ops if "cvtsi2s" in op]


@pytest.mark.parametrize("fmt", AFFINE)
def test_affine_multiply_and_add_stay_separate_under_attention_fastmath(fmt):
    """x = d * c + m as the spec's mul_rn: one fmul and one fadd with no fast-math flags, even when the caller is
    compiled with attention's flags (which include 'contract'); so no FMA in the assembly either."""
    kernel = _compiled(fmt, ATTENTION_FASTMATH)
    llvm = kernel.inspect_llvm(kernel.signatures[0])
    vector_fp = [line for line in llvm.splitlines() if re.search(r"= f(mul|add) .*<\d+ x float>", line)]
    assert any(" fmul <" in line for line in vector_fp) and any(" fadd <" in line for line in vector_fp)
    assert not [line for line in vector_fp if "contract" in line or "fast" in line or "reassoc" in line]
    assert "fmuladd" not in llvm and "llvm.fma" not in llvm
    assert not [op for op in _instructions(kernel.inspect_asm(kernel.signatures[0])) if "fmadd" in op]


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_dequantize_kernels_use_the_vector_decode(fmt, monkeypatch):
    """kvref.cpu.quant's compiled dequantize loop (what backend="cpu" runs) has the vector decode inlined."""
    monkeypatch.setenv("KVREF_NUMBA_CACHE", "0")  # compiled here, not loaded from the disk cache (which keeps no IR)
    fid = quant.GGML_TYPES[fmt]
    kernel = cpu_quant._with_format(quant.dequantize_rows, fid)
    kernel(np.zeros((1, nbytes(fmt)), np.uint8), np.empty((1, B), np.float32))
    ops = _instructions(kernel.inspect_asm(kernel.signatures[0]))
    assert not [op for op in ops if "cvtsi2s" in op]
    assert any(op.endswith("cvtdq2ps") for op in ops)


# ---------------------------------------------------------------------------------------------------------------
# Quantize: the vector form of quant.store_codes
# ---------------------------------------------------------------------------------------------------------------
def adversarial_floats(rng, n_random=3000):
    """(n, 32) float32 blocks that probe every branch of the quantizers: rounding halves, ties, signed zeros, tiny
    and huge scales, a min/max range that overflows float32, and random blocks over 60 decades of magnitude."""
    blocks = [np.zeros((1, B)), -np.zeros((1, B)), np.ones((1, B)), -np.ones((1, B))]
    zero_first = np.zeros((2, B))
    zero_first[0, 0], zero_first[1, 5] = -0.0, -0.0
    blocks.append(zero_first)
    ramp = np.arange(B) - 15.5
    for scale in (1.0, 127.0 / 15.5, 8.0 / 15.5, 2.0 ** -130, 2.0 ** -126, 3.0e-38, 1e-40, 1e38 / 15.5, 3.4e38 / 15.5):
        blocks += [ramp[None] * scale, -ramp[None] * scale]
    # values whose x * id lands exactly on a half (k + 0.5) for the q8_0 scale: amax 127, id 1 -> x = k + 0.5
    halves = np.tile(np.arange(-16, 16) + 0.5, (2, 1))
    halves[:, 0] = 127.0
    halves[1] *= -1
    blocks.append(halves)
    # ties of the signed extreme (q4_0 / q5_0 keep the first) and of +-0 in min/max
    tie = rng.standard_normal((4, B))
    tie[0, 3], tie[0, 9] = 50.0, -50.0
    tie[1, 3], tie[1, 9] = -50.0, 50.0
    tie[2, :] = 0.0
    tie[2, 7] = -0.0
    tie[3, :] = np.where(np.arange(B) % 2, 0.0, -0.0)
    blocks.append(tie)
    blocks.append(np.array([[3.4e38] * 16 + [-3.4e38] * 16]))  # max - min overflows to inf: d = inf, id = 0
    magnitudes = 10.0 ** rng.uniform(-30, 30, (n_random, 1))
    blocks.append(rng.standard_normal((n_random, B)) * magnitudes)
    blocks.append(rng.integers(-8, 8, (500, B)) * 10.0 ** rng.uniform(-3, 3, (500, 1)))  # exact multiples, many ties
    with np.errstate(over="ignore"):
        out = np.concatenate(blocks).astype(np.float32)
    assert np.isfinite(out).all()
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_cpu_equals_python_on_adversarial_blocks(fmt):
    """The vector encode writes the spec's bytes: as one block per row, and as rows of head_dim D."""
    x = adversarial_floats(np.random.default_rng(140 + FORMATS.index(fmt)))
    x = x[: x.shape[0] - x.shape[0] % (D // B)]
    with np.errstate(over="ignore", invalid="ignore"):  # inf - inf and inf * 0 in the overflowing block
        want = quant.quantize(x, fmt, backend="python")
        got = quant.quantize(x, fmt, backend="cpu")
    bad = np.flatnonzero((got != want).any(axis=1))
    assert bad.size == 0, f"{bad.size} blocks differ, first {bad[0]}: {x[bad[0]]!r}"
    rows = x.reshape(-1, D)
    assert np.array_equal(quant.quantize(rows, fmt, backend="cpu"), want.reshape(rows.shape[0], -1))


def test_quantize_matches_gguf_on_the_finite_scales():
    """The same blocks, against the independent oracle (gguf's NumPy quantizers), where gguf is defined: blocks
    whose scale's reciprocal is finite and whose min/max range does not overflow, without signed-zero corners."""
    gguf = pytest.importorskip("gguf")
    x = adversarial_floats(np.random.default_rng(7))
    amax = np.abs(x).max(axis=1)
    keep = (amax > 1e-30) & (amax < 1e30) & (x != 0).all(axis=1)
    x = x[keep]
    for fmt in FORMATS:
        with np.errstate(over="ignore"):  # gguf's fp16 cast of the scales of the largest blocks (inf, as ggml's)
            want = gguf.quants.quantize(x, getattr(gguf.GGMLQuantizationType, fmt.upper()))
        assert np.array_equal(quant.quantize(x, fmt, backend="cpu"), want), fmt


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q5_1"])
def test_quantize_kernels_use_the_vector_encode(fmt, monkeypatch):
    """kvref.cpu.quant's compiled quantize loop has packed conversions and rounding, no scalar ones."""
    monkeypatch.setenv("KVREF_NUMBA_CACHE", "0")
    fid = quant.GGML_TYPES[fmt]
    kernel = cpu_quant._with_format(quant.quantize_rows, fid)
    kernel(np.ones((1, B), np.float32), np.empty((1, nbytes(fmt)), np.uint8))
    ops = _instructions(kernel.inspect_asm(kernel.signatures[0]))
    assert any(op.endswith("cvttps2dq") for op in ops), "packed float -> int32 truncation"
    assert not [op for op in ops if re.fullmatch(r"v?cvtt?ss2si", op)], "no scalar float -> int conversion"
    if fmt == "q8_0":
        assert any(re.fullmatch(r"v?roundps|vrndscaleps", op) for op in ops), "packed rounding (roundf)"
