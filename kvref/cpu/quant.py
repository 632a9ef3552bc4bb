"""CPU twins of the quantization spec (``kvref/quant.py``): the same functions, compiled with ``numba.njit``.

**One compiled loop per format.** ``quantize_rows(x, fmt, blocks)`` takes the format as a run-time integer, so one
compiled loop would test it in every block and carry the code of all five formats. Each function below calls the
spec with the format as a *compile-time constant* instead (``quant.Q8_0`` is a module global, which Numba freezes);
the spec's per-block functions are ``register_jitable(forceinline=True)``, so after LLVM inlines them every
``if fmt == ...`` folds and only that format's loop is left. This is a compile schedule, not a second algorithm:
each body is one call of the spec. It also matters for a less obvious reason: in the folded loop Numba's
reference-count pruning removes the atomic incref/decref of the per-block slice views (two atomics per slice, per
block), which it cannot do across the run-time format switch; that alone was a third of the time.

The block reductions and ``roundf`` compile to vector code through the CPU overloads in ``fast_math.py``.
Throughput on one core (Zen 5, (4096, 1024) float32): quantize q8_0 / q4_0 about 13 GB/s, 17-20x
``gguf.quants.quantize``; dequantize about 17 GB/s of float32 output.
"""

from .. import quant
from . import compile_spec


def _quantize_q8_0(x, blocks):
    quant.quantize_rows(x, quant.Q8_0, blocks)


def _quantize_q4_0(x, blocks):
    quant.quantize_rows(x, quant.Q4_0, blocks)


def _quantize_q4_1(x, blocks):
    quant.quantize_rows(x, quant.Q4_1, blocks)


def _quantize_q5_0(x, blocks):
    quant.quantize_rows(x, quant.Q5_0, blocks)


def _quantize_q5_1(x, blocks):
    quant.quantize_rows(x, quant.Q5_1, blocks)


def _dequantize_q8_0(blocks, x):
    quant.dequantize_rows(blocks, quant.Q8_0, x)


def _dequantize_q4_0(blocks, x):
    quant.dequantize_rows(blocks, quant.Q4_0, x)


def _dequantize_q4_1(blocks, x):
    quant.dequantize_rows(blocks, quant.Q4_1, x)


def _dequantize_q5_0(blocks, x):
    quant.dequantize_rows(blocks, quant.Q5_0, x)


def _dequantize_q5_1(blocks, x):
    quant.dequantize_rows(blocks, quant.Q5_1, x)


#: ggml type number -> compiled ``rows(x, blocks)`` for that format (compiled on first use)
QUANTIZE = {quant.Q8_0: compile_spec(_quantize_q8_0), quant.Q4_0: compile_spec(_quantize_q4_0),
            quant.Q4_1: compile_spec(_quantize_q4_1), quant.Q5_0: compile_spec(_quantize_q5_0),
            quant.Q5_1: compile_spec(_quantize_q5_1)}
#: ggml type number -> compiled ``rows(blocks, x)``
DEQUANTIZE = {quant.Q8_0: compile_spec(_dequantize_q8_0), quant.Q4_0: compile_spec(_dequantize_q4_0),
              quant.Q4_1: compile_spec(_dequantize_q4_1), quant.Q5_0: compile_spec(_dequantize_q5_0),
              quant.Q5_1: compile_spec(_dequantize_q5_1)}


def quantize_rows(x, fmt, blocks):
    """``kvref.quant.quantize_rows``, compiled (x: (rows, n) float32 C-contiguous; blocks: (rows, n/32 * B) uint8)."""
    QUANTIZE[fmt](x, blocks)


def dequantize_rows(blocks, fmt, x):
    """``kvref.quant.dequantize_rows``, compiled."""
    DEQUANTIZE[fmt](blocks, x)
