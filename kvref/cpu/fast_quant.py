"""A faster compiled form of the quantized block decode and encode, for the CPU target only.

As in ``fast_math.py``, each function here is an ``@overload`` registered for target "cpu", which Numba prefers over
the generic one ``register_jitable`` made; plain Python and CUDA keep running the spec. Overloaded:

* ``quant.dequantize_block(block, fmt, x, codes)``: what ``quant.dequantize_row`` calls for each block of a stored
  row, so two-tier attention (``score_quantized_tile`` / ``accumulate_quantized_rows`` decode each row once into a
  scratch row used by all G heads) and ``quant.dequantize`` (``dequantize_rows``) both get it.
* ``quant.block_codes(block, fmt, codes)``: the same code vector, stored into ``codes``, and (d, m).
* ``quant.store_codes(x, fmt, block, low, inv, bias, levels)``: the quantizers' codes of one block (see the end of
  this file), what ``quant.store_block`` calls with one lane (``quant.quantize_block``'s path) after it has stored
  the scale.

**Why.** The spec's loops over a 32-code block compile to scalar code: after inlining, the trip count is the
constant 32 and LLVM fully unrolls them into one ``vcvtsi2ss`` per element (192 per row of 128, on top of the byte
loads and the nibble and bit shuffling). Here each block is ten-odd lines of LLVM vector IR:

    q8_0           load <32 x i8>, sext to <32 x i32>
    q4_0 / q4_1    load <16 x i8>; low nibbles (and 15) ++ high nibbles (lshr 4) -> <32 x i8>, zext to <32 x i32>
    q5_0 / q5_1    as q4, or (qh & (1 << j) ? 16 : 0) into lane j (qh: the block's little-endian u32)
    q4_0 / q5_0    sub 8 / 16
    all            sitofp -> <32 x float>; fmul by the splatted scale d; (q4_1 / q5_1) fadd the splatted min m;
                   one <32 x float> store

which becomes packed instructions (``vpmovsxbd`` / ``vpmovzxbd``, ``vcvtdq2ps``, ``vmulps``; tested).
``../shared/reference/grouped_attention_facts.md`` ("Quantized rows") measured this decode at 14 cycles per row for
q8_0 and 16 for q4_0, against 45-61 for the spec's loops. Measured here (a shared 2-core AMD EPYC at about 3 GHz, one
thread, head_dim 128; best of several, noisy to about +-30%), a row decoded into an L1 scratch with the format a
run-time argument, as attention does: 130-150 ns -> 12-20 ns for q8_0, 145-150 -> 14-22 for q4_0, 145-234 -> 15-24
for q4_1, 148-181 -> 17-26 for q5_0, 145-147 -> 21-30 for q5_1 (about 400-450 -> 36-90 cycles); one two-tier decode
step of one layer at 65,536 keys (32 query heads, 8 KV heads): q8_0 178-228 ms -> 50-53 ms, q4_0 203-289 ms ->
54-56 ms, where the flat fp16 cache takes 38-48 ms. ``quant.dequantize`` of (65536, 128) is bound by writing its 32
MiB output and gains less (q8_0 49-66 -> 29-41 ns per row into a preallocated array). Decoding fused into the
attention FMA loops was measured slower and is not done.

**Bit-identical to the spec.** The scales are read by the spec's own ``load_f16`` (whose fp16 -> f32 is
``fast_math``'s ``fpext``, identical to the spec on all 65,536 patterns); each code value is an exact small integer
in float32, as the spec's ``np.float32(code)``; then ``x = d * c`` is one float32 multiply and ``x = d * c + m`` one
multiply and one add, each rounded on its own (the spec's ``mul_rn``): the IR has a separate ``fmul`` and ``fadd``
with no fast-math flags (``contract`` would allow an FMA), and the overloads are compiled with ``fastmath=False`` so
that a caller's fast-math (attention's ``ATTENTION_FASTMATH``) is not inherited and does not add flags to them.
(The product ``d * c`` of an fp16 and an integer of at most 8 bits is exact in float32 anyway, so a fused add would
round the same; the flags keep the IR honest rather than lucky.) Tested bit for bit against the plain-Python spec on
all five formats: every byte value in every position, every code, signed zeros, zero/subnormal/inf/NaN scales and
mins (NaN matches NaN), random blocks; through ``quant.dequantize`` and a compiled ``dequantize_row``.

**Differences that are not values.** The overload of ``dequantize_block`` leaves ``codes`` untouched (the spec uses
it as scratch; no caller reads it afterwards), and so ``codes`` may be anything, ``x`` itself included. They apply
to C-contiguous 1-D blocks (uint8) and outputs (float32), which every slice the spec takes is; other layouts keep
the spec. Like the spec's compiled loops (Numba does no bounds checks), they assume a whole block and 32 outputs.
"""

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

from .. import quant
from .fast_math import _call, _is_block

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()
_LANES = quant.BLOCK
_NO_FLAGS = {"fastmath": False, "forceinline": True}  # explicit: a caller's fast-math is not inherited


def _is_bytes(block):
    """A C-contiguous 1-D uint8 array: the bytes of a block, loadable as one vector."""
    return isinstance(block, types.Array) and block.dtype == types.uint8 and block.layout == "C" and block.ndim == 1


def _vector(element, values):
    return ir.Constant(ir.VectorType(element, len(values)), [ir.Constant(element, v) for v in values])


def _splat(builder, value, lanes=_LANES):
    """<lanes x T> with every lane = value."""
    vtype = ir.VectorType(value.type, lanes)
    undef = ir.Constant(vtype, ir.Undefined)
    lane0 = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(lane0, undef, _vector(_I32, [0] * lanes))


def _code_vector(builder, fmt, data, qh):
    """The 32 code values of a block as <32 x float>: ``data`` is an i8* to the block's first byte, ``qh`` its
    5th-bit word as i32 (q5_* only)."""
    _, qh_at, qs_at, _ = quant.layout(fmt)
    qs = builder.gep(data, [ir.Constant(_I32, qs_at)])
    if fmt == quant.Q8_0:
        raw = builder.load(builder.bitcast(qs, ir.VectorType(_I8, _LANES).as_pointer()), align=1)
        codes = builder.sext(raw, ir.VectorType(_I32, _LANES))  # int8 codes
    else:
        half = _LANES // 2
        raw = builder.load(builder.bitcast(qs, ir.VectorType(_I8, half).as_pointer()), align=1)
        low = builder.and_(raw, _vector(_I8, [0x0F] * half))  # element j
        high = builder.lshr(raw, _vector(_I8, [4] * half))  # element j + 16
        nibbles = builder.shuffle_vector(low, high, _vector(_I32, list(range(_LANES))))
        codes = builder.zext(nibbles, ir.VectorType(_I32, _LANES))
        if qh_at >= 0:  # bit j of qh is bit 4 of element j
            bit = builder.and_(_splat(builder, qh), _vector(_I32, [1 << j for j in range(_LANES)]))
            is_set = builder.icmp_unsigned("!=", bit, _vector(_I32, [0] * _LANES))
            fifth = builder.select(is_set, _vector(_I32, [16] * _LANES), _vector(_I32, [0] * _LANES))
            codes = builder.or_(codes, fifth)
        zero = {quant.Q4_0: 8, quant.Q5_0: 16}.get(fmt, 0)
        if zero:
            codes = builder.sub(codes, _vector(_I32, [zero] * _LANES))
    return builder.sitofp(codes, ir.VectorType(_F32, _LANES))  # exact: |c| <= 128


def _as_i32(builder, value):
    width = value.type.width
    if width > 32:
        return builder.trunc(value, _I32)
    if width < 32:
        return builder.zext(value, _I32)
    return value


def _decode_intrinsic(fmt, scaled):
    """An intrinsic ``(block, out, d, m, qh)``: with ``scaled``, ``out[0:32] = d * c (+ m)`` (a separate fmul and
    fadd, no fast-math flags); otherwise ``out[0:32] = c``, the code values."""
    affine = fmt in (quant.Q4_1, quant.Q5_1)

    @intrinsic
    def decode(typingctx, block, out, d, m, qh):
        if not (_is_bytes(block) and _is_block(out) and d == types.float32 and m == types.float32
                and isinstance(qh, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            block_ty, out_ty = signature.args[:2]
            data = context.make_array(block_ty)(context, builder, args[0]).data
            target = context.make_array(out_ty)(context, builder, args[1]).data
            values = _code_vector(builder, fmt, data, _as_i32(builder, args[4]))
            if scaled:
                values = builder.fmul(_splat(builder, args[2]), values)  # d * c, rounded on its own
                if affine:
                    values = builder.fadd(values, _splat(builder, args[3]))  # + m, rounded on its own
            builder.store(values, builder.bitcast(target, ir.VectorType(_F32, _LANES).as_pointer()), align=4)
            return context.get_dummy_value()

        return types.none(block, out, d, m, qh), codegen

    return decode


_FORMATS = (quant.Q8_0, quant.Q4_0, quant.Q4_1, quant.Q5_0, quant.Q5_1)
_DECODE = {fmt: _decode_intrinsic(fmt, scaled=True) for fmt in _FORMATS}
_CODES = {fmt: _decode_intrinsic(fmt, scaled=False) for fmt in _FORMATS}
_decode_q8_0, _decode_q4_0, _decode_q4_1, _decode_q5_0, _decode_q5_1 = (_DECODE[f] for f in _FORMATS)
_codes_q8_0, _codes_q4_0, _codes_q4_1, _codes_q5_0, _codes_q5_1 = (_CODES[f] for f in _FORMATS)
Q4_0, Q4_1, Q5_0, Q8_0 = quant.Q4_0, quant.Q4_1, quant.Q5_0, quant.Q8_0
ZERO = np.float32(0.0)


@overload(quant.dequantize_block, target="cpu", jit_options=_NO_FLAGS)
def _dequantize_block_cpu(block, fmt, x, codes):
    if not (_is_bytes(block) and _is_block(x)):
        return None

    def impl(block, fmt, x, codes):  # the format tests and byte offsets of quant.layout; one vector decode each
        d = quant.load_f16(block, 0)
        if fmt == Q8_0:
            _decode_q8_0(block, x, d, ZERO, 0)
        elif fmt == Q4_0:
            _decode_q4_0(block, x, d, ZERO, 0)
        elif fmt == Q4_1:
            _decode_q4_1(block, x, d, quant.load_f16(block, 2), 0)
        elif fmt == Q5_0:
            _decode_q5_0(block, x, d, ZERO, quant.load_u32(block, 2))
        else:  # Q5_1, as quant.layout
            _decode_q5_1(block, x, d, quant.load_f16(block, 2), quant.load_u32(block, 4))

    return impl


@overload(quant.block_codes, target="cpu", jit_options=_NO_FLAGS)
def _block_codes_cpu(block, fmt, codes):
    if not (_is_bytes(block) and _is_block(codes)):
        return None

    def impl(block, fmt, codes):
        d = quant.load_f16(block, 0)
        if fmt == Q8_0:
            _codes_q8_0(block, codes, d, ZERO, 0)
            return d, ZERO
        if fmt == Q4_0:
            _codes_q4_0(block, codes, d, ZERO, 0)
            return d, ZERO
        if fmt == Q4_1:
            _codes_q4_1(block, codes, d, ZERO, 0)
            return d, quant.load_f16(block, 2)
        if fmt == Q5_0:
            _codes_q5_0(block, codes, d, ZERO, quant.load_u32(block, 2))
            return d, ZERO
        _codes_q5_1(block, codes, d, ZERO, quant.load_u32(block, 4))  # Q5_1, as quant.layout
        return d, quant.load_f16(block, 2)

    return impl


# ---------------------------------------------------------------------------------------------------------------
# Quantize: the codes of one block (quant.store_codes) as one vector pass
# ---------------------------------------------------------------------------------------------------------------
# The spec's code loops compile to scalar code for the same reason as its decode (a constant 32-trip loop, fully
# unrolled: one cvttss2si per element). Measured on this 2-core EPYC (one thread, (16384, 1024) float32, best of 7):
# the compiled quantize went from 12.6 to 8.4-9.7 ms for q8_0, 14.8 to 11.5 for q4_0 and 23.2 to 11.6-13.5 for q5_0,
# about 16 ns (q8_0) to 34 ns (q5_1) per block even from L1: the rest is one block's dependent chain (reduce -> two
# divisions -> fp16 -> encode). Byte-identical to the spec on adversarial blocks (tests/test_fast_quant.py): the
# fsub, fmul and fadd are separate IR instructions without fast-math flags, as the spec's mul_rn requires.
def _encode_intrinsic(fmt):
    """An intrinsic ``(x, block, low, inv, bias, levels) -> qh``: writes the ``qs`` bytes of ``quant.store_codes`` for
    the 32 floats ``x`` into ``block`` and returns the q5_* ``qh`` word (0 for the other formats).

        q8_0     fmul x, id; llvm.round (C's roundf); fptosi -> i32; trunc -> i8; one <32 x i8> store
        q4/q5    fsub x, low; fmul id; fadd bias (each rounded on its own, no fast-math flags, so no FMA);
                 fptosi -> i32 (truncates toward zero, as np.int32); smin levels: the codes c_j;
                 (c_j & 15) | (c_{j+16} & 15) << 4 -> one <16 x i8> store;
                 qh = or over j of ((c_j >> 4) << j), the spec's ``int(c >> 4) << j`` (its low 32 bits)"""
    qh_at, qs_at = quant.layout(fmt)[1:3]

    @intrinsic
    def encode(typingctx, x, block, low, inv, bias, levels):
        if not (_is_block(x) and _is_bytes(block) and low == types.float32 and inv == types.float32
                and bias == types.float32 and isinstance(levels, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            x_ty, block_ty = signature.args[:2]
            source = context.make_array(x_ty)(context, builder, args[0]).data
            data = context.make_array(block_ty)(context, builder, args[1]).data
            qs = builder.gep(data, [ir.Constant(_I32, qs_at)])
            v = builder.load(builder.bitcast(source, ir.VectorType(_F32, _LANES).as_pointer()), align=4)
            i32x32 = ir.VectorType(_I32, _LANES)
            if fmt == quant.Q8_0:
                scaled = builder.fmul(v, _splat(builder, args[3]))
                rounded = _call(builder, "llvm.round.v32f32", scaled.type, [scaled])
                codes = builder.trunc(builder.fptosi(rounded, i32x32), ir.VectorType(_I8, _LANES))
                builder.store(codes, builder.bitcast(qs, codes.type.as_pointer()), align=1)
                return ir.Constant(ir.IntType(64), 0)
            shifted = builder.fsub(v, _splat(builder, args[2]))
            scaled = builder.fadd(builder.fmul(shifted, _splat(builder, args[3])), _splat(builder, args[4]))
            codes = builder.fptosi(scaled, i32x32)
            top = _splat(builder, _as_i32(builder, args[5]))
            codes = builder.select(builder.icmp_signed("<", codes, top), codes, top)  # min(levels, c)
            nibbles = builder.and_(codes, _vector(_I32, [0x0F] * _LANES))
            half = _LANES // 2
            low_half = builder.shuffle_vector(nibbles, nibbles, _vector(_I32, list(range(half))))
            high_half = builder.shuffle_vector(nibbles, nibbles, _vector(_I32, list(range(half, _LANES))))
            packed = builder.or_(low_half, builder.shl(high_half, _vector(_I32, [4] * half)))
            packed = builder.trunc(packed, ir.VectorType(_I8, half))
            builder.store(packed, builder.bitcast(qs, packed.type.as_pointer()), align=1)
            if qh_at < 0:
                return ir.Constant(ir.IntType(64), 0)
            fifth = builder.shl(builder.ashr(codes, _vector(_I32, [4] * _LANES)), _vector(_I32, list(range(_LANES))))
            word = _call(builder, "llvm.vector.reduce.or.v32i32", _I32, [fifth])
            return builder.zext(word, ir.IntType(64))

        return types.int64(x, block, low, inv, bias, levels), codegen

    return encode


_ENCODE = {fmt: _encode_intrinsic(fmt) for fmt in _FORMATS}
_encode_q8_0, _encode_q4_0, _encode_q4_1, _encode_q5_0, _encode_q5_1 = (_ENCODE[f] for f in _FORMATS)


@overload(quant.store_codes, target="cpu", jit_options=_NO_FLAGS)
def _store_codes_cpu(x, fmt, block, low, inv, bias, levels):
    if not (_is_block(x) and _is_bytes(block)):
        return None

    def impl(x, fmt, block, low, inv, bias, levels):  # one vector pass each; qh at quant.layout's offsets
        if fmt == Q8_0:
            _encode_q8_0(x, block, low, inv, bias, levels)
        elif fmt == Q4_0:
            _encode_q4_0(x, block, low, inv, bias, levels)
        elif fmt == Q4_1:
            _encode_q4_1(x, block, low, inv, bias, levels)
        elif fmt == Q5_0:
            quant.store_u32(block, 2, _encode_q5_0(x, block, low, inv, bias, levels))
        else:  # Q5_1
            quant.store_u32(block, 4, _encode_q5_1(x, block, low, inv, bias, levels))

    return impl
