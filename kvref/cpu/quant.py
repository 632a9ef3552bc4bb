"""CPU twins of the quantization spec (``kvref/quant.py``): the same functions, compiled with ``numba.njit``.

**One compiled loop per format.** ``quantize_rows(x, fmt, blocks)`` takes the format as a run-time integer, so one
compiled loop would test it in every block and carry the code of all five formats. Each function below calls the
spec with the format as a *compile-time constant* instead (a closure variable, which Numba freezes);
the spec's per-block functions are ``register_jitable(forceinline=True)``, so after LLVM inlines them every
``if fmt == ...`` folds and only that format's loop is left. This is a compile schedule, not a second algorithm:
each body is one call of the spec. It also matters for a less obvious reason: in the folded loop Numba's
reference-count pruning removes the atomic incref/decref of the per-block slice views (two atomics per slice, per
block), which it cannot do across the run-time format switch; that alone was a third of the time.

The block reductions and ``roundf`` compile to vector code through the CPU overloads in ``fast_math.py``, the codes
and the decode of a block through those in ``fast_quant.py``. Throughput on one core: on Zen 5 ((4096, 1024)
float32) quantize q8_0 / q4_0 about 13 GB/s, 17-20x ``gguf.quants.quantize``, dequantize about 17 GB/s of float32
output; on this project's 2-core EPYC VM ((16384, 1024)) the compiled quantize loop 5-8 GB/s, and the whole
``quant.quantize`` about 10-11x gguf, because its finite check first reads the input once more (BENCHMARKS.md).
"""

from .. import quant
from . import compile_spec


def _with_format(spec_rows, fmt):
    """``spec_rows(a, fmt, b)`` compiled with ``fmt`` frozen to a constant (a closure variable, which Numba freezes)."""

    def rows(a, b):
        spec_rows(a, fmt, b)

    return compile_spec(rows)


#: ggml type number -> compiled ``rows(x, blocks)`` for that format (compiled on first use)
QUANTIZE = {fmt: _with_format(quant.quantize_rows, fmt) for fmt in quant.GGML_TYPES.values()}
#: ggml type number -> compiled ``rows(blocks, x)``
DEQUANTIZE = {fmt: _with_format(quant.dequantize_rows, fmt) for fmt in quant.GGML_TYPES.values()}


def quantize_rows(x, fmt, blocks):
    """``kvref.quant.quantize_rows``, compiled (x: (rows, n) float32 C-contiguous; blocks: (rows, n/32 * B) uint8)."""
    QUANTIZE[fmt](x, blocks)


def dequantize_rows(blocks, fmt, x):
    """``kvref.quant.dequantize_rows``, compiled."""
    DEQUANTIZE[fmt](blocks, x)
