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
from .errors import (AllocationError, BackendUnavailableError, CacheOverflowError, DoubleFreeError, DTypeError,
                     IndexOutOfRangeError, InvalidValueError, KVCacheError, NonFiniteError, PageTableError,
                     PoolExhaustedError, ShapeError, StaleStepError, UnknownSequenceError)
from .cache import Step
from .flat import FlatCache, FlatStep
from .pool import BlockPool
from .page_table import validate_page_table
from .pooled import PooledCache, PooledStep
from .ring import RingCache, RingStep
from .two_tier import TwoTierCache, TwoTierStep
from .shapes import PRESETS, CacheShape, preset

__version__ = "0.1.0"

__all__ = [
    "AllocationError", "BackendUnavailableError", "BlockPool", "CacheOverflowError", "CacheShape", "DTypeError",
    "DoubleFreeError", "FlatCache", "FlatStep", "IndexOutOfRangeError", "InvalidValueError", "KVCacheError",
    "NonFiniteError", "PRESETS", "PageTableError", "PoolExhaustedError", "PooledCache", "PooledStep", "RingCache",
    "RingStep", "ShapeError", "StaleStepError", "Step", "TwoTierCache", "TwoTierStep", "UnknownSequenceError",
    "backends", "default_scale", "memory", "preset", "quant", "shapes", "toy", "validate_page_table", "visible",
]
