"""Issue #12's regressions: the step lifecycle, unchecked arguments, sizes that cannot be allocated, and misleading
error messages.

Each test here failed before the fix. They check the contract every cache variant now shares:

1. a step's layers must be written before ``attend`` reads them and before ``advance`` commits them (FlatCache used
   to skip both checks: it attended to stale rows and advanced over unwritten layers);
2. ``plan(num_tokens)`` with an absurd ``num_tokens`` raises IndexOutOfRangeError before allocating anything (the
   two-tier and ring caches built their position arrays first);
3. a rejected ``append`` changes nothing: TwoTierCache kept the layers written before the one holding a NaN, and a
   later step could commit them;
4. ``scale``, ``out`` and ``dequantize``'s ``shape`` are checked; a cache too large to allocate raises
   AllocationError stating the bytes, at once;
5. the messages say what is wrong: a big-endian array, a torch tensor, a Step from another cache, an exhausted pool.

Calls that must refuse a huge size run under :func:`no_big_allocation`: tracemalloc's peak must stay small, and the
address space is capped meanwhile, so that a regression fails at once with MemoryError instead of filling the machine.
"""

import contextlib
import dataclasses
import math
import re
import resource
import time
import tracemalloc

import numpy as np
import pytest

import kvref
from kvref.errors import (DTypeError, IndexOutOfRangeError, KVCacheError, NonFiniteError, PoolExhaustedError,
                          ShapeError, StaleStepError)

import oracle
from snapshots import assert_state_equal, run_bad_call

#: small enough for the pure-Python backend; head_dim a multiple of 32 for the two-tier cache
SHAPE = kvref.CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=32)
VARIANTS = ("flat", "ring", "two_tier", "pooled")
BACKENDS = ("python", "cpu")

#: what a refused call may allocate (tracemalloc traces Python and NumPy allocations)
PEAK_LIMIT = 64 * 2**20
#: address space a guarded call may add to the process before the kernel refuses (see no_big_allocation)
HEADROOM = 4 * 2**30

#: state() entries that track the step being written, not what the cache holds
TRACKING_KEYS = {"version", "step_key", "written", "pending"}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def make(variant, backend="python", shape=SHAPE):
    """A batch-2 cache of each variant with the sizes of the issue."""
    if variant == "flat":
        return kvref.FlatCache(shape, batch=2, max_tokens=16, backend=backend)
    if variant == "ring":
        return kvref.RingCache(shape, batch=2, window=8, sinks=0, backend=backend)
    if variant == "two_tier":
        return kvref.TwoTierCache(shape, batch=2, tail_tokens=8, max_tokens=16, store_format="q8_0",
                                  migration_batch=4, backend=backend)
    if variant == "pooled":
        return kvref.PooledCache(shape, num_blocks=16, block_size=4, batch=2, backend=backend)
    raise AssertionError(variant)


def new_error(name):
    """An error class the fix adds to kvref (InvalidValueError, AllocationError); a clean failure where it is missing."""
    error = getattr(kvref, name, None)
    if error is None:
        pytest.fail(f"kvref.{name} does not exist")
    return error


def kv_step(rng, cache, n_seq, num_tokens):
    """New K and V for one layer of a step: (n_seq, T, kv_heads, head_dim) in the cache's dtype."""
    s = cache.shape
    dims = (n_seq, num_tokens, s.kv_heads, s.head_dim)
    return rng.standard_normal(dims).astype(s.public_dtype), rng.standard_normal(dims).astype(s.public_dtype)


def kv_all_layers(rng, cache, n_seq, num_tokens):
    """New K and V for ``append``: (layers, n_seq, T, kv_heads, head_dim) in the cache's dtype."""
    s = cache.shape
    dims = (s.layers, n_seq, num_tokens, s.kv_heads, s.head_dim)
    return rng.standard_normal(dims).astype(s.public_dtype), rng.standard_normal(dims).astype(s.public_dtype)


def query(rng, cache, n_seq, num_tokens):
    """Queries for one layer of a step: (n_seq, T, q_heads, head_dim) float32."""
    s = cache.shape
    return rng.standard_normal((n_seq, num_tokens, s.q_heads, s.head_dim)).astype(np.float32)


def held(state):
    """The entries of a state() snapshot that hold the cache's contents (tracking of a step being written left out)."""
    return {key: value for key, value in state.items() if key not in TRACKING_KEYS}


def _address_space():
    """This process's virtual memory size in bytes (Linux), or None where /proc does not tell."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def no_big_allocation(record):
    """Trace allocations (``record["peak"]``: tracemalloc's peak in bytes, set on exit, even when the body raises)
    and cap the address space at its current size + HEADROOM meanwhile, so that code that does try a huge allocation
    fails at once with MemoryError instead of exhausting the machine (or, under overcommit, seeming to succeed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    current = _address_space()
    cap = None if current is None else current + HEADROOM
    if cap is not None and (hard == resource.RLIM_INFINITY or cap < hard):
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        yield record
    finally:
        record["peak"] = tracemalloc.get_traced_memory()[1]
        if not tracing:
            tracemalloc.stop()
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def guarded(call, record):
    """``call`` wrapped in :func:`no_big_allocation` (for run_bad_call's thunks)."""
    def thunk():
        with no_big_allocation(record):
            return call()
    return thunk


def assert_small_peak(record):
    assert record["peak"] < PEAK_LIMIT, f"allocated {record['peak']} bytes before refusing"


# ---------------------------------------------------------------------------------------------------------------
# 1. a step's layers are written before they are attended, and all of them before advance
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("written", [(), (1,)], ids=["nothing_written", "other_layer_written"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_flat_attend_before_write_is_refused(variant, written, rng):
    """FlatCache attended to whatever the slots held; the other variants already refused."""
    cache = make(variant)

    def setup(c):
        step = c.plan(1)
        for layer in written:
            c.write(step, layer, *kv_step(rng, c, 2, 1))
        q = query(rng, c, 2, 1)
        return lambda: c.attend(step, 0, q)

    run_bad_call(cache, setup, StaleStepError, "step")


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_attend_after_crop_reads_no_stale_row(backend, rng):
    """After crop(3), slot 3 still holds the cropped token; attend before write used to read it."""
    cache = kvref.FlatCache(SHAPE, batch=2, max_tokens=16, backend=backend)
    k, v = kv_all_layers(rng, cache, 2, 5)
    cache.append(k, v)
    cache.crop(3)
    step = cache.plan(1)
    q = query(rng, cache, 2, 1)
    run_bad_call(cache, lambda c: lambda: c.attend(step, 0, q), StaleStepError, "step")

    scale = float(np.float32(1.0 / math.sqrt(SHAPE.head_dim)))  # kvref's default, rounded to float32
    for layer in range(SHAPE.layers):
        k_new, v_new = kv_step(rng, cache, 2, 1)
        cache.write(step, layer, k_new, v_new)
        q = query(rng, cache, 2, 1)
        out = cache.attend(step, layer, q)
        for i in range(2):
            # positions 0..2 from the append, position 3 the new token: (kv_heads, 4, head_dim)
            keys = np.concatenate([k[layer, i, :3], k_new[i]]).transpose(1, 0, 2)
            values = np.concatenate([v[layer, i, :3], v_new[i]]).transpose(1, 0, 2)
            expected = oracle.decode_attention_gqa(q[i, 0], keys, values, scale)
            np.testing.assert_allclose(out[i, 0], expected, atol=1e-5, rtol=1e-5)
    cache.advance(step)
    assert cache.lengths.tolist() == [4, 4]


@pytest.mark.parametrize("written", [(), (0,)], ids=["nothing_written", "layer_1_unwritten"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_flat_advance_with_an_unwritten_layer_is_refused(variant, written, rng):
    """FlatCache advanced the lengths over layers that never received the step's K/V."""
    cache = make(variant)
    cache.append(*kv_all_layers(rng, cache, 2, 3))
    lengths = cache.lengths

    def setup(c):
        step = c.plan(2)
        for layer in written:
            c.write(step, layer, *kv_step(rng, c, 2, 2))
        return lambda: c.advance(step)

    run_bad_call(cache, setup, StaleStepError, "step")
    assert cache.lengths.tolist() == lengths.tolist()


# ---------------------------------------------------------------------------------------------------------------
# 2, 3. plan() refuses an absurd num_tokens before allocating
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefilled", [False, True], ids=["empty", "seq0_at_20"])
@pytest.mark.parametrize("num_tokens", [2**31, 2**40, 2**62, 2**63 - 1],
                         ids=["2**31", "2**40", "2**62", "2**63-1"])
def test_two_tier_plan_of_huge_num_tokens_is_refused_before_allocating(num_tokens, prefilled, rng):
    """TwoTierCache.plan built arange(num_tokens) (and more) before any check: 16 GiB for 2**31."""
    cache = make("two_tier")
    if prefilled:
        cache.append(*kv_all_layers(rng, cache, 1, 20), seq_ids=[0])
        assert cache.get_seq_length(0) == 20
    record = {}
    run_bad_call(cache, lambda c: guarded(lambda: c.plan(num_tokens), record), IndexOutOfRangeError, "num_tokens")
    assert_small_peak(record)


#: sizeable tokens (2 * 4 layers * 4 heads * 64 * 4 bytes = 8 KiB each), so 10**9 of them exceed any machine's memory
RING_SHAPE = kvref.CacheShape(layers=4, q_heads=8, kv_heads=4, head_dim=64)
WINDOW = 8


@pytest.mark.parametrize("num_tokens", [10**9, 2**31], ids=["10**9", "2**31"])
def test_ring_plan_of_huge_num_tokens_is_refused_before_allocating(num_tokens):
    """RingCache only refused positions past 2**31: plan(10**9) built its arrays and looped over 10**9 tokens."""
    cache = kvref.RingCache(RING_SHAPE, batch=2, window=WINDOW, sinks=0, backend="python")
    record = {}
    run_bad_call(cache, lambda c: guarded(lambda: c.plan(num_tokens), record), IndexOutOfRangeError, "num_tokens")
    assert_small_peak(record)


def test_ring_prefill_longer_than_window_is_still_accepted(rng):
    """Control (passes before the fix too): a prefill of 2W + 1 tokens is an ordinary deferred step."""
    cache = kvref.RingCache(RING_SHAPE, batch=2, window=WINDOW, sinks=0, backend="python")
    num_tokens = 2 * WINDOW + 1
    step = cache.plan(num_tokens)
    assert step.num_tokens == num_tokens
    cache.append(*kv_all_layers(rng, cache, 2, num_tokens))
    assert cache.lengths.tolist() == [num_tokens, num_tokens]
    assert cache.held_positions(0).tolist() == list(range(num_tokens - WINDOW, num_tokens))


# ---------------------------------------------------------------------------------------------------------------
# 4. a rejected append changes nothing, and nothing of it reaches a later step
# ---------------------------------------------------------------------------------------------------------------
def nan_append(rng, cache, which):
    """K and V for a 3-token append whose layer 1 holds a NaN in ``which`` ("k" or "v"); layer 0 is finite."""
    k, v = kv_all_layers(rng, cache, 2, 3)
    (k if which == "k" else v)[1, 0, 1, 0, 5] = np.nan
    return k, v


@pytest.mark.parametrize("which", ["k", "v"])
def test_two_tier_append_rejected_for_nan_commits_nothing(which, rng):
    """TwoTierCache held layer 0 aside before layer 1's NaN was found, and kept it."""
    cache = make("two_tier")
    k, v = nan_append(rng, cache, which)
    run_bad_call(cache, lambda c: lambda: c.append(k, v), NonFiniteError, f"{which}_new")

    k2, v2 = kv_all_layers(rng, cache, 2, 3)
    cache.append(k2, v2)
    fresh = make("two_tier")
    fresh.append(k2, v2)
    assert_state_equal(held(fresh.state()), held(cache.state()))


@pytest.mark.parametrize("which", ["k", "v"])
def test_two_tier_rejected_append_layer_is_not_committed_by_a_later_step(which, rng):
    """The same step planned again found layer 0 'written' (by the rejected append) and advance committed it."""
    cache = make("two_tier")
    k, v = nan_append(rng, cache, which)
    with pytest.raises(NonFiniteError):
        cache.append(k, v)

    def setup(c):
        step = c.plan(3)
        k2, v2 = kv_step(rng, c, 2, 3)
        c.write(step, 1, k2, v2)  # layer 0 is not written for this step
        return lambda: c.advance(step)

    run_bad_call(cache, setup, StaleStepError, "step")
    assert cache.lengths.tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------------------------
# 5. unchecked arguments: scale, out, dequantize's shape; sizes that cannot be allocated
# ---------------------------------------------------------------------------------------------------------------
def attend_with(rng, **kwargs):
    """setup for run_bad_call: layer 0 of a 1-token step written, then attend(step, 0, q, **kwargs)."""
    def setup(c):
        step = c.plan(1)
        c.write(step, 0, *kv_step(rng, c, 2, 1))
        q = query(rng, c, 2, 1)
        return lambda: c.attend(step, 0, q, **kwargs)
    return setup


@pytest.mark.parametrize("scale", ["0.5", 1j, [0.5], np.array([0.5]), np.array(0.5)],
                         ids=["str", "complex", "list", "array_1d", "array_0d"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_attend_scale_that_is_not_a_real_number_is_refused(variant, scale, rng):
    """scale went through np.float32(scale) unchecked: "0.5" was parsed, a list or array broadcast."""
    run_bad_call(make(variant), attend_with(rng, scale=scale), DTypeError, "scale")


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 0.0, -0.25],
                         ids=["nan", "inf", "-inf", "zero", "negative"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_attend_scale_not_finite_and_positive_is_refused(variant, scale, rng):
    """A NaN, infinite, zero or negative scale was used as given (NaN or meaningless outputs)."""
    error = new_error("InvalidValueError")
    run_bad_call(make(variant), attend_with(rng, scale=scale), error, "scale")


@pytest.mark.parametrize("variant", VARIANTS)
def test_attend_scale_real_numbers_are_still_accepted(variant, rng):
    """Control (passes before the fix too): Python and NumPy real scalars, ints included, are valid scales."""
    cache = make(variant)
    step = cache.plan(1)
    cache.write(step, 0, *kv_step(rng, cache, 2, 1))
    q = query(rng, cache, 2, 1)
    reference = cache.attend(step, 0, q, scale=0.125)
    for scale in (np.float32(0.125), np.float64(0.125)):
        np.testing.assert_array_equal(cache.attend(step, 0, q, scale=scale), reference)
    np.testing.assert_array_equal(cache.attend(step, 0, q, scale=1), cache.attend(step, 0, q, scale=1.0))


@pytest.mark.parametrize("variant", VARIANTS)
def test_attend_into_read_only_out_is_refused(variant, rng):
    """A read-only ``out`` passed the checks; the write into it then failed inside attention with NumPy's error."""
    error = new_error("InvalidValueError")
    out = np.full((2, 1, SHAPE.q_heads, SHAPE.head_dim), 7.0, np.float32)
    out.setflags(write=False)
    untouched = out.tobytes()
    run_bad_call(make(variant), attend_with(rng, out=out), error, "out")
    assert out.tobytes() == untouched


def q8_0_blocks(rng):
    """Three rows of 64 floats as q8_0 blocks: (3, 68) uint8, and the floats."""
    x = rng.standard_normal((3, 64)).astype(np.float32)
    return kvref.quant.quantize(x, "q8_0", backend="python"), x


@pytest.mark.parametrize("shape", [(3.5, 64), (3, 64.0), (True, 64), ("3", 64)],
                         ids=["float_3.5", "float_64.0", "bool", "str"])
def test_dequantize_shape_of_non_integers_is_refused(shape, rng):
    """dequantize ran int() over the shape: (3.5, 64) became (3, 64), ("3", 64) was parsed."""
    blocks, _ = q8_0_blocks(rng)
    with pytest.raises(ShapeError) as info:
        kvref.quant.dequantize(blocks, "q8_0", shape, backend="python")
    assert type(info.value) is ShapeError
    assert info.value.argument == "shape"
    assert str(info.value).startswith("shape: expected "), str(info.value)


def test_dequantize_shape_of_integers_is_still_accepted(rng):
    """Control (passes before the fix too): Python and NumPy integers."""
    blocks, x = q8_0_blocks(rng)
    a = kvref.quant.dequantize(blocks, "q8_0", (3, 64), backend="python")
    b = kvref.quant.dequantize(blocks, "q8_0", (np.int64(3), 64), backend="python")
    assert a.shape == b.shape == (3, 64)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, x, atol=0.05)


def flat_bytes(shape, batch, max_tokens):
    """Bytes of a flat cache's storage: 2 * layers * batch * kv_heads * max_tokens * head_dim * element_bytes."""
    return 2 * shape.layers * batch * shape.kv_heads * max_tokens * shape.head_dim * shape.element_bytes


LLAMA = kvref.preset("llama-3-8b")  # fp16: 128 KiB per token
#: (constructor, the bytes its message must state, or None where only "<n> bytes" is checked)
HUGE_CACHES = {
    "flat_2**62_tokens": (lambda b: kvref.FlatCache(SHAPE, batch=1, max_tokens=2**62, backend=b),
                          flat_bytes(SHAPE, 1, 2**62)),
    "flat_llama3_8b_119TiB": (lambda b: kvref.FlatCache(LLAMA, batch=1000, max_tokens=1_000_000, backend=b),
                              flat_bytes(LLAMA, 1000, 1_000_000)),
    "ring_window_2**40": (lambda b: kvref.RingCache(SHAPE, window=2**40, backend=b), None),
    "two_tier_2**40": (lambda b: kvref.TwoTierCache(SHAPE, tail_tokens=2**40, max_tokens=2**40, backend=b), None),
    "pooled_2**40_blocks": (lambda b: kvref.PooledCache(SHAPE, num_blocks=2**40, block_size=16, backend=b), None),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(HUGE_CACHES))
def test_unallocatable_cache_raises_allocation_error(case, backend):
    """Such sizes reached np.zeros (MemoryError or ValueError from NumPy, or a lazily mapped 119 TiB that seemed to
    succeed), or built a Python free list of 2**40 blocks."""
    error = new_error("AllocationError")
    build, nbytes = HUGE_CACHES[case]
    record = {}
    started = time.perf_counter()
    with pytest.raises(error) as info:
        with no_big_allocation(record):
            build(backend)
    elapsed = time.perf_counter() - started
    exc = info.value
    assert type(exc) is error and isinstance(exc, KVCacheError) and isinstance(exc, MemoryError)
    message = str(exc)
    assert message.startswith(f"{exc.argument}: expected "), message
    if nbytes is not None:
        assert str(nbytes) in message, message
    else:
        assert re.search(r"\d+ bytes", message), message
    assert_small_peak(record)
    assert elapsed < 10, f"took {elapsed:.1f} s to refuse"


# ---------------------------------------------------------------------------------------------------------------
# 6. messages that say what is wrong
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_write_big_endian_k_says_big_endian(backend, rng):
    """The message read "expected dtype float32, got float32": both dtypes are named float32."""
    def setup(c):
        step = c.plan(1)
        k, v = kv_step(rng, c, 2, 1)
        big = k.astype(">f4")
        return lambda: c.write(step, 0, big, v)

    exc = run_bad_call(make("flat", backend), setup, DTypeError, "k_new")
    assert "big-endian" in str(exc), str(exc)


@pytest.mark.parametrize("which", ["k_new", "v_new"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_append_of_a_torch_tensor_says_numpy_not_torch(variant, which, rng):
    """append said "k_new: expected a 5-D array ..., got torch.Size(...)" (a ShapeError) for a torch tensor, and
    "got Tensor" for v_new: neither said that a NumPy array is needed instead of a torch one."""
    torch = pytest.importorskip("torch")
    cache = make(variant)
    k, v = kv_all_layers(rng, cache, 2, 1)
    if which == "k_new":
        k, v = torch.from_numpy(k), torch.from_numpy(v)
    else:
        v = torch.from_numpy(v)
    exc = run_bad_call(cache, lambda c: lambda: c.append(k, v), DTypeError, which)
    assert "NumPy" in str(exc) and "torch" in str(exc), str(exc)


@pytest.mark.parametrize("call", ["write", "attend", "advance"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_step_from_another_cache_says_another_cache(variant, call, rng):
    """A Step planned by another cache of the same kind was refused as "the cache changed since plan()"."""
    cache, other = make(variant), make(variant)
    step = other.plan(1)

    def setup(c):
        k, v = kv_step(rng, c, 2, 1)
        q = query(rng, c, 2, 1)
        return {"write": lambda: c.write(step, 0, k, v),
                "attend": lambda: c.attend(step, 0, q),
                "advance": lambda: c.advance(step)}[call]

    exc = run_bad_call(cache, setup, StaleStepError, "step")
    assert "another cache" in str(exc), str(exc)


def test_pool_exhausted_message_counts_free_blocks(rng):
    """The message read "expected a step needing at most 0 new blocks": it now names the free blocks and the need."""
    cache = kvref.PooledCache(SHAPE, num_blocks=2, block_size=4, batch=2, backend="python")
    for seq in (0, 1):  # one full block each: no block is free
        cache.append(*kv_all_layers(rng, cache, 1, 4), seq_ids=[seq])
    assert cache.pool.num_free == 0
    exc = run_bad_call(cache, lambda c: lambda: c.plan(1, [0]), PoolExhaustedError, "num_tokens")
    message = str(exc)
    assert "at most 0" not in message, message
    assert "0 free" in message and "1 new block" in message, message


# ---------------------------------------------------------------------------------------------------------------
# write/attend/advance check a step without re-planning it (the host time of a step), and still refuse an edit
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["slots", "positions", "seq_ids"])
def test_a_step_edited_in_place_is_refused_and_changes_nothing(field):
    cache = kvref.FlatCache(SHAPE, batch=2, max_tokens=8, backend="python")
    k = np.ones((2, 2, SHAPE.kv_heads, SHAPE.head_dim), np.float32)
    step = cache.plan(2)
    cache.write(step, 0, k, k)  # the fast check: the very object plan() returned
    array = getattr(step, field)
    with pytest.raises(ValueError):  # immutable: NumPy refuses to make it writeable again
        array.setflags(write=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(step, field, array.copy())
    edited = array.copy()  # defeats both guards on purpose: an equal-shaped array with one entry changed
    edited[-1, ...] = 1 - edited[-1, ...] if edited.ndim > 1 else (1 - edited[-1])
    object.__setattr__(step, field, edited)
    before = cache.state()
    q = np.ones((2, 2, 4, 32), np.float32)
    for call in (lambda: cache.write(step, 1, k, k), lambda: cache.attend(step, 0, q), lambda: cache.advance(step)):
        with pytest.raises(kvref.KVCacheError):  # StaleStepError "edited ...", or the re-plan's own refusal
            call()
    assert_state_equal(before, cache.state())


def test_write_attend_advance_do_not_re_plan(monkeypatch):
    """Each layer's write and attend, and advance, check the step plan() returned by the identity of it and of its
    (immutable) fields: plan runs once per step (a 32-layer step re-planned 65 times before, most of its host
    time)."""
    cache = kvref.FlatCache(SHAPE, batch=2, max_tokens=8, backend="python")
    calls = []
    original = kvref.FlatCache._plan
    monkeypatch.setattr(kvref.FlatCache, "_plan", lambda self, ids, positions: calls.append(1) or original(
        self, ids, positions))
    k = np.ones((2, 1, SHAPE.kv_heads, SHAPE.head_dim), np.float32)
    step = cache.plan(1)
    for layer in range(SHAPE.layers):
        cache.write(step, layer, k, k)
        cache.attend(step, layer, np.ones((2, 1, 4, 32), np.float32))
    cache.advance(step)
    assert len(calls) == 1
    planned = cache.plan(1)
    copy = kvref.FlatStep(**{f: getattr(planned, f) for f in ("seq_ids", "positions", "slots", "cache_id", "version")})
    cache.write(copy, 0, k, k)  # an equal step that is another object: checked the slow way, and accepted
    assert len(calls) == 3


# ---------------------------------------------------------------------------------------------------------------
# a step edited with object.__setattr__ (past the frozen dataclass) after a layer was written is refused
# ---------------------------------------------------------------------------------------------------------------
def test_reordered_seq_ids_after_a_write_are_refused_and_change_nothing():
    """Two sequences of equal length: a step whose seq_ids are reversed after layer 0 was written re-plans to equal
    fields, but its layer 0 was written for the other order: advance must not mix the two (two-tier holds layer 0's
    K/V aside until advance, so a mix would store sequence 1's rows as sequence 0's)."""
    cache = kvref.TwoTierCache(SHAPE, batch=2, max_tokens=16, tail_tokens=8, store_format="q8_0",
                               backend="python")
    k0 = np.ones((2, 1, SHAPE.kv_heads, SHAPE.head_dim), np.float32)
    k0[1] = 2.0
    step = cache.plan(1)
    cache.write(step, 0, k0, k0)
    object.__setattr__(step, "seq_ids", step.seq_ids[::-1].copy())
    cache.write(step, 1, k0, k0)  # accepted: it equals a fresh plan for the order (1, 0), whose writes start anew
    before = cache.state()
    with pytest.raises(kvref.StaleStepError, match=r"layer\(s\) \[0\]"):  # layer 0 was written for (0, 1)
        cache.advance(step)
    assert_state_equal(before, cache.state())


def test_pooled_step_edited_past_the_frozen_dataclass_is_refused():
    """The pooled cache memoises its dry run per version; an edited step must not be handed back as its own
    fresh plan (which would compare it with itself)."""
    cache = kvref.PooledCache(SHAPE, batch=2, block_size=4, num_blocks=8, backend="python")
    k = np.ones((2, 1, SHAPE.kv_heads, SHAPE.head_dim), np.float32)
    step = cache.plan(1)
    edited = step.slots.copy()
    edited[0, 0] += 1
    object.__setattr__(step, "slots", edited)
    before = cache.state()
    with pytest.raises(kvref.StaleStepError):
        cache.write(step, 0, k, k)
    assert_state_equal(before, cache.state())
