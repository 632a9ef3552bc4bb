"""kvref: the executable reference for LLM key/value caches.

Each variant's whole algorithm is one readable file of plain Python (the spec); the same functions are compiled
with ``numba.njit`` (``kvref.cpu``) and called from ``numba.cuda`` kernels (``kvref.cuda``).

>>> import numpy as np, kvref
>>> shape = kvref.CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8)
>>> cache = kvref.FlatCache(shape, batch=1, max_tokens=16, backend="python")
>>> step = cache.plan(num_tokens=3)
"""

import hashlib as _hashlib
from pathlib import Path as _Path


def _source_hash():
    """sha256 (16 hex digits) of kvref's own sources as they are when kvref is imported, paths included: the key of
    the compiled-code cache (``kvref/cpu/__init__.py``). Taken before any submodule is imported, so it describes the
    code this process runs; a file that cannot be read (a dangling editor lock file) counts by its name only."""
    root = _Path(__file__).resolve().parent
    digest = _hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        try:
            digest.update(path.read_bytes())
        except OSError:
            pass
    return digest.hexdigest()[:16]


#: the hash of the sources this process imported (see :func:`_source_hash`)
SOURCE_HASH = _source_hash()

from . import memory, quant, shapes, toy  # noqa: E402
from .attention import default_scale, visible  # noqa: E402
from .backends import backends  # noqa: E402
from .errors import (AllocationError, BackendUnavailableError, CacheOverflowError, DoubleFreeError, DTypeError,
                     IndexOutOfRangeError, InvalidValueError, KVCacheError, NonFiniteError, PageTableError,
                     PoolExhaustedError, ShapeError, StaleStepError, UnknownSequenceError)  # noqa: E402
from .cache import Step  # noqa: E402
from .flat import FlatCache, FlatStep  # noqa: E402
from .pool import BlockPool  # noqa: E402
from .page_table import validate_page_table  # noqa: E402
from .pooled import PooledCache, PooledStep  # noqa: E402
from .ring import RingCache, RingStep  # noqa: E402
from .two_tier import TwoTierCache, TwoTierStep  # noqa: E402
from .shapes import PRESETS, CacheShape, preset  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AllocationError", "BackendUnavailableError", "BlockPool", "CacheOverflowError", "CacheShape", "DTypeError",
    "DoubleFreeError", "FlatCache", "FlatStep", "IndexOutOfRangeError", "InvalidValueError", "KVCacheError",
    "NonFiniteError", "PRESETS", "PageTableError", "PoolExhaustedError", "PooledCache", "PooledStep", "RingCache",
    "RingStep", "ShapeError", "StaleStepError", "Step", "TwoTierCache", "TwoTierStep", "UnknownSequenceError",
    "backends", "default_scale", "memory", "preset", "quant", "shapes", "toy", "validate_page_table", "visible",
]
