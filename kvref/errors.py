"""Exceptions raised by kvref.

Every error names the argument, the value that was expected and the value that was given, e.g.::

    ShapeError: k_new: expected shape (1, 4, 2, 16), got (1, 4, 8, 16)

All of them derive from :class:`KVCacheError`, so ``except kvref.KVCacheError`` catches any of them. Validation runs in
Python before any compiled code, and a call that raises leaves the cache exactly as it was.
"""


class KVCacheError(Exception):
    """Base class. ``argument``, ``expected`` and ``actual`` hold the three parts of the message."""

    def __init__(self, argument, expected, actual, detail=""):
        self.argument = argument
        self.expected = expected
        self.actual = actual
        message = f"{argument}: expected {expected}, got {actual}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class ShapeError(KVCacheError, ValueError):
    """An array has the wrong shape, or a size parameter is not a valid size."""


class DTypeError(KVCacheError, TypeError):
    """An argument has the wrong type: an array of the wrong dtype or byte order, something that is not a NumPy
    array, a scale that is not a real number; or an unsupported storage dtype was asked for."""


class InvalidValueError(KVCacheError, ValueError):
    """An argument has the right type but a value that is not allowed: a non-finite or non-positive ``scale``, a
    read-only ``out`` array."""


class AllocationError(KVCacheError, MemoryError):
    """A cache (or a pool, or a table) of the requested size cannot be allocated; the message states the bytes.
    Nothing was allocated."""


class IndexOutOfRangeError(KVCacheError, IndexError):
    """A layer, sequence, head or position index is outside its range."""


class CacheOverflowError(KVCacheError):
    """Writing the requested tokens would go past the cache's capacity. Nothing was written."""


class NonFiniteError(KVCacheError, ValueError):
    """An input that must be quantized holds NaN or inf, which ggml's formats cannot represent. Nothing was written."""


class StaleStepError(KVCacheError):
    """A planned step no longer matches the cache (it was already applied, or the cache changed since)."""


class BackendUnavailableError(KVCacheError, RuntimeError):
    """The requested backend ("python", "cpu" or "cuda") cannot run here; the message says why."""


class PoolExhaustedError(KVCacheError):
    """The block pool has too few free blocks for a step (and eviction is off, or cannot free enough). No block was
    taken and no block table was touched."""


class DoubleFreeError(KVCacheError):
    """A block whose ref count is already 0 was freed again, or a sequence was released twice."""


class UnknownSequenceError(KVCacheError, LookupError):
    """A sequence id that is not live in a pooled cache (never added, or already released)."""


class PageTableError(KVCacheError, ValueError):
    """A page table (FlashInfer's kv_indptr / kv_indices / kv_last_page_len) breaks one of its invariants."""
