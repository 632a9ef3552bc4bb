"""Faster compiled forms of seven spec primitives, for the CPU target only.

Numba resolves a call to a spec function through its overloads, preferring one registered for the current target
("cpu") over the generic one that ``register_jitable`` made. So plain Python and CUDA keep running the spec, and only
``numba.njit`` code gets these:

* ``f16_bits_to_f32``: the spec decodes sign/exponent/mantissa by hand; here it is LLVM's ``fpext half -> float``,
  one ``vcvtph2ps`` instruction (F16C/AVX-512). Identical on all 65,536 bit patterns (tested; NaN stays NaN).
* ``f32_to_f16_bits``: the spec rounds by hand with frexp/ldexp; here it is LLVM's ``fptrunc float -> half``
  (``vcvtps2ph``), IEEE round to nearest even, the same rounding. NaN is mapped to the spec's 0x7E00 explicitly.
  Identical to the spec and to NumPy on every fp16 value, every tie and over a million random floats (tested).
* ``exp_f32``: the spec calls libm ``exp``, which does not vectorise (no SVML here). Here it is a branch-free
  range reduction plus a degree-7 polynomial, which LLVM vectorises:

      exp(x) = 2**n * exp(r),   n = round(x / ln 2),   r = x - n ln 2 in [-ln2/2, ln2/2]

  Relative error <= 2e-7 against float64 exp for x in [-87, 0] (tested); x < -87 (including -inf) gives 0 and
  NaN gives NaN. Attention only ever calls it with x <= 0 or NaN (a NaN or infinite score).
* ``quant.roundf`` (float32 argument): the spec is ``copysign(floor(|v| + 0.5), v)`` in float64; here it is LLVM's
  ``llvm.round.f32`` (round half away from zero, C's ``roundf``), which vectorises. Identical to the spec on all
  2**32 float32 bit patterns, signed zeros and NaN included (tested).
* ``quant.abs_max``, ``quant.signed_max``, ``quant.min_max``, the block reductions of the quantizers: the spec is a
  serial loop over 32 elements, which LLVM cannot vectorise (a float max is not associative for it). Here each is
  one 32-lane vector load and an ``llvm.vector.reduce.fmax/fmin``. A max of floats is exact in any order, so only
  the spec's tie rules need care, and they are kept: which lane is "first" among equal values is looked up with a
  vector compare and ``cttz`` (so +0.0 vs -0.0 ties pick the same element as the spec), NaN lanes are ignored as
  the spec's ``max``/``min``/``>`` ignore them, a NaN in ``x[0]`` sticks in ``min_max`` as in the spec. Tested equal
  to the spec on adversarial blocks (ties, signed zeros, NaN and inf in every lane, subnormals) and random ones.
  These apply to C-contiguous 1-D float32 arrays (every block the spec slices is one); other layouts keep the spec.
  Like the spec's compiled loops (Numba does no bounds checks), they assume at least 32 elements.
"""

import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, lower_builtin, overload, type_callable

from .. import quant
from .. import attention
from ..attention import exp_f32, local_array
from ..lowering import literal_shape, lower_local_array
from ..fp16 import f16_bits_to_f32, f32_to_f16_bits


@intrinsic
def _half_bits_to_float(typingctx, bits):
    """uint16 bit pattern -> float32 via LLVM ``bitcast i16 -> half; fpext half -> float``."""
    if not (isinstance(bits, types.Integer) and bits.bitwidth == 16):
        return None

    def codegen(context, builder, signature, args):
        half = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _float_to_half_bits(typingctx, x):
    """float32 -> fp16 bit pattern (uint16) via LLVM ``fptrunc float -> half; bitcast half -> i16``."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(half, ir.IntType(16))

    return types.uint16(x), codegen


@intrinsic
def _int_bits_to_float(typingctx, bits):
    """int32 bit pattern -> float32 (a reinterpretation, no conversion)."""
    if not (isinstance(bits, types.Integer) and bits.bitwidth == 32):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(bits), codegen


@overload(f16_bits_to_f32, target="cpu")
def _f16_bits_to_f32_cpu(bits):
    if isinstance(bits, types.Integer) and bits.bitwidth == 16:
        return lambda bits: _half_bits_to_float(bits)


@overload(f32_to_f16_bits, target="cpu")
def _f32_to_f16_bits_cpu(x):
    if x == types.float32:  # (a float64 argument keeps the spec: narrowing it via float32 would round twice)
        def impl(x):
            if x != x:  # NaN: the spec's canonical quiet NaN (LLVM would keep payload bits)
                return np.uint16(0x7E00)
            return _float_to_half_bits(x)

        return impl


LOG2E = np.float32(1.4426950408889634)
LN2 = 0.6931471805599453  # the reduction r = x - n ln 2 runs in float64, so fast-math reordering cannot spoil it
# Taylor coefficients 1/k! for exp(r) on |r| <= ln2/2 (degree 7: truncation error about 1e-8 relative)
C2 = np.float32(1.0 / 2)
C3 = np.float32(1.0 / 6)
C4 = np.float32(1.0 / 24)
C5 = np.float32(1.0 / 120)
C6 = np.float32(1.0 / 720)
C7 = np.float32(1.0 / 5040)
LOWEST = np.float32(-87.0)


@overload(exp_f32, target="cpu")
def _exp_f32_cpu(x):
    def impl(x):
        xf = np.float32(x)
        clamped = max(xf, LOWEST)  # also maps -inf to -87
        n = np.float32(np.floor(clamped * LOG2E + np.float32(0.5)))
        r = np.float32(np.float64(clamped) - np.float64(n) * LN2)  # exact enough in float64, even under fast-math
        p = np.float32(1.0) + r * (np.float32(1.0) + r * (C2 + r * (C3 + r * (C4 + r * (C5 + r * (C6 + r * C7))))))
        scale = _int_bits_to_float(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))
        if xf != xf:  # NaN stays NaN, as in the spec (a corrupt score must not vanish)
            return xf
        return p * scale if xf >= LOWEST else np.float32(0.0)

    return impl


# ---------------------------------------------------------------------------------------------------------------
# Block reductions of the quantizers (kvref/quant.py): one 32-wide vector instead of a serial loop
# ---------------------------------------------------------------------------------------------------------------
_I32 = ir.IntType(32)
_F32 = ir.FloatType()
_V32 = ir.VectorType(_F32, quant.BLOCK)


def _is_block(x):
    """A C-contiguous float32 array: its first 32 elements can be loaded as one vector."""
    return isinstance(x, types.Array) and x.dtype == types.float32 and x.layout == "C" and x.ndim == 1


def _load_block(context, builder, aryty, value):
    """<32 x float> from the start of a C-contiguous float32 array."""
    data = context.make_array(aryty)(context, builder, value).data
    return builder.load(builder.bitcast(data, _V32.as_pointer()), align=4)


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _vector_fabs(builder, v):
    return _call(builder, "llvm.fabs.v32f32", _V32, [v])


def _splat(builder, value):
    """<32 x float> with every lane = value."""
    undef = ir.Constant(_V32, ir.Undefined)
    lane0 = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(lane0, undef, ir.Constant(ir.VectorType(_I32, quant.BLOCK), [0] * quant.BLOCK))


def _reduce(builder, op, v, nan_value):
    """``llvm.vector.reduce.<op>`` (fmax or fmin) of v with its NaN lanes replaced by nan_value first, so the
    reduction may be told there are no NaNs ('nnan': a plain vmaxps/vminps tree) and which zero it returns does not
    matter ('nsz': callers that care about the sign of zero look the value up again in the block)."""
    not_nan = builder.fcmp_ordered("==", v, v)
    clean = builder.select(not_nan, v, _splat(builder, ir.Constant(_F32, nan_value)))
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_V32]), f"llvm.vector.reduce.{op}.v32f32")
    return builder.call(fn, [clean], fastmath=("nnan", "nsz"))


@intrinsic
def _block_reduce_abs_max(typingctx, x):
    """max |x_j| over x[0:32], NaN lanes ignored (0.0 if every lane is NaN)."""
    if not _is_block(x):
        return None

    def codegen(context, builder, signature, args):
        v = _vector_fabs(builder, _load_block(context, builder, signature.args[0], args[0]))
        return _reduce(builder, "fmax", v, 0.0)

    return types.float32(x), codegen


def _reduce_intrinsic(op, nan_value):
    @intrinsic
    def reduce(typingctx, x):
        """min or max over x[0:32], NaN lanes ignored (+-inf if every lane is NaN); either zero on a +-0 tie."""
        if not _is_block(x):
            return None

        def codegen(context, builder, signature, args):
            return _reduce(builder, op, _load_block(context, builder, signature.args[0], args[0]), nan_value)

        return types.float32(x), codegen

    return reduce


_block_reduce_min = _reduce_intrinsic("fmin", float("inf"))
_block_reduce_max = _reduce_intrinsic("fmax", float("-inf"))


def _first_equal_intrinsic(absolute):
    @intrinsic
    def first_equal(typingctx, x, value):
        """The first j in 0..31 with (|x_j| or x_j) == value (ordered compare), or 32 if there is none."""
        if not (_is_block(x) and value == types.float32):
            return None

        def codegen(context, builder, signature, args):
            v = _load_block(context, builder, signature.args[0], args[0])
            if absolute:
                v = _vector_fabs(builder, v)
            mask = builder.bitcast(builder.fcmp_ordered("==", v, _splat(builder, args[1])), _I32)
            index = _call(builder, "llvm.cttz.i32", _I32, [mask, ir.Constant(ir.IntType(1), 0)])
            return builder.zext(index, ir.IntType(64))

        return types.int64(x, value), codegen

    return first_equal


_block_first_equal = _first_equal_intrinsic(absolute=False)
_block_first_abs_equal = _first_equal_intrinsic(absolute=True)


@overload(quant.abs_max, target="cpu")
def _abs_max_cpu(x):
    if _is_block(x):
        return lambda x: _block_reduce_abs_max(x)


@overload(quant.signed_max, target="cpu")
def _signed_max_cpu(x):
    if _is_block(x):
        def impl(x):
            amax = _block_reduce_abs_max(x)
            if not amax > np.float32(0.0):  # all zeros (or NaN): the spec never leaves its start value +0.0
                return np.float32(0.0)
            return x[_block_first_abs_equal(x, amax)]  # the first lane of that magnitude, sign kept

        return impl


@overload(quant.min_max, target="cpu")
def _min_max_cpu(x):
    if _is_block(x):
        def impl(x):
            if x[0] != x[0]:  # NaN first: the spec's min/max never replace it
                return x[0], x[0]
            # the reductions skip NaN lanes (x[0] is not NaN); the first lane equal to each result is the spec's
            # first-of-ties, which matters for +0.0 vs -0.0
            low = x[_block_first_equal(x, _block_reduce_min(x))]
            high = x[_block_first_equal(x, _block_reduce_max(x))]
            return low, high

        return impl


@intrinsic
def _round_half_away_f32(typingctx, v):
    """``llvm.round.f32``: to the nearest integer, halves away from zero (C's roundf), as float32."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return _call(builder, "llvm.round.f32", _F32, [args[0]])

    return types.float32(v), codegen


@overload(quant.roundf, target="cpu")
def _roundf_cpu(v):
    if v == types.float32:  # (float64 arguments keep the spec)
        return lambda v: np.float64(_round_half_away_f32(v))


@type_callable(local_array)
def _type_local_array(context):
    """``attention.local_array(shape)`` with integer-literal dimensions: a stack array (``kvref/lowering.py``).
    With sizes that are not compile-time constants it has no compiled form: the call fails to type, which makes
    Numba retry the calling spec function with its integer arguments as literals (the specialisation)."""
    def typer(shape):
        dims = literal_shape(shape)
        return types.Array(types.float32, len(dims), "C") if dims else None

    return typer


lower_builtin(local_array, types.BaseTuple)(lower_local_array)


def _register_inlined():
    """The kernel's inner-loop functions (``attention.INLINED``) for the CPU: the spec itself, inlined into its caller
    at Numba IR level (``inline="always"``), so that it is compiled as part of the caller, with the caller's fast-math
    flags, its constant G and D and its stack arrays in sight. (Compiled separately and inlined later by LLVM, as
    ``forceinline`` does, the loops are optimised before the constants and the arrays' origin are known, and stay
    scalar: 10-20x slower. numba-cuda 0.30 cannot inline a numba.core overload at IR level, so CUDA keeps
    ``forceinline``.)"""
    for fn in attention.INLINED:
        overload(fn, target="cpu", inline="always", strict=False)(lambda *args, _fn=fn: _fn)


_register_inlined()
