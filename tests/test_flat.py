"""FlatCache on the host backends ("python" = the spec as plain Python, "cpu" = numba.njit), against tests/oracle.py.

Every attention output is compared with the float64 oracle over the rows the list model says are stored; for an
fp16 cache the oracle is fed the fp16-rounded K/V (the float16 arrays the cache was given). Every stored row read back
through keys()/values() must equal what was written, bit for bit.

The second half checks every validation path: the specific kvref.errors class, that the message names the argument,
and that ``cache.state()`` is exactly what it was before the call.
"""

import math

import numpy as np
import numba
import pytest

import kvref
import kvref.cpu  # noqa: F401  (registers the compiled primitives; also what the "cpu" backend uses)
from kvref import attention as kvattention
from kvref.errors import (BackendUnavailableError, CacheOverflowError, DTypeError, IndexOutOfRangeError, KVCacheError,
                          ShapeError, StaleStepError)

import oracle
from snapshots import assert_state_equal, run_bad_call

BACKENDS = ("python", "cpu")  # the same list as the ``backend`` fixture in conftest.py

ATOL = 1e-5  # float32 compute against the float64 oracle

#: (q_heads, kv_heads): MHA (G=1), GQA with G=2 and G=4, MQA (one KV head)
HEADS = {"mha": (4, 4), "gqa2": (4, 2), "gqa4": (8, 2), "mqa": (4, 1)}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def sizes(backend):
    """The python backend is pure Python: keep it small (D=16, n<=80). The compiled one gets bigger shapes."""
    if backend == "python":
        return {"head_dim": 16, "max_tokens": 80}
    return {"head_dim": 64, "max_tokens": 160}


def make_cache(backend, layers=2, q_heads=4, kv_heads=2, head_dim=16, dtype="float32", batch=2, max_tokens=48):
    shape = kvref.CacheShape(layers=layers, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    return kvref.FlatCache(shape, batch=batch, max_tokens=max_tokens, backend=backend)


def scale_of(cache):
    """kvref's default scale is 1/sqrt(D) rounded to float32; the oracle uses that same number in float64."""
    return float(np.float32(1.0 / math.sqrt(cache.shape.head_dim)))


def random_kv(rng, cache, n_seq, num_tokens):
    """New K or V for a step, in the dtype the cache takes (float16 for an fp16 cache: already fp16-rounded)."""
    s = cache.shape
    a = rng.standard_normal((n_seq, num_tokens, s.kv_heads, s.head_dim))
    return a.astype(s.public_dtype)


def random_q(rng, cache, n_seq, num_tokens):
    s = cache.shape
    return rng.standard_normal((n_seq, num_tokens, s.q_heads, s.head_dim)).astype(np.float32)


def new_model(cache):
    return oracle.FlatModel(cache.shape.layers, cache.batch, cache.max_tokens)


def check_step(cache, model, rng, num_tokens, seq_ids=None, atol=ATOL, scale=None, q_factor=1.0):
    """Plan, write and attend every layer, compare each output with the oracle, advance; mirror it in the model.

    Returns the list of per-layer attention outputs.
    """
    ids = list(range(cache.batch)) if seq_ids is None else list(seq_ids)
    before = {s: model.length(s) for s in ids}
    step = cache.plan(num_tokens, seq_ids)
    assert step.seq_ids.tolist() == ids
    expected_positions = np.array([[before[s] + t for t in range(num_tokens)] for s in ids])
    assert np.array_equal(step.positions, expected_positions)
    assert step.num_tokens == num_tokens
    oracle_scale = scale_of(cache) if scale is None else float(np.float32(scale))
    outputs = []
    for layer in range(cache.shape.layers):
        k = random_kv(rng, cache, len(ids), num_tokens)
        v = random_kv(rng, cache, len(ids), num_tokens)
        cache.write(step, layer, k, v)
        for i, s in enumerate(ids):
            model.append(layer, s, k[i].astype(np.float64), v[i].astype(np.float64))
        q = (random_q(rng, cache, len(ids), num_tokens) * np.float32(q_factor)).astype(np.float32)
        out = cache.attend(step, layer, q) if scale is None else cache.attend(step, layer, q, scale=scale)
        assert out.shape == q.shape and out.dtype == np.float32
        for i, s in enumerate(ids):
            expected = oracle.causal_chunk_attention(q[i], model.keys(layer, s), model.values(layer, s),
                                                     expected_positions[i], oracle_scale)
            np.testing.assert_allclose(out[i], expected, rtol=0, atol=atol,
                                       err_msg=f"layer {layer}, seq {s}, positions {expected_positions[i]}")
        outputs.append(out)
    cache.advance(step)
    assert cache.lengths.tolist() == model.lengths()
    return outputs


def check_stored(cache, model):
    """keys()/values() of every layer and sequence equal the model's rows exactly, in the cache's public dtype."""
    for layer in range(cache.shape.layers):
        for s in range(cache.batch):
            n = model.length(s)
            for got, want in ((cache.keys(layer, s), model.keys(layer, s)),
                              (cache.values(layer, s), model.values(layer, s))):
                assert got.dtype == cache.shape.public_dtype
                assert got.shape == (cache.shape.kv_heads, n, cache.shape.head_dim)
                if n:
                    assert np.array_equal(got.astype(np.float64), want), f"layer {layer}, seq {s}"




# ---------------------------------------------------------------------------------------------------------------
# the attention spec itself, across tile boundaries
# ---------------------------------------------------------------------------------------------------------------
def _attend_group_njit(group, head_dim):
    """attend_group compiled for one (G, D): the shape frozen as closure constants, as kvref/cpu specialises."""

    def attend(q, k, v, n_keys, scale, out):
        kvattention.attend_group(q, k, v, n_keys, scale, out, group, head_dim)

    return numba.njit(attend)


@pytest.mark.parametrize("runner", ["python", "njit"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("n_keys", [0, 1, 31, 32, 33, 64, 65, 97])
def test_attend_group_matches_oracle_across_tiles(rng, runner, dtype, group, n_keys):
    assert kvattention.TILE == 32  # the n_keys above straddle one, two and three tiles
    D = 8
    N = 100
    q = rng.standard_normal((group, D)).astype(np.float32)
    k = rng.standard_normal((N, D)).astype(np.float16 if dtype == "float16" else np.float32)
    v = rng.standard_normal((N, D)).astype(k.dtype)
    k[n_keys:] = 1e4  # rows past n_keys must never be read
    v[n_keys:] = np.nan
    ks, vs = (k.view(np.uint16), v.view(np.uint16)) if dtype == "float16" else (k, v)
    out = np.full((group, D), np.nan, np.float32)
    scale = np.float32(1 / math.sqrt(D))
    if runner == "python":
        kvattention.attend_group(q, ks, vs, n_keys, scale, out, group, D)
    else:
        _attend_group_njit(group, D)(q, ks, vs, n_keys, scale, out)
    for g in range(group):
        expected = oracle.attention(q[g], k[:n_keys].astype(np.float64), v[:n_keys].astype(np.float64), float(scale))
        np.testing.assert_allclose(out[g], expected, rtol=0, atol=ATOL)


def test_default_scale_is_inverse_sqrt_head_dim():
    for d in (16, 64, 80, 128):
        s = kvref.default_scale(d)
        assert isinstance(s, np.float32)
        assert s == np.float32(1 / math.sqrt(d))


def test_window_rule_matches_its_definition():
    """visible(i, j, W) iff i - W < j <= i (W <= 0: no window; j < 0, an empty slot, never); first_visible(i, W) is
    the smallest such j."""
    for window in (-1, 0, 1, 2, 5):
        for i in range(12):
            seen = []
            for j in range(-2, 14):
                expected = 0 <= j <= i and (window <= 0 or i - window < j)
                assert bool(kvref.visible(i, j, window)) == expected, (i, j, window)
                if expected:
                    seen.append(j)
            assert kvattention.first_visible(i, window) == seen[0]
            if window > 0:
                assert len(seen) == min(window, i + 1)


# ---------------------------------------------------------------------------------------------------------------
# prefill then decode, GQA/MHA/MQA, fp32/fp16, batch with per-sequence lengths, every layer its own data
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("heads", list(HEADS), ids=list(HEADS))
def test_prefill_then_decode_matches_oracle(backend, rng, dtype, heads):
    q_heads, kv_heads = HEADS[heads]
    size = sizes(backend)
    cache = make_cache(backend, layers=2, q_heads=q_heads, kv_heads=kv_heads, head_dim=size["head_dim"], dtype=dtype,
                       batch=3, max_tokens=size["max_tokens"])
    model = new_model(cache)
    long_chunk = 30 if backend == "python" else 70
    check_step(cache, model, rng, 5)  # prefill all three sequences (causal within the chunk)
    check_step(cache, model, rng, long_chunk, seq_ids=[2])  # one sequence gets a long prefill: several tiles
    check_step(cache, model, rng, 4, seq_ids=[2, 0])  # a subset, in non-sorted order
    for _ in range(3):
        check_step(cache, model, rng, 1)  # decode every sequence
    check_step(cache, model, rng, 1, seq_ids=[1])
    check_step(cache, model, rng, 25 if backend == "python" else 70, seq_ids=[2])  # past 64 (python) / 128 keys
    assert len(set(cache.lengths.tolist())) == 3, "every sequence has its own length"
    assert cache.lengths[2] > 2 * kvattention.TILE
    check_stored(cache, model)


def test_fp16_cache_stores_fp16_bit_patterns(backend, rng):
    cache = make_cache(backend, dtype="float16", batch=1, max_tokens=8)
    f32 = make_cache(backend, dtype="float32", batch=1, max_tokens=8)
    assert cache.kv.dtype == np.uint16 and f32.kv.dtype == np.float32
    assert cache.nbytes * 2 == f32.nbytes
    k = rng.standard_normal((2, 1, 3, 2, 16))
    v = rng.standard_normal((2, 1, 3, 2, 16))
    cache.append(k.astype(np.float16), v.astype(np.float16))
    stored = cache.kv  # (layers, 2, batch, kv_heads, max_tokens, D)
    for layer in range(2):
        expected_k = np.transpose(k[layer, 0].astype(np.float16), (1, 0, 2)).view(np.uint16)  # (kv_heads, T, D)
        expected_v = np.transpose(v[layer, 0].astype(np.float16), (1, 0, 2)).view(np.uint16)
        assert np.array_equal(stored[layer, 0, 0, :, :3], expected_k)
        assert np.array_equal(stored[layer, 1, 0, :, :3], expected_v)


def test_backends_store_identical_bytes_and_agree(rng):
    caches = {b: make_cache(b, q_heads=4, kv_heads=2, batch=2, max_tokens=40) for b in BACKENDS}
    k = rng.standard_normal((2, 2, 6, 2, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, 6, 2, 16)).astype(np.float32)
    q = rng.standard_normal((2, 1, 4, 16)).astype(np.float32)
    outs = {}
    for b, cache in caches.items():
        cache.append(k, v)
        step = cache.plan(1)
        for layer in range(2):
            cache.write(step, layer, k[layer, :, :1], v[layer, :, :1])
        outs[b] = cache.attend(step, 1, q)
    assert np.array_equal(caches["python"].kv, caches["cpu"].kv)
    np.testing.assert_allclose(outs["python"], outs["cpu"], rtol=0, atol=2 * ATOL)


def test_append_equals_plan_write_advance(backend, rng):
    a = make_cache(backend, batch=3, max_tokens=12)
    b = make_cache(backend, batch=3, max_tokens=12)
    k = rng.standard_normal((2, 2, 4, 2, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, 4, 2, 16)).astype(np.float32)
    step = a.append(k, v, seq_ids=[2, 0])
    assert isinstance(step, kvref.Step) and step.seq_ids.tolist() == [2, 0]
    manual = b.plan(4, [2, 0])
    for layer in range(2):
        b.write(manual, layer, k[layer], v[layer])
    b.advance(manual)
    sa, sb = a.state(), b.state()
    assert sa["kv"].tobytes() == sb["kv"].tobytes() and np.array_equal(sa["lengths"], sb["lengths"])
    assert a.lengths.tolist() == [4, 0, 4]
    # seq 2 got k[:, 0], seq 0 got k[:, 1]
    for layer in range(2):
        assert np.array_equal(a.keys(layer, 2), np.transpose(k[layer, 0], (1, 0, 2)))
        assert np.array_equal(a.values(layer, 0), np.transpose(v[layer, 1], (1, 0, 2)))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_noncontiguous_inputs_are_read_correctly(backend, rng, dtype):
    cache = make_cache(backend, batch=2, max_tokens=10, dtype=dtype)
    model = new_model(cache)
    step = cache.plan(3)
    scale = scale_of(cache)
    public = cache.shape.public_dtype
    for layer in range(2):
        # build (n_seq, T, kv_heads, D) as a transposed view of a (kv_heads, T, n_seq, D) array
        k = np.ascontiguousarray(rng.standard_normal((2, 3, 2, 16)).astype(public).transpose(2, 1, 0, 3))
        k = k.transpose(2, 1, 0, 3)
        v = rng.standard_normal((2, 3, 2, 32)).astype(public)[..., ::2]
        assert not k.flags.c_contiguous and not v.flags.c_contiguous
        cache.write(step, layer, k, v)
        for s in range(2):
            model.append(layer, s, k[s].astype(np.float64), v[s].astype(np.float64))
        q = rng.standard_normal((2, 3, 4, 32)).astype(np.float32)[..., 1::2]
        out = cache.attend(step, layer, q)
        for s in range(2):
            expected = oracle.causal_chunk_attention(q[s], model.keys(layer, s), model.values(layer, s), [0, 1, 2],
                                                     scale)
            np.testing.assert_allclose(out[s], expected, rtol=0, atol=ATOL)
    cache.advance(step)
    check_stored(cache, model)


def test_large_scores_are_numerically_stable(backend, rng):
    """Scores of +-100 or more: the online softmax subtracts the running max, so nothing overflows."""
    cache = make_cache(backend, batch=1, max_tokens=50)
    model = new_model(cache)
    check_step(cache, model, rng, 40, scale=30.0, atol=1e-4)
    outs = check_step(cache, model, rng, 1, scale=30.0, atol=1e-4)
    assert all(np.all(np.isfinite(o)) for o in outs)


def test_attend_fills_the_given_out_array(backend, rng):
    cache = make_cache(backend, batch=2, max_tokens=8)
    k = rng.standard_normal((2, 2, 2, 2, 16)).astype(np.float32)
    step = cache.plan(2)
    for layer in range(2):
        cache.write(step, layer, k[layer], -k[layer])
    q = rng.standard_normal((2, 2, 4, 16)).astype(np.float32)
    out = np.full((2, 2, 4, 16), np.nan, np.float32)
    result = cache.attend(step, 1, q, out=out)
    assert result is out
    assert np.array_equal(out, cache.attend(step, 1, q))
    keys = np.transpose(k[1], (0, 2, 1, 3))  # (n_seq, kv_heads, T, D)
    for s in range(2):
        expected = oracle.causal_chunk_attention(q[s], keys[s], -keys[s], [0, 1], scale_of(cache))
        np.testing.assert_allclose(out[s], expected, rtol=0, atol=ATOL)


def test_gqa_query_head_reads_kv_head_q_over_group(backend, rng):
    """With V rows constant per KV head (head h holds value h), query head qh must output exactly qh // G."""
    q_heads, kv_heads = 8, 2
    cache = make_cache(backend, q_heads=q_heads, kv_heads=kv_heads, batch=1, max_tokens=8)
    k = rng.standard_normal((2, 1, 5, kv_heads, 16)).astype(np.float32)
    v = np.zeros((2, 1, 5, kv_heads, 16), np.float32)
    for h in range(kv_heads):
        v[:, :, :, h, :] = h + 1
    step = cache.plan(5)
    for layer in range(2):
        cache.write(step, layer, k[layer], v[layer])
    out = cache.attend(step, 0, rng.standard_normal((1, 5, q_heads, 16)).astype(np.float32))
    for qh in range(q_heads):
        np.testing.assert_allclose(out[0, :, qh], qh // (q_heads // kv_heads) + 1, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# capacity, reset, crop
# ---------------------------------------------------------------------------------------------------------------
def test_capacity_accessors_and_stats(backend, rng):
    cache = make_cache(backend, layers=3, q_heads=4, kv_heads=2, head_dim=16, batch=2, max_tokens=6)
    model = new_model(cache)
    assert cache.get_max_cache_shape() == 6
    for s in range(2):
        assert cache.get_seq_length(s) == 0 and cache.remaining_capacity(s) == 6 and not cache.is_full(s)
    check_step(cache, model, rng, 4, seq_ids=[0])
    check_step(cache, model, rng, 2)
    assert [cache.get_seq_length(s) for s in range(2)] == [6, 2]
    assert cache.get_seq_length() == 6, "seq defaults to 0"
    assert cache.is_full(0) and not cache.is_full(1) and cache.is_full()
    assert cache.remaining_capacity(0) == 0 and cache.remaining_capacity(1) == 4
    stats = cache.stats()
    token_bytes = 2 * 3 * 2 * 16 * 4  # K and V, 3 layers, 2 KV heads, 16 dims, 4 bytes
    assert stats["lengths"] == [6, 2]
    assert stats["tokens_used"] == 8 and stats["tokens_capacity"] == 12
    assert stats["utilization"] == pytest.approx(8 / 12)
    assert stats["bytes_per_token"] == token_bytes
    assert stats["bytes_used"] == 8 * token_bytes
    assert stats["nbytes"] == cache.nbytes == 12 * token_bytes == cache.kv.nbytes
    assert stats["dtype"] == "float32" and stats["element_bytes"] == 4 and stats["backend"] == backend
    check_stored(cache, model)


def test_reset_all_and_one_sequence(backend, rng):
    cache = make_cache(backend, batch=3, max_tokens=20)
    model = new_model(cache)
    check_step(cache, model, rng, 6)
    kv_before = cache.kv.copy()
    cache.reset(seq=1)
    model.reset(seq=1)
    assert cache.lengths.tolist() == [6, 0, 6]
    assert np.array_equal(cache.kv, kv_before), "reset only changes lengths"
    check_step(cache, model, rng, 3)  # seq 1 restarts at position 0 and sees only its new tokens
    check_step(cache, model, rng, 1, seq_ids=[1])
    cache.reset()
    model.reset()
    assert cache.lengths.tolist() == [0, 0, 0]
    check_step(cache, model, rng, 2)
    check_stored(cache, model)


@pytest.mark.parametrize("max_length, seq", [(4, None), (-3, None), (100, None), (0, 1), (-2, 0), (2, 2)])
def test_crop_keeps_the_first_tokens(backend, rng, max_length, seq):
    cache = make_cache(backend, batch=3, max_tokens=20)
    model = new_model(cache)
    check_step(cache, model, rng, 7)
    check_step(cache, model, rng, 3, seq_ids=[1])
    cache.crop(max_length, seq=seq)
    model.crop(max_length, seq=seq)
    assert cache.lengths.tolist() == model.lengths()
    check_stored(cache, model)
    check_step(cache, model, rng, 2)  # new tokens land right after the kept ones; attention sees only those
    check_stored(cache, model)


def test_returned_arrays_are_copies(backend, rng):
    cache = make_cache(backend, batch=1, max_tokens=8)
    k = rng.standard_normal((2, 1, 2, 2, 16)).astype(np.float32)
    cache.append(k, k)
    before = cache.state()
    cache.lengths[0] = 7
    cache.keys(0)[...] = 0
    cache.values(1)[...] = 0
    snapshot = cache.state()
    snapshot["kv"][...] = 1
    snapshot["lengths"][...] = 3
    with pytest.raises(ValueError):
        cache.kv[...] = 0  # the storage view is read-only: only write() changes the cache
    assert_state_equal(before, cache.state())


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: the specific error, the argument named, the state unchanged
# ---------------------------------------------------------------------------------------------------------------
def filled_cache(backend, dtype="float32"):
    """layers=2, q_heads=4, kv_heads=2, D=16, batch=2, max_tokens=8, lengths [3, 5], non-zero data."""
    cache = make_cache(backend, dtype=dtype, batch=2, max_tokens=8)
    rng = np.random.default_rng(7)
    shape = cache.shape
    k = rng.standard_normal((2, 2, 3, 2, 16)).astype(shape.public_dtype)
    cache.append(k, -k)
    k = rng.standard_normal((2, 1, 2, 2, 16)).astype(shape.public_dtype)
    cache.append(k, -k, seq_ids=[1])
    assert cache.lengths.tolist() == [3, 5]
    return cache


def arr(cache, n_seq=2, T=1, heads=None, dtype=None, dim=None):
    s = cache.shape
    shape = (n_seq, T, s.kv_heads if heads is None else heads, s.head_dim if dim is None else dim)
    return np.ones(shape, dtype=s.public_dtype if dtype is None else dtype)


def q_arr(cache, n_seq=2, T=1, heads=None, dtype=np.float32):
    return arr(cache, n_seq, T, cache.shape.q_heads if heads is None else heads, dtype)


def five_d(cache, n_seq=2, T=1, layers=None, heads=None, dtype=None):
    s = cache.shape
    shape = (s.layers if layers is None else layers, n_seq, T, s.kv_heads if heads is None else heads, s.head_dim)
    return np.ones(shape, dtype=s.public_dtype if dtype is None else dtype)


class Other:
    """Stands in for something that is not a Step."""


def _advanced(c):
    step = c.plan(1)
    c.write(step, 0, arr(c), arr(c))
    c.write(step, 1, arr(c), arr(c))
    c.advance(step)
    return step


def _reset_after_plan(c):
    step = c.plan(1, [0])
    c.reset(seq=1)
    return step


def _cropped_after_plan(c):
    step = c.plan(1, [0])
    c.crop(-1, seq=1)
    return step


# Each case: (id, setup(cache) -> thunk that must raise, error class, argument named, cache dtype)
# setup may change the cache (e.g. advance a step); the snapshot is taken after setup, right before the thunk.
BAD_CALLS = [
    # plan: num_tokens
    ("plan_zero_tokens", lambda c: lambda: c.plan(0), ShapeError, "num_tokens"),
    ("plan_negative_tokens", lambda c: lambda: c.plan(-1), ShapeError, "num_tokens"),
    ("plan_float_tokens", lambda c: lambda: c.plan(1.5), ShapeError, "num_tokens"),
    ("plan_whole_float_tokens", lambda c: lambda: c.plan(1.0), ShapeError, "num_tokens"),
    ("plan_numpy_float_tokens", lambda c: lambda: c.plan(np.float64(2)), ShapeError, "num_tokens"),
    ("plan_bool_tokens", lambda c: lambda: c.plan(True), ShapeError, "num_tokens"),
    ("plan_str_tokens", lambda c: lambda: c.plan("1"), ShapeError, "num_tokens"),
    # plan: seq_ids
    ("plan_duplicate_seq_ids", lambda c: lambda: c.plan(1, [0, 0]), ShapeError, "seq_ids"),
    ("plan_duplicate_seq_ids_numpy", lambda c: lambda: c.plan(1, np.array([1, 0, 1])), ShapeError, "seq_ids"),
    ("plan_seq_id_past_batch", lambda c: lambda: c.plan(1, [2]), IndexOutOfRangeError, "seq_ids"),
    ("plan_negative_seq_id", lambda c: lambda: c.plan(1, [-1]), IndexOutOfRangeError, "seq_ids"),
    ("plan_empty_seq_ids", lambda c: lambda: c.plan(1, []), ShapeError, "seq_ids"),
    ("plan_2d_seq_ids", lambda c: lambda: c.plan(1, [[0, 1]]), ShapeError, "seq_ids"),
    ("plan_float_seq_ids", lambda c: lambda: c.plan(1, [0.0]), ShapeError, "seq_ids"),
    ("plan_bool_seq_ids", lambda c: lambda: c.plan(1, np.array([True])), ShapeError, "seq_ids"),
    # plan: overflow (lengths [3, 5] of 8)
    ("plan_overflow_one_sequence", lambda c: lambda: c.plan(4), CacheOverflowError, "num_tokens"),
    ("plan_overflow_subset", lambda c: lambda: c.plan(6, [0]), CacheOverflowError, "num_tokens"),
    ("plan_overflow_second_of_subset", lambda c: lambda: c.plan(4, [0, 1]), CacheOverflowError, "num_tokens"),
    ("plan_overflow_huge", lambda c: lambda: c.plan(10**12), CacheOverflowError, "num_tokens"),
    # length + num_tokens must not wrap around in int64 (lengths are [3, 5]), nor fail to convert
    ("plan_overflow_int64_max", lambda c: lambda: c.plan(2**63 - 1), CacheOverflowError, "num_tokens"),
    ("plan_overflow_int64_wraps", lambda c: lambda: c.plan(2**63 - 4, [1]), CacheOverflowError, "num_tokens"),
    ("plan_overflow_beyond_int64", lambda c: lambda: c.plan(10**30), CacheOverflowError, "num_tokens"),
    # write: layer
    ("write_layer_past_end", lambda c: (lambda s: lambda: c.write(s, 2, arr(c), arr(c)))(c.plan(1)),
     IndexOutOfRangeError, "layer"),
    ("write_layer_negative", lambda c: (lambda s: lambda: c.write(s, -1, arr(c), arr(c)))(c.plan(1)),
     IndexOutOfRangeError, "layer"),
    ("write_layer_float", lambda c: (lambda s: lambda: c.write(s, 1.0, arr(c), arr(c)))(c.plan(1)),
     IndexOutOfRangeError, "layer"),
    ("write_layer_numpy_past_end", lambda c: (lambda s: lambda: c.write(s, np.int64(2), arr(c), arr(c)))(c.plan(1)),
     IndexOutOfRangeError, "layer"),
    # write: shapes
    ("write_k_query_heads", lambda c: (lambda s: lambda: c.write(s, 0, arr(c, heads=4), arr(c)))(c.plan(1)),
     ShapeError, "k_new"),
    ("write_k_wrong_T", lambda c: (lambda s: lambda: c.write(s, 0, arr(c, T=2), arr(c)))(c.plan(1)),
     ShapeError, "k_new"),
    ("write_k_wrong_n_seq", lambda c: (lambda s: lambda: c.write(s, 0, arr(c, n_seq=2), arr(c, n_seq=2)))(
        c.plan(1, [1])), ShapeError, "k_new"),
    ("write_k_wrong_dim", lambda c: (lambda s: lambda: c.write(s, 0, arr(c, dim=8), arr(c)))(c.plan(1)),
     ShapeError, "k_new"),
    ("write_v_wrong_shape", lambda c: (lambda s: lambda: c.write(s, 0, arr(c), arr(c, T=3)))(c.plan(1)),
     ShapeError, "v_new"),
    # write: dtypes
    ("write_k_float64", lambda c: (lambda s: lambda: c.write(s, 0, arr(c, dtype=np.float64), arr(c)))(c.plan(1)),
     DTypeError, "k_new"),
    ("write_v_float16_into_fp32", lambda c: (lambda s: lambda: c.write(s, 0, arr(c), arr(c, dtype=np.float16)))(
        c.plan(1)), DTypeError, "v_new"),
    ("write_k_list", lambda c: (lambda s: lambda: c.write(s, 0, arr(c).tolist(), arr(c)))(c.plan(1)),
     DTypeError, "k_new"),
    ("write_k_uint16_into_fp32", lambda c: (lambda s: lambda: c.write(s, 0, arr(c, dtype=np.uint16), arr(c)))(
        c.plan(1)), DTypeError, "k_new"),
    # attend
    ("attend_q_kv_heads", lambda c: (lambda s: lambda: c.attend(s, 0, q_arr(c, heads=2)))(c.plan(1)),
     ShapeError, "q"),
    ("attend_q_wrong_T", lambda c: (lambda s: lambda: c.attend(s, 0, q_arr(c, T=1)))(c.plan(2, [0])),
     ShapeError, "q"),
    ("attend_q_float64", lambda c: (lambda s: lambda: c.attend(s, 0, q_arr(c, dtype=np.float64)))(c.plan(1)),
     DTypeError, "q"),
    ("attend_q_float16", lambda c: (lambda s: lambda: c.attend(s, 0, q_arr(c, dtype=np.float16)))(c.plan(1)),
     DTypeError, "q"),
    ("attend_out_wrong_shape", lambda c: (lambda s: lambda: c.attend(s, 0, q_arr(c), out=q_arr(c, T=2)))(c.plan(1)),
     ShapeError, "out"),
    ("attend_out_float64", lambda c: (lambda s: lambda: c.attend(s, 0, q_arr(c), out=q_arr(c, dtype=np.float64)))(
        c.plan(1)), DTypeError, "out"),
    ("attend_layer_past_end", lambda c: (lambda s: lambda: c.attend(s, 2, q_arr(c)))(c.plan(1)),
     IndexOutOfRangeError, "layer"),
    # stale steps
    ("write_after_advance", lambda c: (lambda s: lambda: c.write(s, 0, arr(c), arr(c)))(_advanced(c)),
     StaleStepError, "step"),
    ("attend_after_advance", lambda c: (lambda s: lambda: c.attend(s, 0, q_arr(c)))(_advanced(c)),
     StaleStepError, "step"),
    ("advance_twice", lambda c: (lambda s: lambda: c.advance(s))(_advanced(c)), StaleStepError, "step"),
    ("write_after_reset", lambda c: (lambda s: lambda: c.write(s, 0, arr(c, 1), arr(c, 1)))(_reset_after_plan(c)),
     StaleStepError, "step"),
    ("advance_after_crop", lambda c: (lambda s: lambda: c.advance(s))(_cropped_after_plan(c)), StaleStepError, "step"),
    ("write_not_a_step", lambda c: lambda: c.write(Other(), 0, arr(c), arr(c)), StaleStepError, "step"),
    ("advance_tuple", lambda c: lambda: c.advance((0, 1)), StaleStepError, "step"),
    ("attend_none_step", lambda c: lambda: c.attend(None, 0, q_arr(c)), StaleStepError, "step"),
    # append
    ("append_4d", lambda c: lambda: c.append(arr(c), arr(c)), ShapeError, "k_new"),
    ("append_wrong_layers", lambda c: lambda: c.append(five_d(c, layers=3), five_d(c, layers=3)), ShapeError,
     "k_new"),
    ("append_query_heads", lambda c: lambda: c.append(five_d(c, heads=4), five_d(c, heads=4)), ShapeError, "k_new"),
    ("append_v_wrong_shape", lambda c: lambda: c.append(five_d(c), five_d(c, T=2)), ShapeError, "v_new"),
    ("append_v_wrong_dtype", lambda c: lambda: c.append(five_d(c), five_d(c, dtype=np.float64)), DTypeError, "v_new"),
    ("append_k_wrong_dtype", lambda c: lambda: c.append(five_d(c, dtype=np.float64), five_d(c)), DTypeError, "k_new"),
    ("append_overflow", lambda c: lambda: c.append(five_d(c, T=4), five_d(c, T=4)), CacheOverflowError, "num_tokens"),
    ("append_duplicate_seq_ids", lambda c: lambda: c.append(five_d(c), five_d(c), seq_ids=[1, 1]), ShapeError,
     "seq_ids"),
    ("append_bad_seq_id", lambda c: lambda: c.append(five_d(c, 1), five_d(c, 1), seq_ids=[3]),
     IndexOutOfRangeError, "seq_ids"),
    # reset / crop
    ("reset_seq_past_batch", lambda c: lambda: c.reset(seq=2), IndexOutOfRangeError, "seq"),
    ("reset_seq_negative", lambda c: lambda: c.reset(seq=-1), IndexOutOfRangeError, "seq"),
    ("reset_seq_float", lambda c: lambda: c.reset(seq=1.0), IndexOutOfRangeError, "seq"),
    ("crop_too_negative_for_one_sequence", lambda c: lambda: c.crop(-4), IndexOutOfRangeError, "max_length"),
    ("crop_too_negative_one_seq", lambda c: lambda: c.crop(-6, seq=1), IndexOutOfRangeError, "max_length"),
    ("crop_float", lambda c: lambda: c.crop(2.0), ShapeError, "max_length"),
    ("crop_bool", lambda c: lambda: c.crop(True), ShapeError, "max_length"),
    ("crop_none", lambda c: lambda: c.crop(None), ShapeError, "max_length"),
    ("crop_seq_past_batch", lambda c: lambda: c.crop(1, seq=2), IndexOutOfRangeError, "seq"),
    # read accessors
    ("get_seq_length_past_batch", lambda c: lambda: c.get_seq_length(2), IndexOutOfRangeError, "seq"),
    ("remaining_capacity_negative", lambda c: lambda: c.remaining_capacity(-1), IndexOutOfRangeError, "seq"),
    ("is_full_past_batch", lambda c: lambda: c.is_full(5), IndexOutOfRangeError, "seq"),
    ("keys_layer_past_end", lambda c: lambda: c.keys(2, 0), IndexOutOfRangeError, "layer"),
    ("values_seq_past_batch", lambda c: lambda: c.values(0, 2), IndexOutOfRangeError, "seq"),
    ("keys_negative_layer", lambda c: lambda: c.keys(-1), IndexOutOfRangeError, "layer"),
]

BAD_CALLS_FP16 = [
    ("fp16_write_float32", lambda c: (lambda s: lambda: c.write(s, 0, arr(c, dtype=np.float32), arr(c)))(c.plan(1)),
     DTypeError, "k_new"),
    ("fp16_write_uint16_bits", lambda c: (lambda s: lambda: c.write(s, 0, arr(c), arr(c, dtype=np.uint16)))(c.plan(1)),
     DTypeError, "v_new"),
    ("fp16_append_float32", lambda c: lambda: c.append(five_d(c, dtype=np.float32), five_d(c, dtype=np.float32)),
     DTypeError, "k_new"),
    ("fp16_attend_q_float16", lambda c: (lambda s: lambda: c.attend(s, 0, q_arr(c, dtype=np.float16)))(c.plan(1)),
     DTypeError, "q"),
]



@pytest.mark.parametrize("setup, error, argument", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_and_changes_nothing(backend, setup, error, argument):
    run_bad_call(filled_cache(backend), setup, error, argument)


@pytest.mark.parametrize("setup, error, argument", [c[1:] for c in BAD_CALLS_FP16],
                         ids=[c[0] for c in BAD_CALLS_FP16])
def test_bad_input_fp16_raises_and_changes_nothing(backend, setup, error, argument):
    run_bad_call(filled_cache(backend, "float16"), setup, error, argument)


def test_failed_calls_leave_a_working_cache(backend, rng):
    """After every kind of refused call, the next valid step continues exactly where the cache was."""
    cache = filled_cache(backend)
    model = new_model(cache)
    for layer in range(2):  # mirror filled_cache's contents into the model
        for s in range(2):
            model.append(layer, s, np.transpose(cache.keys(layer, s), (1, 0, 2)).astype(np.float64),
                         np.transpose(cache.values(layer, s), (1, 0, 2)).astype(np.float64))
    for label, setup, error, argument in BAD_CALLS:
        if "_after_" in label or label.endswith("_twice"):  # these change the cache on purpose to make a step stale
            continue
        with pytest.raises(error):
            setup(cache)()
    check_step(cache, model, rng, 3)
    check_stored(cache, model)


def test_overflow_message_names_remaining_capacity(backend):
    cache = filled_cache(backend)
    with pytest.raises(CacheOverflowError) as info:
        cache.plan(4)
    assert "remaining capacity 3 of sequence 1" in str(info.value)
    assert info.value.actual == 4


def test_step_from_another_cache_is_rejected(backend):
    """A Step carries positions computed from *its* cache's lengths. Two caches at the same version number must not
    accept each other's steps: here cache b's step would write a's sequence 0 at position 6 while a holds 3 tokens,
    leaving a hole that attention later reads (and with other capacities, out of bounds)."""
    a = filled_cache(backend)  # lengths [3, 5], version 2
    b = make_cache(backend, batch=2, max_tokens=8)
    k = np.ones((2, 2, 6, 2, 16), np.float32)
    b.append(k, k)
    b.append(k[:, :1, :1], k[:, :1, :1], seq_ids=[1])  # lengths [6, 7]; with per-cache counters also version 2
    foreign = b.plan(1, [0])
    run_bad_call(a, lambda c: lambda: c.write(foreign, 0, arr(c, 1), arr(c, 1)), StaleStepError, "step")


# ---------------------------------------------------------------------------------------------------------------
# construction errors
# ---------------------------------------------------------------------------------------------------------------
GOOD_SHAPE = kvref.CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=16)


@pytest.mark.parametrize("kwargs, error, argument", [
    ({"shape": (2, 4, 2, 16)}, ShapeError, "shape"),
    ({"shape": "gpt2"}, ShapeError, "shape"),
    ({"batch": 0}, ShapeError, "batch"),
    ({"batch": -2}, ShapeError, "batch"),
    ({"batch": 2.0}, ShapeError, "batch"),
    ({"batch": True}, ShapeError, "batch"),
    ({"max_tokens": 0}, ShapeError, "max_tokens"),
    ({"max_tokens": "8"}, ShapeError, "max_tokens"),
    ({"max_tokens": 8.5}, ShapeError, "max_tokens"),
    ({"backend": "gpu"}, BackendUnavailableError, "backend"),
    ({"backend": "CPU"}, BackendUnavailableError, "backend"),
    ({"backend": None}, BackendUnavailableError, "backend"),
    ({"backend": ""}, BackendUnavailableError, "backend"),
], ids=lambda p: repr(p) if not isinstance(p, type) else p.__name__)
def test_bad_constructor_arguments(kwargs, error, argument):
    args = {"shape": GOOD_SHAPE, "batch": 1, "max_tokens": 8, "backend": "python"}
    args.update(kwargs)
    with pytest.raises(error) as info:
        kvref.FlatCache(args.pop("shape"), **args)
    assert type(info.value) is error
    assert info.value.argument == argument
    assert str(info.value).startswith(f"{argument}: expected ")


def test_cuda_backend_refused_when_unavailable():
    available, reason = kvref.backends()["cuda"]
    if available:
        pytest.skip(f"cuda is available here ({reason}); tests_cuda/ covers it")
    with pytest.raises(BackendUnavailableError) as info:
        kvref.FlatCache(GOOD_SHAPE, batch=1, max_tokens=8, backend="cuda")
    assert info.value.argument == "backend"
    assert reason in str(info.value), "the message says why"


def test_error_hierarchy():
    """Each error is also the matching builtin, so generic handlers still catch it."""
    assert issubclass(ShapeError, ValueError) and issubclass(DTypeError, TypeError)
    assert issubclass(IndexOutOfRangeError, IndexError) and issubclass(BackendUnavailableError, RuntimeError)
    for cls in (ShapeError, DTypeError, IndexOutOfRangeError, CacheOverflowError, StaleStepError,
                BackendUnavailableError):
        assert issubclass(cls, KVCacheError)
        e = cls("arg", "something", 3, detail="why")
        assert str(e) == "arg: expected something, got 3 (why)"
        assert (e.argument, e.expected, e.actual) == ("arg", "something", 3)


def test_backends_report():
    report = kvref.backends()
    assert set(report) == {"python", "cpu", "cuda"}
    assert report["python"][0] is True and report["cpu"][0] is True
    for available, reason in report.values():
        assert isinstance(available, bool) and isinstance(reason, str) and reason


# ---------------------------------------------------------------------------------------------------------------
# the CPU backend's two schedules: serial (the spec's loop) and prange over (sequence, token, KV head)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cpu_parallel_schedule_matches_serial_and_oracle(rng, dtype):
    import numba

    from kvref.cpu import flat as cpu_flat

    cache = make_cache("cpu", layers=1, q_heads=8, kv_heads=2, head_dim=32, dtype=dtype, batch=3, max_tokens=200)
    k = rng.standard_normal((1, 3, 150, 2, 32)).astype(dtype)
    v = rng.standard_normal((1, 3, 150, 2, 32)).astype(dtype)
    cache.append(k, v)
    step = cache.plan(3)
    k_new = rng.standard_normal((3, 3, 2, 32)).astype(dtype)
    v_new = rng.standard_normal((3, 3, 2, 32)).astype(dtype)
    cache.write(step, 0, k_new, v_new)
    q = rng.standard_normal((3, 3, 8, 32)).astype(np.float32)
    scale = kvref.default_scale(32)
    storage = cache._kv
    serial = np.zeros_like(q)
    parallel = np.zeros_like(q)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        attend_serial, attend_parallel = cpu_flat.ATTEND(4, 32)[:2]  # G = 8 // 2, D = 32
        attend_serial(storage, 0, step.seq_ids, step.positions, q, scale, serial)
        attend_parallel(storage, 0, step.seq_ids, step.positions, q, scale, parallel)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_allclose(parallel, serial, rtol=0, atol=1e-6)
    all_k = np.concatenate([k[0], k_new], axis=1).astype(np.float64)  # (batch, 153, kv_heads, D)
    all_v = np.concatenate([v[0], v_new], axis=1).astype(np.float64)
    for i in range(3):
        expected = oracle.causal_chunk_attention(q[i], all_k[i].transpose(1, 0, 2), all_v[i].transpose(1, 0, 2),
                                                 step.positions[i], scale)
        np.testing.assert_allclose(parallel[i], expected, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# a Step is a record of plan(): edited or hand-built steps are refused before anything is written
# ---------------------------------------------------------------------------------------------------------------
def test_step_arrays_are_read_only(backend):
    cache = make_cache(backend, batch=2, max_tokens=8)
    step = cache.plan(2)
    for array in (step.seq_ids, step.positions, step.slots):
        with pytest.raises(ValueError):
            array[...] = 0


@pytest.mark.parametrize("field, value", [
    ("slots", np.array([[0, 99], [0, 1]])),  # a slot past the row: would write out of bounds
    ("slots", np.array([[0, -1], [0, 1]])),  # a negative slot: NumPy and Numba would wrap it around
    ("positions", np.array([[0, 999], [0, 1]])),  # advance would set a length past max_tokens
    ("seq_ids", np.array([0, 5])),  # a sequence that does not exist
    ("seq_ids", np.array([0, 0])),  # the same sequence twice
])
def test_edited_step_is_refused_and_changes_nothing(backend, rng, field, value):
    import dataclasses

    cache = make_cache(backend, batch=2, max_tokens=4)
    cache.append(rng.standard_normal((2, 2, 1, 2, 16)).astype(np.float32),
                 rng.standard_normal((2, 2, 1, 2, 16)).astype(np.float32))
    # positions of the fresh cache start at 1 after the append; build the edited step from a real one
    step = cache.plan(2)
    edited = dataclasses.replace(step, **{field: value})
    k = rng.standard_normal((2, 2, 2, 16)).astype(np.float32)
    q = rng.standard_normal((2, 2, 4, 16)).astype(np.float32)
    before = cache.state()
    for call in (lambda: cache.write(edited, 0, k, k), lambda: cache.attend(edited, 0, q),
                 lambda: cache.advance(edited)):
        with pytest.raises(KVCacheError):
            call()
        assert_state_equal(before, cache.state())
    for layer in range(2):  # the genuine step still works
        cache.write(step, layer, k, k)
    cache.advance(step)
    assert cache.lengths.tolist() == [3, 3]


def test_out_overlapping_q_is_refused(backend, rng):
    cache = make_cache(backend, batch=1, max_tokens=4)
    step = cache.plan(1)
    k = rng.standard_normal((1, 1, 2, 16)).astype(np.float32)
    cache.write(step, 0, k, k)
    q = rng.standard_normal((1, 1, 4, 16)).astype(np.float32)
    with pytest.raises(ShapeError) as info:
        cache.attend(step, 0, q, out=q)
    assert info.value.argument == "out"


def test_crop_accepts_small_numpy_integers(backend, rng):
    cache = make_cache(backend, batch=1, max_tokens=300)
    k = rng.standard_normal((2, 1, 300, 2, 16)).astype(np.float32)
    cache.append(k, k)
    cache.crop(np.int8(-1))
    assert cache.lengths.tolist() == [299]
    cache.crop(np.int16(200))
    assert cache.lengths.tolist() == [200]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_infinite_keys_give_nan_on_every_backend(bad):
    """A corrupt key must not vanish: the float64 definition gives NaN, and so must every backend."""
    outs = {}
    for b in BACKENDS:
        cache = make_cache(b, layers=1, q_heads=1, kv_heads=1, head_dim=16, batch=1, max_tokens=4)
        k = np.ones((1, 1, 3, 1, 16), np.float32)
        k[0, 0, 1, 0, 3] = bad
        cache.append(k, np.ones_like(k))
        step = cache.plan(1)
        cache.write(step, 0, np.ones((1, 1, 1, 16), np.float32), np.ones((1, 1, 1, 16), np.float32))
        with np.errstate(invalid="ignore"):  # inf - inf in the python spec: the NaN this test expects
            outs[b] = cache.attend(step, 0, np.ones((1, 1, 1, 16), np.float32))
    with np.errstate(invalid="ignore"):
        expected = oracle.attention(np.ones(16), np.where(np.arange(4)[:, None] == 1,
                                                          np.where(np.arange(16) == 3, bad, 1.0), 1.0),
                                    np.ones((4, 16)), 0.25)
    assert np.all(np.isnan(expected))
    for b, out in outs.items():
        assert np.all(np.isnan(out)), b
