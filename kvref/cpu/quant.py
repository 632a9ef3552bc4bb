"""CPU twins of the quantization spec (``kvref/quant.py``): the same functions, compiled with ``numba.njit``."""

from .. import quant
from . import compile_spec

quantize_rows = compile_spec(quant.quantize_rows)
dequantize_rows = compile_spec(quant.dequantize_rows)
