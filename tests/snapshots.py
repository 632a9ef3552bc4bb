"""Comparing cache.state() snapshots: a failed call must leave a cache exactly as it was."""

import numpy as np
import pytest

from kvref import KVCacheError


def values_equal(a, b):
    """Deep, bitwise equality of two cache.state() values (arrays, dicts, tuples, lists, scalars)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))
    return a == b


def assert_state_equal(before, after):
    """Deep, bitwise comparison of two cache.state() snapshots, naming the first entry that differs."""
    assert before.keys() == after.keys()
    for key in before:
        assert values_equal(before[key], after[key]), f"state[{key!r}] changed: {before[key]!r} -> {after[key]!r}"


def run_bad_call(cache, setup, error, argument):
    """``setup(cache)`` returns a call that must raise exactly ``error`` naming ``argument`` ("argument: expected
    ..."), and leave ``cache.state()`` bitwise unchanged. Returns the exception."""
    thunk = setup(cache)
    before = cache.state()
    with pytest.raises(error) as info:
        thunk()
    exc = info.value
    assert type(exc) is error, f"expected exactly {error.__name__}, got {type(exc).__name__}"
    assert isinstance(exc, KVCacheError)
    assert exc.argument == argument
    assert str(exc).startswith(f"{argument}: expected "), str(exc)
    assert_state_equal(before, cache.state())
    return exc
