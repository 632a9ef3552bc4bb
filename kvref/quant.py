"""ggml's quantized block formats, byte for byte: the spec of quantize, dequantize and the in-attention decode.

Every format cuts a row of floats into blocks of **32 elements** and stores each block as a few bytes of scale
(IEEE fp16, little-endian) followed by the packed integer codes. The bytes are exactly those of ggml's reference
quantizers (``quantize_row_*_ref`` in ``ggml-quants.c``) and of the ``gguf`` package's NumPy port, which the tests
use as the oracle::

    q8_0  | d:f16 | qs: 32 x int8                   |                 34 bytes   8.5 bits/elem
    q4_0  | d:f16 | qs: 16 bytes of nibbles          |                 18 bytes   4.5 bits/elem
    q4_1  | d:f16 | m:f16 | qs: 16 bytes             |                 20 bytes   5.0 bits/elem
    q5_0  | d:f16 | qh: u32 (5th bits) | qs: 16 bytes |                22 bytes   5.5 bits/elem
    q5_1  | d:f16 | m:f16 | qh: u32 | qs: 16 bytes   |                 24 bytes   6.0 bits/elem

**Nibble order** (q4_*, q5_*): byte j of ``qs`` holds element j in its low nibble and element j + 16 in its high
nibble, ``qs[j] = q[j] | q[j+16] << 4`` for j = 0..15. Adjacent elements are *not* paired. For q5_*, the 5th bit of
element j is bit j of ``qh`` read as a little-endian uint32.

**Formulas** (x = one block of 32 float32; ``d`` is computed in float32, *stored* as fp16, and ``id = 1/d`` uses the
float32 ``d``, not the stored one; ``id = 0`` when ``d = 0``)::

    q8_0   amax = max |x_j|           d = amax / 127       q_j = roundf(x_j * id)                 x~ = q * d
    q4_0   M = the x_j of largest |x_j| (the first on ties, sign kept; +0 if all are zero)
                                      d = M / -8           q_j = min(15, trunc(x_j * id + 8.5))   x~ = (q - 8) * d
    q4_1   lo = min x, hi = max x     d = (hi - lo) / 15   q_j = min(15, trunc((x_j - lo) * id + 0.5))
                                      m = lo                                                      x~ = q * d + m
    q5_0   as q4_0 with 16 / 31:      d = M / -16          q_j = min(31, trunc(x_j * id + 16.5))  x~ = (q - 16) * d
    q5_1   as q4_1 with 31:           d = (hi - lo) / 31   q_j = min(31, trunc((x_j - lo) * id + 0.5))

where ``roundf`` rounds halves *away from zero* (C's ``roundf``; Python's ``round`` and ``np.round`` round halves to
even, so the spec writes ``copysign(floor(|v| + 0.5), v)``) and ``trunc`` is C's cast to an integer. Every product
and sum above is a float32 operation, rounded on its own. (NVVM would fuse ``x * id + 8.5`` into one FMA with a
single rounding, which changes 9 of the q4_0 codes ggml produces; the spec multiplies with :func:`mul_rn`, which the
CUDA backend maps to an unfused multiply.)

**Error bounds** (``../shared/reference/quant_and_ring_facts.md`` §4, tested in ``tests/test_quant.py``), with
``r(v) = |v - fp16(v)|`` the fp16 rounding of a stored scale:

    q8_0  |x - x~| <= amax/254 + 127 r(d)      q4_0  <= amax/8  + 8 r(d)     q5_0  <= amax/16 + 16 r(d)
    q4_1  |x - x~| <= range/30 + 15 r(d) + r(m)                              q5_1  <= range/62 + 31 r(d) + r(m)

The symmetric formats reach their bound: the extreme M maps exactly to -8 d, but a value of the opposite sign and
the same magnitude can only reach +7 d (the clamp), an error of d = amax/8.

**Non-finite input** (NaN, +-inf) has no meaning in these formats: ggml's result is undefined behaviour in C.
kvref rejects it: :func:`quantize` and the two-tier cache's ``write`` raise :class:`kvref.errors.NonFiniteError`
naming the argument and the first bad index, before any compiled code runs, so every backend behaves the same.
A block so small that ``1/d`` overflows float32 (``|d| <= 2**-128``: max |x| below about 3.7e-37 for q8_0, 2.4e-38
for q4_0) gets ``id = 0``, the all-zero block's codes (:func:`inverse`); its fp16 scale is 0, so it dequantizes to
zeros whatever the codes. (ggml multiplies by inf there and casts the result to an integer: undefined in C; the
``gguf`` port gets whatever NumPy's cast of inf and NaN gives.)

**Signed zeros: ggml's C, not its NumPy port.** In two corners the ``gguf`` package's NumPy port differs from ggml's
C reference, and kvref follows the C: (1) q4_0 / q5_0, a block of zeros whose first element is -0.0: C keeps
``max = 0.0f`` (d = -0.0, stored 0x8000) while ``gguf`` takes ``x[argmax |x|]`` = -0.0 (d = +0.0); (2) q4_1 / q5_1,
a block whose min or max is a tie of +0.0 and -0.0: C keeps the first one, ``gguf``'s ``np.min`` / ``np.max``
whichever its SIMD lanes give. Both choices dequantize to the same values (zeros, or x~ = q d + 0).

**Attention without a float copy** (:func:`block_codes`): decode attention reads one block at a time, turns its 32
codes into float32 *code values* c_j (q8_0: the int8; q4_0: nibble - 8; q4_1: nibble; ...), and uses
``x~_j = d * c_j + m``. A dot product with a query block is then ``d * sum_j q_j c_j + m * sum_j q_j``: the scale is
applied once per block, not once per element (``kvref.attention.attend_quantized_rows``).

The functions marked ``@register_jitable`` are the spec: plain Python here, compiled by ``kvref/cpu/quant.py`` and
called from the CUDA kernels of ``kvref/cuda/quant.py``.

**How the same loops run fast when compiled** (``kvref/cpu/quant.py``: 13 GB/s on a Zen 5 core; on this project's
2-core EPYC VM, 5-8 GB/s of float32 input, about 15-18x ``gguf``'s NumPy for the compiled loop alone; BENCHMARKS.md):

* The block reductions are small primitives (:func:`abs_max`, :func:`signed_max`, :func:`min_max`) and so is
  :func:`roundf`. A serial ``max`` over 32 floats does not vectorise, so ``kvref/cpu/fast_math.py`` gives these four
  a compiled form for the CPU target only (one 32-lane vector reduction; LLVM's ``llvm.round``), tested equal to
  the spec: ``roundf`` on all 2**32 float32 values, the reductions on adversarial and random blocks.
* The codes of a block (:func:`store_codes`) and the decode of a block (:func:`block_codes`,
  :func:`dequantize_block`) get a compiled form too, in ``kvref/cpu/fast_quant.py``: one 32-lane vector pass of a
  few lines of LLVM IR each, tested byte-identical to the spec.
* The loops run over ``qs.size`` / ``x.size`` (run-time lengths) rather than the constant 32: LLVM fully unrolls a
  constant 32-trip loop into scalar code it then cannot vectorise (it cannot prove the float input and the byte
  output do not overlap), while a run-time length gets a vector loop with an overlap check.
* Codes are ``np.int32``: C's casts truncate toward zero, and so does ``np.int32``; 32-bit lanes are twice as many
  per vector as Python ``int``'s 64.
* The per-block functions are ``register_jitable(forceinline=True)``: LLVM inlines them (Numba's own IR inlining,
  ``inline="always"``, compiles far slower and numba-cuda does not support it for overloads), and
  ``kvref/cpu/quant.py`` compiles one loop per format with the format a constant, so every ``if fmt == ...`` folds.
"""

import math

import numpy as np
from numba.extending import register_jitable

from .errors import DTypeError, NonFiniteError, ShapeError
from .fp16 import f16_bits_to_f32, f32_to_f16_bits, widen

__all__ = ["BLOCK", "FORMATS", "GGML_TYPES", "block_codes", "dequantize", "dequantize_row", "quantize", "quantize_row",
           "row_bytes"]

#: elements per block, for every format here
BLOCK = 32

#: format name -> ggml's type number (``enum ggml_type``, also ``gguf.GGMLQuantizationType``); compiled code takes
#: the format as this integer
GGML_TYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8}
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 2, 3, 6, 7, 8


# ---------------------------------------------------------------------------------------------------------------
# Spec: small primitives
# ---------------------------------------------------------------------------------------------------------------
@register_jitable
def mul_rn(a, b):
    """a * b rounded to float32 on its own. (The CUDA backend overloads this with an unfused multiply, so that
    ``mul_rn(a, b) + c`` never becomes an FMA; see ``kvref/cuda/quant.py``.)"""
    return a * b


@register_jitable
def roundf(v):
    """C's ``roundf``: to the nearest integer, halves away from zero (float64 arithmetic, exact for float32 v).

    A float32 with ``|v| >= 2**23`` is already an integer, and inf and NaN round to themselves: those return v, which
    also keeps ``math.floor`` (an int in Python and an int64 in Numba) away from values an int64 cannot hold."""
    if math.fabs(v) < 8388608.0:  # 2**23
        return math.copysign(math.floor(math.fabs(v) + 0.5), v)
    return float(v)


#: the largest float32 whose reciprocal overflows: 1/d is finite exactly when |d| > 2**-128 (a subnormal)
INVERSE_LIMIT = np.float32(2.0 ** -128)


@register_jitable
def inverse(d):
    """``id = 1/d`` as ggml computes it (``d ? 1.0f/d : 0.0f``), except that kvref also gives 0 where 1/d overflows
    float32 (|d| <= 2**-128, a block whose largest |x| is below about 3.7e-37): ggml then multiplies by inf, which
    its integer casts turn into undefined values. That block's fp16 scale is 0, so it dequantizes to zeros whatever
    its codes; ``id = 0`` gives it the codes of an all-zero block."""
    if abs(d) <= INVERSE_LIMIT:
        return np.float32(0.0)
    return np.float32(1.0) / d


@register_jitable
def store_f16(blocks, offset, x):
    """Write float32 x as an fp16 little-endian pair of bytes at ``blocks[offset:offset + 2]``."""
    bits = int(f32_to_f16_bits(x))
    blocks[offset] = bits & 0xFF
    blocks[offset + 1] = bits >> 8


@register_jitable
def load_f16(blocks, offset):
    """The fp16 at ``blocks[offset:offset + 2]`` (little-endian) as float32."""
    return f16_bits_to_f32(np.uint16(int(blocks[offset]) | (int(blocks[offset + 1]) << 8)))


@register_jitable
def store_u32(blocks, offset, word):
    """Write the low 32 bits of the integer ``word`` as a little-endian uint32 at ``blocks[offset:offset + 4]``."""
    for k in range(4):
        blocks[offset + k] = (word >> (8 * k)) & 0xFF


@register_jitable
def load_u32(blocks, offset):
    """The little-endian uint32 at ``blocks[offset:offset + 4]``, as an int64 (compiled, ``int`` of a uint8 is a
    uint64, which Numba would unify with a plain integer into a float)."""
    return np.int64(int(blocks[offset]) | (int(blocks[offset + 1]) << 8) | (int(blocks[offset + 2]) << 16)
                    | (int(blocks[offset + 3]) << 24))


@register_jitable
def signed_byte(b):
    """A stored byte (uint8) read as int8: 0..127 stay, 128..255 become -128..-1."""
    return (int(b) ^ 0x80) - 0x80


@register_jitable
def layout(fmt):
    """Byte offsets inside a block: (offset of m or -1, offset of qh or -1, offset of qs, bytes per block)."""
    if fmt == Q8_0:
        return -1, -1, 2, 34
    if fmt == Q4_0:
        return -1, -1, 2, 18
    if fmt == Q4_1:
        return 2, -1, 4, 20
    if fmt == Q5_0:
        return -1, 2, 6, 22
    return 2, 4, 8, 24  # Q5_1


#: format name -> (block size in elements, bytes per block, bits per element), read off :func:`layout`
FORMATS = {name: (BLOCK, layout(GGML_TYPES[name])[3], layout(GGML_TYPES[name])[3] * 8 / BLOCK)
           for name in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")}


# ---------------------------------------------------------------------------------------------------------------
# Spec: one block
# ---------------------------------------------------------------------------------------------------------------
@register_jitable
def abs_max(x):
    """``max |x_j|`` over the 32 elements of a block (ggml: ``amax = MAX(amax, fabsf(v))`` from 0): the one-lane case
    of :func:`abs_max_lanes`."""
    return abs_max_lanes(x, 0, 1)


@register_jitable
def signed_max(x):
    """The x_j of largest |x_j|, sign kept: the first such j on ties. ggml starts from ``amax = max = 0`` and replaces
    only on a strictly larger |x_j|, so a block of zeros (of either sign) gives +0.0. The one-lane case of
    :func:`signed_max_lanes`."""
    return signed_max_lanes(x, 0, 1)


@register_jitable
def min_max(x):
    """(min x_j, max x_j) of a block; on ties (+0.0 and -0.0) the first one, as ggml's ``if (v < min) min = v``. The
    one-lane case of :func:`min_max_lanes`."""
    return min_max_lanes(x, 0, 1)


@register_jitable
def code(v, low, inv, bias, levels):
    """One 4- or 5-bit code: ggml's ``MIN(levels, (int8_t)((v - low) * id + bias))``. The cast truncates toward zero,
    and so does ``np.int32``; the product is :func:`mul_rn`, so that no FMA fuses it with ``+ bias``."""
    return min(levels, np.int32(mul_rn(v - low, inv) + bias))


@register_jitable
def code_params(fmt, amax, extreme, low, high):
    """The constants of a block's codes from its statistics (the formulas at the top): ``(d, low, bias, levels)``,
    where q8_0 needs ``amax``, q4_0 / q5_0 the signed ``extreme``, and q4_1 / q5_1 ``low`` and ``high``.
    ``levels`` is the largest code, ``bias`` what :func:`code` adds before truncating, ``low`` the affine minimum
    (0 for the other formats)."""
    zero = np.float32(0.0)
    if fmt == Q8_0:
        return amax / np.float32(127.0), zero, zero, np.int32(127)
    levels = np.int32(15 if (fmt == Q4_0 or fmt == Q4_1) else 31)  # the largest code
    if fmt == Q4_0 or fmt == Q5_0:  # symmetric: the signed extreme maps to the lowest code
        half = np.float32(8.0) if fmt == Q4_0 else np.float32(16.0)  # 8 or 16: the code of zero
        return extreme / -half, zero, half + np.float32(0.5), levels
    return (high - low) / np.float32(levels), low, np.float32(0.5), levels  # affine: min, max -> codes 0, levels


@register_jitable(forceinline=True)
def store_block(x, fmt, block, amax, extreme, low, high, lane, lanes):
    """Write a block from its statistics: the scale d (and the min m of the affine formats) as fp16 by lane 0, then
    the codes (:func:`store_codes_lanes`: lane ``lane`` of ``lanes`` writes its share; one lane writes them all)."""
    d, low, bias, levels = code_params(fmt, amax, extreme, low, high)
    if lane == 0:
        m_at = layout(fmt)[0]
        if m_at >= 0:
            store_f16(block, m_at, low)
        store_f16(block, 0, d)
    if lanes == 1:
        store_codes(x, fmt, block, low, inverse(d), bias, levels)
    else:
        store_codes_lanes(x, fmt, block, low, inverse(d), bias, levels, lane, lanes)


@register_jitable(forceinline=True)
def quantize_block(x, fmt, block):
    """Quantize the 32 floats ``x`` into the bytes ``block`` (formulas above): the statistic its format needs
    (:func:`abs_max`, :func:`signed_max` or :func:`min_max`), then the scale d (and the min m of the affine formats),
    stored as fp16, then the codes (:func:`store_codes`). One thread does the whole block;
    :func:`quantize_block_lanes` is the same with a warp's lanes sharing it.

    Codes are ``np.int32``: C's ``(int8_t)`` / ``(int)`` casts truncate toward zero, and so does ``np.int32(v)``
    (32-bit rather than Python's ``int`` keeps the compiled loop's SIMD lanes narrow; the values are tiny)."""
    amax = np.float32(0.0)
    extreme = np.float32(0.0)
    low = np.float32(0.0)
    high = np.float32(0.0)
    if fmt == Q8_0:
        amax = abs_max(x)
    elif fmt == Q4_0 or fmt == Q5_0:
        extreme = signed_max(x)
    else:
        low, high = min_max(x)
    store_block(x, fmt, block, amax, extreme, low, high, 0, 1)


@register_jitable(forceinline=True)
def store_codes(x, fmt, block, low, inv, bias, levels):
    """Write the codes of the 32 floats ``x`` into ``block`` (``inv = 1/d``, see :func:`inverse`), one thread:
    :func:`store_codes_lanes` with one lane. ``kvref/cpu/fast_quant.py`` compiles this for the CPU as one 32-lane
    vector pass, tested byte-identical."""
    store_codes_lanes(x, fmt, block, low, inv, bias, levels, 0, 1)


@register_jitable(forceinline=True)
def store_codes_lanes(x, fmt, block, low, inv, bias, levels, lane, lanes):
    """Lane ``lane`` of ``lanes`` writes its share of the codes of the 32 elements ``x`` (float32, or fp16 bits read
    through :func:`kvref.fp16.widen`)::

        q8_0        qs[j] = roundf(x_j * id), an int8                          (lane l: j = l, l + L, ...)
        q4_*, q5_*  c_j = :func:`code` (x_j, low, id, bias, levels); qs[j] = (c_j & 15) | (c_{j+16} & 15) << 4
                                                                               (lane l: bytes j = l, l + L, ... < 16)
        q5_*        bit j of qh (a little-endian uint32) = bit 4 of c_j        (each lane its bits, :func:`lane_or`)

    A lane computes every code it stores, so the lanes share nothing but the 5th bits."""
    qh_at, qs_at, block_bytes = layout(fmt)[1:]
    qs = block[qs_at:block_bytes]
    if fmt == Q8_0:
        for j in range(lane, qs.size, lanes):  # 32 codes
            qs[j] = np.int32(roundf(widen(x[j]) * inv)) & 0xFF  # the int8 code's two's-complement byte
        return
    for j in range(lane, qs.size, lanes):  # 16 bytes: element j in the low nibble, element j + 16 in the high one
        lo_code = code(widen(x[j]), low, inv, bias, levels)
        hi_code = code(widen(x[j + 16]), low, inv, bias, levels)
        qs[j] = (lo_code & 0x0F) | ((hi_code & 0x0F) << 4)
    if qh_at >= 0:  # q5_*: bit 4 of element j's code is bit j of qh
        high_bits = 0
        for j in range(lane, BLOCK, lanes):
            high_bits |= int(code(widen(x[j]), low, inv, bias, levels) >> 4) << j
        high_bits = lane_or(high_bits, lanes)
        if lane == 0:
            store_u32(block, qh_at, high_bits)


@register_jitable(forceinline=True)
def block_codes(block, fmt, codes):
    """Decode one block of bytes: fill ``codes[0:32]`` with the float32 code values c_j and return (d, m), so that
    element j is ``d * c_j + m`` (m = 0 for the symmetric formats). This is all attention needs of a block."""
    m_at, qh_at, qs_at, block_bytes = layout(fmt)
    d = load_f16(block, 0)
    m = load_f16(block, m_at) if m_at >= 0 else np.float32(0.0)
    qs = block[qs_at:block_bytes]
    if fmt == Q8_0:
        for j in range(qs.size):  # 32 int8 codes
            codes[j] = np.float32(signed_byte(qs[j]))
        return d, m
    high_bits = load_u32(block, qh_at) if qh_at >= 0 else 0
    zero = 0  # the code of 0.0: 8 (q4_0), 16 (q5_0), none for the affine formats
    if fmt == Q4_0:
        zero = 8
    elif fmt == Q5_0:
        zero = 16
    for j in range(qs.size):  # 16 bytes, each holding elements j and j + 16
        byte = int(qs[j])
        lo_code = (byte & 0x0F) | (((high_bits >> j) & 1) << 4)
        hi_code = (byte >> 4) | (((high_bits >> (j + 16)) & 1) << 4)
        codes[j] = np.float32(lo_code - zero)
        codes[j + 16] = np.float32(hi_code - zero)
    return d, m


@register_jitable(forceinline=True)
def dequantize_block(block, fmt, x, codes):
    """Decode the bytes ``block`` into the 32 floats ``x``: ``x~_j = d * c_j (+ m)`` in float32. ``codes`` is a
    32-float scratch; it may be ``x`` itself (each element is read before it is written). Compiled, a separate
    scratch is faster: the vectorised loop checks at run time that ``codes`` and ``x`` do not overlap, and runs its
    scalar version when they do."""
    d, m = block_codes(block, fmt, codes)
    if fmt == Q4_1 or fmt == Q5_1:
        for j in range(x.size):  # 32 elements
            x[j] = mul_rn(d, codes[j]) + m
    else:
        for j in range(x.size):
            x[j] = d * codes[j]


# ---------------------------------------------------------------------------------------------------------------
# Spec: one block by the lanes of a warp (the CUDA quantizers: kvref/cuda/quant.py, kvref/cuda/two_tier.py)
# ---------------------------------------------------------------------------------------------------------------
# A warp of L lanes (L divides 32) quantizes one block: lane l reads elements l, l + L, l + 2L, ... The statistics
# are reductions over the lanes (lane_max, lane_min, lane_or below: the identity here and on the CPU, where one lane
# does everything; warp shuffles on a GPU, ``kvref/cuda/__init__.py``). Max and min give the same value in any order,
# up to the sign of a zero; which element wins a tie (q4_0's first x_j of largest |x_j|, the first of a tied
# +0.0 / -0.0 minimum) is decided by the smallest index, itself a lane_min, and that element is read from x. The
# one-thread statistics (abs_max, signed_max, min_max above) are these with one lane.

@register_jitable
def lane_max(x, lanes):
    """max of ``x`` over the ``lanes`` lanes sharing a block (every lane gets it). The identity with one lane; a
    warp-shuffle butterfly in CUDA kernels (``kvref/cuda/__init__.py``)."""
    return x


@register_jitable
def lane_min(x, lanes):
    """min of ``x`` over the lanes sharing a block (as :func:`lane_max`)."""
    return x


@register_jitable
def lane_or(x, lanes):
    """Bitwise or of the integer ``x`` over the lanes sharing a block (as :func:`lane_max`)."""
    return x


@register_jitable
def first_index(x, value, magnitude, lane, lanes):
    """The smallest j of this lane's elements (j = lane, lane + lanes, ...) with ``x_j == value`` (``|x_j| == value``
    if ``magnitude``), or 32 if there is none. ``lane_min`` of it is the block's first such j."""
    for j in range(lane, BLOCK, lanes):
        v = widen(x[j])
        if (abs(v) if magnitude else v) == value:
            return j
    return BLOCK


@register_jitable
def abs_max_lanes(x, lane, lanes):
    """``amax = max |x_j|``, from 0: each lane over its elements, then :func:`lane_max`."""
    amax = np.float32(0.0)
    for j in range(lane, BLOCK, lanes):
        amax = max(amax, abs(widen(x[j])))
    return lane_max(amax, lanes)


@register_jitable
def signed_max_lanes(x, lane, lanes):
    """q4_0 / q5_0's extreme: ``x_J``, J the first j with ``|x_j| = amax`` (:func:`first_index`, then
    :func:`lane_min`), or +0.0 when amax = 0 (ggml never leaves its start value then)."""
    amax = abs_max_lanes(x, lane, lanes)
    if not amax > 0:
        return np.float32(0.0)
    return widen(x[lane_min(first_index(x, amax, True, lane, lanes), lanes)])


@register_jitable
def min_max_lanes(x, lane, lanes):
    """q4_1 / q5_1's (low, high): the min and max over each lane's elements, then :func:`lane_min` /
    :func:`lane_max`; each is then replaced by ``x_J``, J the first j equal to it, so that of a +0.0 / -0.0 tie the
    first is kept (the lanes' reductions may disagree on the sign of a zero: their results are only compared,
    never stored). A NaN in ``x[0]`` (which kvref's callers reject) sticks, as in a serial ``min``."""
    low = widen(x[lane])
    high = low
    for j in range(lane + lanes, BLOCK, lanes):
        v = widen(x[j])
        low = min(low, v)
        high = max(high, v)
    low = lane_min(low, lanes)
    high = lane_max(high, lanes)
    first_low = lane_min(first_index(x, low, False, lane, lanes), lanes)
    first_high = lane_min(first_index(x, high, False, lane, lanes), lanes)
    if first_low < BLOCK:
        low = widen(x[first_low])
    if first_high < BLOCK:
        high = widen(x[first_high])
    return low, high


@register_jitable(forceinline=True)
def quantize_block_lanes(x, fmt, block, lane, lanes):
    """Lane ``lane`` of ``lanes`` quantizes its share of one block (``x``: 32 elements, float32 or fp16 bits) into
    ``block``: the statistic its format needs (:func:`abs_max_lanes`, :func:`signed_max_lanes` or
    :func:`min_max_lanes`), then :func:`store_block` (lane 0 stores the scales, each lane its codes). Together the
    lanes write exactly :func:`quantize_block`'s bytes."""
    amax = np.float32(0.0)
    extreme = np.float32(0.0)
    low = np.float32(0.0)
    high = np.float32(0.0)
    if fmt == Q8_0:
        amax = abs_max_lanes(x, lane, lanes)
    elif fmt == Q4_0 or fmt == Q5_0:
        extreme = signed_max_lanes(x, lane, lanes)
    else:
        low, high = min_max_lanes(x, lane, lanes)
    store_block(x, fmt, block, amax, extreme, low, high, lane, lanes)


# ---------------------------------------------------------------------------------------------------------------
# Spec: rows of blocks
# ---------------------------------------------------------------------------------------------------------------
@register_jitable(forceinline=True)
def quantize_one(x, fmt, blocks, r, b, lane, lanes):
    """Quantize block b of row r: ``x[r, 32b:32b+32]`` -> ``blocks[r, b*B:(b+1)*B]`` (B bytes per block), by one
    thread (``lanes == 1``) or as lane ``lane`` of the ``lanes`` that share the block (:func:`quantize_block_lanes`)."""
    block_bytes = layout(fmt)[3]
    if lanes == 1:
        quantize_block(x[r, b * BLOCK:(b + 1) * BLOCK], fmt, blocks[r, b * block_bytes:(b + 1) * block_bytes])
    else:
        quantize_block_lanes(x[r, b * BLOCK:(b + 1) * BLOCK], fmt, blocks[r, b * block_bytes:(b + 1) * block_bytes],
                             lane, lanes)


@register_jitable(forceinline=True)
def quantize_rows(x, fmt, blocks):
    """x: (rows, n) float32 with n % 32 == 0 -> blocks: (rows, n/32 * B) uint8, ggml's blocks row by row."""
    for r in range(x.shape[0]):
        for b in range(x.shape[1] // BLOCK):
            quantize_one(x, fmt, blocks, r, b, 0, 1)


@register_jitable(forceinline=True)
def dequantize_one(blocks, fmt, x, r, b, codes):
    """Dequantize block b of row r into ``x[r, 32b:32b+32]``."""
    block_bytes = layout(fmt)[3]
    dequantize_block(blocks[r, b * block_bytes:(b + 1) * block_bytes], fmt, x[r, b * BLOCK:(b + 1) * BLOCK], codes)


@register_jitable(forceinline=True)
def dequantize_rows(blocks, fmt, x):
    """blocks: (rows, n/32 * B) uint8 -> x: (rows, n) float32."""
    codes = np.empty(BLOCK, np.float32)
    for r in range(x.shape[0]):
        for b in range(x.shape[1] // BLOCK):
            dequantize_one(blocks, fmt, x, r, b, codes)


# ---------------------------------------------------------------------------------------------------------------
# Spec: the row codec (one head row of a cache: its head_dim elements <-> its blocks)
# ---------------------------------------------------------------------------------------------------------------
@register_jitable
def quantize_row(row, fmt, blocks, scratch, lane, lanes):
    """Quantize one head row (head_dim elements, float32 or fp16 bits) into its ggml blocks, 32 elements at a time.
    The two-tier cache stores a token this way. One lane (``lanes == 1``, the spec and the CPU) widens each block to
    float32 in ``scratch`` (32 floats) and runs :func:`quantize_block`; the L lanes of a CUDA warp share each block
    (:func:`quantize_block_lanes`, which reads the row itself; ``scratch`` is unused)."""
    block_bytes = layout(fmt)[3]
    for b in range(row.shape[0] // BLOCK):
        if lanes == 1:
            for k in range(BLOCK):
                scratch[k] = widen(row[b * BLOCK + k])
            quantize_block(scratch, fmt, blocks[b * block_bytes:(b + 1) * block_bytes])
        else:
            quantize_block_lanes(row[b * BLOCK:(b + 1) * BLOCK], fmt, blocks[b * block_bytes:(b + 1) * block_bytes],
                                 lane, lanes)


@register_jitable(forceinline=True)
def dequantize_row(row, fmt, out, codes):
    """Decode one quantized row (its ggml blocks) into ``out`` (head_dim floats), block by block:
    ``x~_j = d * c_j (+ m)`` (``codes``: 32 floats of scratch for one block's codes). Attention decodes a few rows at
    a time into a scratch that stays in L1: there is never a float copy of the store. (It returns nothing: CUDA
    device functions cannot return a view.)"""
    block_bytes = layout(fmt)[3]
    for b in range(out.shape[0] // BLOCK):
        dequantize_block(row[b * block_bytes:(b + 1) * block_bytes], fmt, out[b * BLOCK:(b + 1) * BLOCK], codes)


# ---------------------------------------------------------------------------------------------------------------
# Public API (host): validate, then run a backend's compiled rows
# ---------------------------------------------------------------------------------------------------------------
def format_id(fmt):
    """ggml type number of format name ``fmt``; raises DTypeError for an unknown name."""
    if fmt not in GGML_TYPES:
        raise DTypeError("fmt", f"one of {sorted(FORMATS)}", repr(fmt))
    return GGML_TYPES[fmt]


def row_bytes(n, fmt):
    """Bytes of one row of n elements (n a multiple of 32) in format ``fmt``: n / 32 * bytes per block."""
    format_id(fmt)
    if n % BLOCK:
        raise ShapeError("n", "a multiple of 32", n)
    return n // BLOCK * FORMATS[fmt][1]


def check_finite(name, a):
    """Raise NonFiniteError naming ``name`` and the first NaN/inf index unless every element of a is finite.

    Fast path: a finite sum (one vectorised pass, no temporary array) proves every element finite; a NaN or inf
    always makes the sum non-finite. Only a non-finite sum, which finite values can also give by overflowing, takes
    the exact element-wise test.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # large finite values may overflow the sum: not an error
        if math.isfinite(float(np.sum(a))):
            return
    finite = np.isfinite(a)
    if not finite.all():
        index = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise NonFiniteError(name, "finite values (ggml formats cannot hold NaN or inf)",
                             f"{a[index]!r} at index {index}")


def _module(backend):
    from .backends import backend_ops

    return backend_ops("quant", backend)


def quantize(x, fmt, backend="cpu"):
    """Quantize float32 ``x`` (last dimension a multiple of 32) into ggml blocks: uint8 of shape
    ``x.shape[:-1] + (x.shape[-1] / 32 * bytes_per_block,)``, byte-identical to ``gguf.quants.quantize``.

    backend: "python" (the spec), "cpu" (numba.njit) or "cuda". Raises NonFiniteError for NaN/inf input.
    """
    fid = format_id(fmt)
    if not isinstance(x, np.ndarray):
        raise DTypeError("x", "a NumPy array", type(x).__name__)
    if x.dtype != np.float32:
        raise DTypeError("x", "dtype float32", x.dtype.name)
    if x.ndim < 1 or x.shape[-1] % BLOCK:
        raise ShapeError("x", "a last dimension that is a multiple of 32", x.shape)
    check_finite("x", x)
    rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    blocks = np.empty((rows.shape[0], row_bytes(x.shape[-1], fmt)), np.uint8)
    _module(backend).quantize_rows(rows, fid, blocks)
    return blocks.reshape(x.shape[:-1] + (blocks.shape[1],))


def dequantize(blocks, fmt, shape, backend="cpu"):
    """ggml blocks (uint8, rows of ``shape[-1] / 32`` blocks) -> float32 array of ``shape``, equal to
    ``gguf.quants.dequantize``."""
    fid = format_id(fmt)
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_)) and n >= 0 for n in shape):
        raise ShapeError("shape", "a tuple of integers >= 0", repr(shape))
    shape = tuple(int(n) for n in shape)
    if not isinstance(blocks, np.ndarray) or blocks.dtype != np.uint8:
        raise DTypeError("blocks", "a uint8 NumPy array", getattr(blocks, "dtype", type(blocks).__name__))
    if len(shape) < 1 or shape[-1] % BLOCK:
        raise ShapeError("shape", "a last dimension that is a multiple of 32", shape)
    expected = shape[:-1] + (row_bytes(shape[-1], fmt),)
    if blocks.size != int(np.prod(expected)):
        raise ShapeError("blocks", f"{int(np.prod(expected))} bytes (shape {expected})", blocks.shape)
    rows = np.ascontiguousarray(blocks.reshape(-1, expected[-1]))
    x = np.empty((rows.shape[0], shape[-1]), np.float32)
    _module(backend).dequantize_rows(rows, fid, x)
    return x.reshape(shape)
