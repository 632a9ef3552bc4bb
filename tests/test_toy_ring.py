"""The toy decoder with sliding-window attention (kvref/toy.py + kvref/ring.py).

Generating with the ring cache equals a full recompute with the window mask, also when the ring wraps many times,
when prefill chunks wrap it (deferred steps) and with attention sinks. With W >= the whole sequence the ring equals
the flat cache bit for bit. Tolerances are those of tests/test_toy.py (float32 1e-4, float16 2e-2).
"""

import dataclasses

import numpy as np
import pytest
from oracle import window_chunk_attention

import kvref
from kvref.ring import must_defer
from kvref.toy import (ToyConfig, ToyModel, attention_dot_products, attention_mask, causal_attention, causal_mask,
                       token_computations)

FP32_TOL = dict(rtol=1e-4, atol=1e-4)
FP16_ATOL = 2e-2

#: a GQA model with a window of 8 keys; max_tokens leaves room for runs that wrap the ring many times
WINDOWED = ToyConfig(vocab=48, d_model=32, layers=2, q_heads=4, kv_heads=2, head_dim=8, d_ff=64, max_tokens=96,
                     seed=11, sliding_window=8)
#: the same with 2 attention sinks (positions 0 and 1 stay visible; the ring covers the other 6 slots)
SINKS = dataclasses.replace(WINDOWED, attention_sinks=2)
#: the same weights with full causal attention
FULL = dataclasses.replace(WINDOWED, sliding_window=0)


def prompt_of(config, length, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab, size=length)


def assert_same_generation(cached, full, tol=FP32_TOL):
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    np.testing.assert_allclose(cached.logits, full.logits, **tol)
    assert np.array_equal(cached.tokens, cached.logits.argmax(axis=1))


# ---------------------------------------------------------------------------------------------------------------
# Ring cache generation == recompute with the same mask
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [WINDOWED, SINKS], ids=["window8", "window8-sinks2"])
def test_ring_generation_matches_masked_recompute(backend, config):
    """60 tokens after a 10-token prompt: the ring of 8 slots wraps 8 times; every token and logit agrees."""
    model = ToyModel(config)
    P, N = 10, 60
    prompt = prompt_of(config, P)
    full = model.generate(prompt, N, use_cache=False)
    cached = model.generate(prompt, N, use_cache=True, backend=backend)
    assert isinstance(cached.cache, kvref.RingCache)
    assert (cached.cache.window, cached.cache.sinks) == (config.sliding_window, config.attention_sinks)
    assert_same_generation(cached, full)
    # the commit step's logits are the masked recompute's prediction after the whole sequence
    np.testing.assert_allclose(cached.final_logits, model.forward_full(cached.sequence)[-1], **FP32_TOL)
    # the ring saw all P + N tokens and holds the sinks plus the last W - S positions, in every layer
    W, S = config.sliding_window, config.attention_sinks
    assert cached.cache.get_seq_length() == P + N
    for layer in range(config.layers):
        np.testing.assert_array_equal(cached.cache.held_positions(layer=layer),
                                      list(range(S)) + list(range(P + N - (W - S), P + N)))
    # work: the same tokens as the flat cache; each query reads min(p + 1, W) keys
    assert cached.token_computations == token_computations(P, N, True)
    assert full.token_computations == token_computations(P, N, False)
    per = config.layers * config.q_heads
    assert cached.step_dot_products == [per * (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 2 * 8)] + [per * 8] * N
    assert cached.dot_products == attention_dot_products(P, N, True, config.layers, config.q_heads, window=W)
    assert full.dot_products == attention_dot_products(P, N, False, config.layers, config.q_heads, window=W)


@pytest.mark.parametrize("config", [WINDOWED, SINKS], ids=["window8", "window8-sinks2"])
@pytest.mark.parametrize("chunk", [3, 6, 8, 13])
def test_ring_chunked_prefill_matches_masked_recompute(backend, config, chunk):
    """A 20-token prompt in chunks of C through a ring of 8: chunks that cross the ring's end are deferred."""
    model = ToyModel(config)
    P, W = 20, config.sliding_window
    prompt = prompt_of(config, P, seed=1)
    starts = range(0, P, chunk)
    assert any(must_defer(start, min(chunk, P - start), W) for start in starts)  # the deferred path is exercised
    # every prompt row, not only the last, equals the masked recompute
    cache = model.new_cache(backend=backend)
    rows = np.concatenate([model.forward_cached(prompt[start:start + chunk], cache) for start in starts])
    assert cache.get_seq_length() == P
    np.testing.assert_allclose(rows, model.forward_full(prompt), **FP32_TOL)
    # and a generation prefilled that way
    full = model.generate(prompt, 30, use_cache=False)
    cached = model.generate(prompt, 30, backend=backend, prefill_chunk=chunk)
    assert_same_generation(cached, full)
    assert cached.step_tokens[:len(starts)] == [min(chunk, P - start) for start in starts]
    assert cached.dot_products == attention_dot_products(P, 30, True, config.layers, config.q_heads, window=W)


def test_teacher_forced_ring_every_position(backend):
    """Token by token through a ring with sinks, 50 positions: every row equals the masked recompute."""
    model = ToyModel(SINKS)
    tokens = prompt_of(SINKS, 50, seed=5)
    cache = model.new_cache(backend=backend)
    rows = np.concatenate([model.forward_cached(tokens[i:i + 1], cache) for i in range(tokens.size)])
    np.testing.assert_allclose(rows, model.forward_full(tokens), **FP32_TOL)


def test_ring_on_a_full_attention_model_is_the_windowed_model(backend):
    """A RingCache given to a sliding_window=0 model makes its attention windowed (documented): the result is the
    windowed model's, same weights."""
    full_model, windowed = ToyModel(FULL), ToyModel(SINKS)
    prompt = prompt_of(FULL, 10, seed=2)
    ring = kvref.RingCache(FULL.cache_shape(), window=8, sinks=2, backend=backend)
    cached = full_model.generate(prompt, 30, cache=ring)
    assert_same_generation(cached, windowed.generate(prompt, 30, use_cache=False))
    assert cached.dot_products == attention_dot_products(10, 30, True, FULL.layers, FULL.q_heads, window=8)


# ---------------------------------------------------------------------------------------------------------------
# The window matters (so the tests above are not vacuous), and W >= length changes nothing
# ---------------------------------------------------------------------------------------------------------------
def test_window_changes_the_model_once_the_sequence_exceeds_it():
    windowed, full = ToyModel(WINDOWED), ToyModel(FULL)
    for name, w in windowed.parameters().items():  # the window is not a weight
        np.testing.assert_array_equal(w, full.parameters()[name])
    tokens = prompt_of(WINDOWED, 30, seed=3)
    a, b = windowed.forward_full(tokens), full.forward_full(tokens)
    W = WINDOWED.sliding_window
    np.testing.assert_allclose(a[:W], b[:W], rtol=0, atol=1e-6)  # rows 0..W-1 see the same keys
    assert np.abs(a[W:] - b[W:]).max(axis=1).min() > 1e-3  # every later row differs
    # over a long generation the tokens differ too
    prompt = prompt_of(WINDOWED, 10)
    long_w, long_f = windowed.generate(prompt, 60, use_cache=False), full.generate(prompt, 60, use_cache=False)
    assert not np.array_equal(long_w.tokens, long_f.tokens)
    assert np.abs(long_w.logits - long_f.logits).max() > 0.1


def test_window_changes_nothing_while_the_sequence_fits(backend):
    """P + N <= W: the windowed model (ring cache) generates what the full model (flat cache) does."""
    windowed = ToyModel(dataclasses.replace(WINDOWED, sliding_window=16))
    full = ToyModel(FULL)
    prompt = prompt_of(FULL, 6, seed=4)
    ring = windowed.generate(prompt, 10, backend=backend)  # 16 tokens with the commit step: exactly W
    flat = full.generate(prompt, 10, backend=backend)
    assert isinstance(ring.cache, kvref.RingCache) and isinstance(flat.cache, kvref.FlatCache)
    assert_same_generation(ring, flat)
    np.testing.assert_allclose(ring.final_logits, flat.final_logits, **FP32_TOL)
    assert_same_generation(windowed.generate(prompt, 10, use_cache=False), full.generate(prompt, 10, use_cache=False),
                           tol=dict(rtol=0, atol=1e-6))


@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("extra", [0, 7])
def test_ring_as_large_as_the_sequence_equals_flat_exactly(backend, chunk, extra):
    """A RingCache with window >= P + N on a full-attention model: the same tokens as a FlatCache and, on the python
    backend, bit-identical logits (an unwrapped ring goes through exactly the flat cache's tiles, kvref/attention.py
    attend_slots); compiled, equal to float32 rounding (see tests/test_ring.py, assert_same_arithmetic)."""
    model = ToyModel(FULL)
    P, N = 10, 20
    prompt = prompt_of(FULL, P, seed=6)
    flat = model.generate(prompt, N, backend=backend, prefill_chunk=chunk)
    ring_cache = kvref.RingCache(FULL.cache_shape(), window=P + N + extra, backend=backend)
    ring = model.generate(prompt, N, prefill_chunk=chunk, cache=ring_cache)
    np.testing.assert_array_equal(ring.tokens, flat.tokens)
    if backend == "python":  # the same float32 operations: bit-identical
        assert np.array_equal(ring.logits, flat.logits)
        assert np.array_equal(ring.final_logits, flat.final_logits)
    else:  # fast-math code may round differently once compiled vs loaded from the disk cache (test_ring.py)
        np.testing.assert_allclose(ring.logits, flat.logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ring.final_logits, flat.final_logits, rtol=1e-5, atol=1e-5)
    assert ring.step_dot_products == flat.step_dot_products
    for layer in range(FULL.layers):
        # layer 0 stores the embeddings' projections: the same bytes; later layers store projections of the
        # attention outputs below them, bit-identical on the python backend and to float32 rounding compiled
        same = np.array_equal if backend == "python" or layer == 0 else (
            lambda a, b: np.allclose(a, b, rtol=1e-5, atol=1e-5))
        assert same(ring_cache.keys(layer), flat.cache.keys(layer))
        assert same(ring_cache.values(layer), flat.cache.values(layer))


# ---------------------------------------------------------------------------------------------------------------
# fp16 ring
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [WINDOWED, SINKS], ids=["window8", "window8-sinks2"])
def test_fp16_ring_generation_matches_recompute(backend, config):
    model = ToyModel(config)
    prompt = prompt_of(config, 7, seed=1)
    full = model.generate(prompt, 10, use_cache=False)
    cached = model.generate(prompt, 10, backend=backend, dtype="float16")  # 17 tokens: the ring of 8 wraps
    assert isinstance(cached.cache, kvref.RingCache) and cached.cache.shape.dtype == "float16"
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    err = np.abs(cached.logits - full.logits).max()
    assert 0 < err <= FP16_ATOL  # not zero: the K/V really were rounded to fp16
    # layer 0's held keys are the fp16 rounding of the keys the full path computes at the held positions
    held = cached.cache.held_positions(layer=0)
    k_full = model.qkv(0, model.embed[cached.sequence], np.arange(cached.sequence.size))[1]
    np.testing.assert_array_equal(cached.cache.keys(0), k_full[held].astype(np.float16).transpose(1, 0, 2))


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
def ring(config, window, sinks=0, backend="python"):
    return kvref.RingCache(config.cache_shape(), window=window, sinks=sinks, backend=backend)


def test_mismatched_cache_raises_and_changes_nothing():
    model = ToyModel(SINKS)
    good = model.new_cache(backend="python")
    model.forward_cached(prompt_of(SINKS, 5), good)
    wrong = [ring(SINKS, 9, 2), ring(SINKS, 8, 0), ring(SINKS, 8, 3),
             kvref.FlatCache(SINKS.cache_shape(), backend="python"),
             kvref.RingCache(kvref.CacheShape(2, 4, 4, 8), window=8, sinks=2, backend="python")]  # wrong kv_heads
    for cache in wrong:
        before = cache.state()
        with pytest.raises(kvref.ShapeError) as info:
            model.forward_cached([1, 2, 3], cache)
        assert info.value.argument == "cache"
        with pytest.raises(kvref.ShapeError):
            model.generate([1, 2, 3], 4, cache=cache)
        after = cache.state()
        assert all(np.array_equal(before[key], after[key]) for key in ("kv", "lengths"))
        assert before["version"] == after["version"]
    with pytest.raises(kvref.ShapeError, match="expected a kvref.RingCache with window=8, sinks=2 .*got a RingCache "
                                                "with window=9, sinks=2"):
        model.forward_cached([1], wrong[0])
    # a full-attention model refuses what is not a cache
    with pytest.raises(kvref.ShapeError):
        ToyModel(FULL).forward_cached([1], object())
    # the good cache still works and was not touched by any of this
    more = prompt_of(SINKS, 3, seed=9)
    np.testing.assert_allclose(model.forward_cached(more, good)[-1],
                               model.forward_full(np.concatenate([prompt_of(SINKS, 5), more]))[-1], **FP32_TOL)


def test_positions_stop_at_max_tokens():
    """A ring never overflows; the model's max_tokens (max_position_embeddings) is the only limit."""
    config = dataclasses.replace(WINDOWED, max_tokens=24)
    model = ToyModel(config)
    with pytest.raises(kvref.ShapeError):  # 10 + 15 - 1 + 1 = 25 tokens fed
        model.generate(prompt_of(config, 10), 15, backend="python")
    assert model.generate(prompt_of(config, 10), 15, backend="python", commit_last=False).cache.get_seq_length() == 24
    assert model.generate(prompt_of(config, 10), 14, backend="python").cache.get_seq_length() == 24
    with pytest.raises(kvref.ShapeError):
        model.generate(prompt_of(config, 10), 16, use_cache=False)
    cache = model.new_cache(backend="python")
    model.forward_cached(prompt_of(config, 22), cache)
    before = cache.state()
    with pytest.raises(kvref.IndexOutOfRangeError):
        model.forward_cached([1, 2, 3], cache)
    after = cache.state()
    assert all(np.array_equal(before[key], after[key]) for key in ("kv", "slot_positions", "lengths"))
    model.forward_cached([1, 2], cache)
    assert cache.get_seq_length() == 24


@pytest.mark.parametrize("bad", [dict(sliding_window=8, attention_sinks=8), dict(sliding_window=8, attention_sinks=9),
                                 dict(sliding_window=-1), dict(sliding_window=8, attention_sinks=-1),
                                 dict(attention_sinks=2), dict(sliding_window=4.0), dict(sliding_window=True),
                                 dict(sliding_window=8, attention_sinks=1.5)])
def test_bad_window_config_raises(bad):
    with pytest.raises(kvref.ShapeError):
        ToyConfig(**bad)


def test_new_cache_kind():
    assert isinstance(ToyModel(FULL).new_cache(backend="python"), kvref.FlatCache)
    cache = ToyModel(SINKS).new_cache(backend="python", dtype="float16", batch=2)
    assert isinstance(cache, kvref.RingCache)
    assert (cache.window, cache.sinks, cache.batch, cache.shape.dtype) == (8, 2, 2, "float16")
    with pytest.raises(kvref.ShapeError):  # a ring has W slots, not max_tokens
        ToyModel(SINKS).new_cache(backend="python", max_tokens=32)


# ---------------------------------------------------------------------------------------------------------------
# The mask: the one window rule (kvref.attention.visible), checked against the rule written out here
# ---------------------------------------------------------------------------------------------------------------
def independent_mask(T, W, S):
    """Causal; with a window W, the S sinks plus the last W - S positions (i - (W - S) < j), W keys at most. (Not
    ``i - W < j or j < S``: that would let a query see W + S keys.)"""
    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    if W == 0:
        return j <= i
    return (j <= i) & ((i - (W - S) < j) | (j < S))


@pytest.mark.parametrize("T, W, S", [(1, 0, 0), (7, 0, 0), (7, 1, 0), (7, 3, 0), (12, 8, 0), (12, 8, 2), (12, 8, 7),
                                     (20, 5, 1), (5, 8, 2), (8, 8, 3), (30, 4, 3)])
def test_attention_mask_is_the_window_rule(T, W, S):
    mask = attention_mask(T, W, S)
    assert mask.shape == (T, T) and mask.dtype == bool
    np.testing.assert_array_equal(mask, independent_mask(T, W, S))
    expected_rows = [i + 1 if W == 0 else min(i + 1, W) for i in range(T)]
    assert mask.sum(axis=1).tolist() == expected_rows
    assert not mask.flags.writeable
    assert attention_mask(T, W, S) is mask  # cached
    for i in range(T):
        for j in range(T):
            assert mask[i, j] == kvref.visible(i, j, W, S)


def test_causal_mask_is_the_unwindowed_mask():
    for T in (1, 5, 9):
        np.testing.assert_array_equal(causal_mask(T), np.tril(np.ones((T, T), bool)))
        assert causal_mask(T).sum() == T * (T + 1) // 2
        assert not causal_mask(T).flags.writeable


@pytest.mark.parametrize("args", [(0,), (4, -1), (4, 3, 3), (4, 0, 1), (4, 2, -1), (4.0,), (4, 2.5)])
def test_attention_mask_bad_arguments(args):
    with pytest.raises(kvref.ShapeError):
        attention_mask(*args)


@pytest.mark.parametrize("W, S", [(0, 0), (3, 0), (5, 2)])
def test_masked_attention_against_oracle(W, S):
    """causal_attention with attention_mask(T, W, S) equals the test oracle's windowed gather-softmax-matmul."""
    rng = np.random.default_rng(W * 10 + S)
    T, q_heads, kv_heads, D = 11, 6, 2, 8
    q = rng.standard_normal((T, q_heads, D)).astype(np.float32)
    k = rng.standard_normal((T, kv_heads, D)).astype(np.float32)
    v = rng.standard_normal((T, kv_heads, D)).astype(np.float32)
    expected = window_chunk_attention(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), np.arange(T), W,
                                      1 / np.sqrt(D), sinks=S)
    got = causal_attention(q, k, v, mask=attention_mask(T, W, S))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_causal_attention_rejects_a_bad_mask():
    q = np.zeros((3, 2, 4), np.float32)
    k = v = np.zeros((3, 1, 4), np.float32)
    for bad in [np.ones((3, 4), bool), np.ones((3, 3), np.int8), [[True] * 3] * 3, np.triu(np.ones((3, 3), bool), 1)]:
        with pytest.raises(kvref.ShapeError):
            causal_attention(q, k, v, mask=bad)


# ---------------------------------------------------------------------------------------------------------------
# Work counts with a window
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("commit_last", [True, False])
def test_window_count_formula_equals_mask_sums(commit_last):
    c = int(commit_last)
    for W in (1, 3, 8):
        for P in range(1, 12):
            for N in range(1, 10):
                cached = sum(int(attention_mask(P, W).sum()) if n == 0 else min(P + n, W) for n in range(N + c))
                full = sum(int(attention_mask(T, W).sum()) for T in range(P, P + N))
                assert attention_dot_products(P, N, True, commit_last=c, window=W) == cached
                assert attention_dot_products(P, N, False, window=W) == full
        # a window as long as the sequence changes nothing
        assert attention_dot_products(5, 6, True, window=11) == attention_dot_products(5, 6, True)
        assert attention_dot_products(5, 6, False, window=10) == attention_dot_products(5, 6, False)
    with pytest.raises(kvref.ShapeError):
        attention_dot_products(5, 6, True, window=-1)


@pytest.mark.parametrize("use_cache, commit_last", [(False, True), (True, True), (True, False)])
def test_recorded_window_counts_equal_formulas(use_cache, commit_last):
    model = ToyModel(SINKS)
    for P, N in [(1, 1), (3, 12), (9, 1), (12, 7)]:
        result = model.generate(prompt_of(SINKS, P), N, use_cache=use_cache, backend="python", commit_last=commit_last)
        assert result.token_computations == token_computations(P, N, use_cache, commit_last)
        assert result.dot_products == attention_dot_products(P, N, use_cache, 2, 4, commit_last, window=8)
