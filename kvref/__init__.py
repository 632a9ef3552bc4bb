"""kvref: the executable reference for LLM key/value caches.

Each variant's whole algorithm is one readable file of plain Python (the spec); the same functions are compiled
with ``numba.njit`` (``kvref.cpu``) and called from ``numba.cuda`` kernels (``kvref.cuda``).

>>> import numpy as np, kvref
>>> shape = kvref.CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8)
>>> cache = kvref.FlatCache(shape, batch=1, max_tokens=16, backend="python")
>>> step = cache.plan(num_tokens=3)
"""

from . import memory, quant, shapes, toy
from .attention import default_scale, visible
from .backends import backends
from .errors import (BackendUnavailableError, CacheOverflowError, DTypeError, IndexOutOfRangeError, KVCacheError,
                     NonFiniteError, DoubleFreeError, PageTableError, PoolExhaustedError, ShapeError,
                     StaleStepError, UnknownSequenceError)
from .cache import Step
from .flat import FlatCache
from .pooled import BlockPool, PooledCache, validate_page_table
from .ring import RingCache
from .two_tier import TwoTierCache
from .shapes import PRESETS, CacheShape, preset

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "BlockPool", "CacheOverflowError", "DoubleFreeError", "PageTableError",
    "PoolExhaustedError", "PooledCache", "UnknownSequenceError", "validate_page_table", "CacheShape", "DTypeError", "FlatCache", "IndexOutOfRangeError",
    "KVCacheError", "NonFiniteError", "PRESETS", "ShapeError", "StaleStepError", "Step", "backends", "default_scale", "memory",
    "RingCache", "TwoTierCache", "preset", "quant", "shapes", "toy", "visible",
]
