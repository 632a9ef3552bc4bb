"""The toy decoder (kvref/toy.py): cached generation equals full recompute, and the work counts are exact.

Tolerances (logits have a standard deviation near 1 with these random weights):

* float32 cache: |cached - full| <= 1e-4 + 1e-4 * |full| element-wise. Both paths share every float32 line except
  attention (cache: float32 online softmax; full: float64 NumPy); measured differences are ~1e-6.
* float16 cache: |cached - full| <= 2e-2 absolute. K/V are rounded to fp16 (relative error <= 2**-11 ~ 4.9e-4 per
  element) and the error passes through every later layer; measured differences are ~5e-4.
* chunked prefill vs one chunk: <= 1e-5 absolute (the same float32 operations; only the matmul batch size differs).
"""

import numpy as np
import pytest
from oracle import causal_chunk_attention

import kvref
from kvref.toy import (GenerationResult, ToyConfig, ToyModel, Work, apply_rope, attention_dot_products,
                       causal_attention, generate, token_computations)

FP32_TOL = dict(rtol=1e-4, atol=1e-4)
FP16_ATOL = 2e-2
CHUNK_ATOL = 1e-5

#: tiny model for the slow "python" backend; MHA and GQA variants
TINY = ToyConfig(vocab=48, d_model=32, layers=2, q_heads=4, kv_heads=4, head_dim=8, d_ff=64, max_tokens=64, seed=1)
TINY_GQA = ToyConfig(vocab=48, d_model=32, layers=2, q_heads=4, kv_heads=2, head_dim=8, d_ff=64, max_tokens=64,
                     seed=2)
#: a bit larger for the compiled "cpu" backend (GQA, G = 4)
SMALL_GQA = ToyConfig(vocab=128, d_model=64, layers=3, q_heads=8, kv_heads=2, head_dim=16, d_ff=128, max_tokens=128,
                      seed=3)

CASES = [("python", TINY, 6, 10), ("python", TINY_GQA, 6, 10), ("cpu", TINY_GQA, 9, 16), ("cpu", SMALL_GQA, 20, 24)]


def prompt_of(config, length, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab, size=length)


# ---------------------------------------------------------------------------------------------------------------
# Cached generation == full recompute
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, config, prompt_len, new", CASES,
                         ids=[f"{b}-q{c.q_heads}kv{c.kv_heads}-d{c.d_model}" for b, c, _, _ in CASES])
def test_cached_generation_matches_full_recompute(backend, config, prompt_len, new):
    model = ToyModel(config)
    prompt = prompt_of(config, prompt_len)
    full = model.generate(prompt, new, use_cache=False)
    cached = model.generate(prompt, new, use_cache=True, backend=backend)
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    np.testing.assert_allclose(cached.logits, full.logits, **FP32_TOL)
    assert cached.logits.shape == (new, config.vocab) and cached.logits.dtype == np.float32
    assert np.array_equal(cached.tokens, cached.logits.argmax(axis=1))
    # the commit step's logits are the full recompute's prediction after the whole sequence
    np.testing.assert_allclose(cached.final_logits, model.forward_full(cached.sequence)[-1], **FP32_TOL)
    assert cached.cache.get_seq_length() == prompt_len + new


@pytest.mark.parametrize("backend", ["python", "cpu"])
def test_fp16_cache_generation_matches_full_recompute(backend):
    model = ToyModel(TINY_GQA)
    prompt = prompt_of(TINY_GQA, 7, seed=1)
    full = model.generate(prompt, 10, use_cache=False)
    cached = model.generate(prompt, 10, use_cache=True, backend=backend, dtype="float16")
    assert cached.cache.shape.dtype == "float16"
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    err = np.abs(cached.logits - full.logits).max()
    assert 0 < err <= FP16_ATOL  # not zero: the K/V really were rounded to fp16
    # the stored keys are the fp16 rounding of the keys the full path computes (layer 0: same input, same RoPE)
    k_full = model.qkv(0, model.embed[cached.sequence], np.arange(cached.sequence.size))[1]
    np.testing.assert_array_equal(cached.cache.keys(0), k_full.astype(np.float16).transpose(1, 0, 2))


def test_teacher_forced_logits_every_position(backend):
    """Feeding a fixed sequence token by token through the cache reproduces every row of the full forward."""
    model = ToyModel(TINY_GQA)
    tokens = prompt_of(TINY_GQA, 12, seed=5)
    cache = model.new_cache(backend=backend)
    rows = [model.forward_cached(tokens[i:i + 1], cache) for i in range(tokens.size)]
    np.testing.assert_allclose(np.concatenate(rows), model.forward_full(tokens), **FP32_TOL)


@pytest.mark.parametrize("split", [1, 5, 11])
def test_chunked_prefill_matches_one_chunk(backend, split):
    """A batch-of-one prefill in two chunks gives the same logits, for every prompt position, as one chunk."""
    model = ToyModel(TINY_GQA)
    prompt = prompt_of(TINY_GQA, 12, seed=3)
    one = model.forward_cached(prompt, model.new_cache(backend=backend))
    cache = model.new_cache(backend=backend)
    two = np.concatenate([model.forward_cached(prompt[:split], cache), model.forward_cached(prompt[split:], cache)])
    assert cache.get_seq_length() == prompt.size
    np.testing.assert_allclose(two, one, rtol=0, atol=CHUNK_ATOL)
    np.testing.assert_allclose(one, model.forward_full(prompt), **FP32_TOL)


def test_generate_with_chunked_prefill(backend):
    model = ToyModel(TINY_GQA)
    prompt = prompt_of(TINY_GQA, 12, seed=4)
    whole = model.generate(prompt, 6, backend=backend)
    chunked = model.generate(prompt, 6, backend=backend, prefill_chunk=7)
    np.testing.assert_array_equal(chunked.tokens, whole.tokens)
    np.testing.assert_allclose(chunked.logits, whole.logits, rtol=0, atol=CHUNK_ATOL)
    assert chunked.step_tokens == [7, 5, 1, 1, 1, 1, 1, 1]
    assert chunked.token_computations == whole.token_computations == token_computations(12, 6, True)
    assert chunked.dot_products == whole.dot_products == attention_dot_products(12, 6, True, 2, 4)


def test_forward_cached_uses_the_given_sequence_of_a_batch():
    """forward_cached plans only [seq]: another sequence of the same cache is untouched."""
    model = ToyModel(TINY_GQA)
    cache = model.new_cache(backend="python", batch=3)
    tokens = prompt_of(TINY_GQA, 5)
    logits = model.forward_cached(tokens, cache, seq=2)
    assert cache.lengths.tolist() == [0, 0, 5]
    np.testing.assert_allclose(logits, model.forward_full(tokens), **FP32_TOL)


def test_full_path_attention_against_oracle():
    """causal_attention (the no-cache path) equals the test oracle's gather-softmax-matmul, with GQA."""
    rng = np.random.default_rng(0)
    T, q_heads, kv_heads, D = 7, 6, 2, 8
    q = rng.standard_normal((T, q_heads, D)).astype(np.float32)
    k = rng.standard_normal((T, kv_heads, D)).astype(np.float32)
    v = rng.standard_normal((T, kv_heads, D)).astype(np.float32)
    expected = causal_chunk_attention(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), np.arange(T), 1 / np.sqrt(D))
    np.testing.assert_allclose(causal_attention(q, k, v), expected, rtol=1e-6, atol=1e-6)


def test_rope_depends_only_on_relative_position():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 1, 16)).astype(np.float32)
    k = rng.standard_normal((1, 1, 16)).astype(np.float32)

    def score(p_q, p_k):
        return float(apply_rope(q, [p_q], 10000.0).ravel() @ apply_rope(k, [p_k], 10000.0).ravel())

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)
    np.testing.assert_array_equal(apply_rope(q, [0], 10000.0), q)  # position 0: rotation by 0


# ---------------------------------------------------------------------------------------------------------------
# Work counts (seed 002)
# ---------------------------------------------------------------------------------------------------------------
def test_seed002_recompute_count():
    """Seed 002: "100 tokens with a 50-token prompt: without cache ~5,050 token computations ... ~33x faster".

    5,050 = 1 + 2 + ... + 100 leaves out the prompt. The pass producing new token n recomputes the 50 + n - 1 tokens
    before it: 9,950 in all. With a cache every token runs once: 50 + 100 = 150 (149 if the last new token is not fed
    back). The ratio is ~66x, not 33x.
    """
    assert token_computations(50, 100, use_cache=False) == 9950 != 5050
    assert token_computations(50, 100, use_cache=True) == 150
    assert token_computations(50, 100, use_cache=True, commit_last=False) == 149
    ratio = token_computations(50, 100, False) / token_computations(50, 100, True)
    assert 66 < ratio < 67 and ratio == pytest.approx(9950 / 150)
    assert ratio > 2 * 33

    # and an actual run records exactly these numbers
    config = ToyConfig(vocab=32, d_model=16, layers=1, q_heads=2, kv_heads=1, head_dim=8, d_ff=32, max_tokens=160,
                       seed=7)
    model = ToyModel(config)
    prompt = prompt_of(config, 50)
    full = model.generate(prompt, 100, use_cache=False)
    cached = model.generate(prompt, 100, use_cache=True, backend="cpu")
    assert full.token_computations == 9950
    assert cached.token_computations == 150
    assert full.step_tokens == [50 + n - 1 for n in range(1, 101)]
    assert cached.step_tokens == [50] + [1] * 100
    assert cached.cache.get_seq_length() == 150
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    np.testing.assert_allclose(cached.logits, full.logits, **FP32_TOL)

    # attention: with a cache decode step n reads 50 + n keys per query head per layer (O(n)); without a cache the
    # pass for token n does the causal triangle of its 49 + n tokens (O(n^2))
    per = config.layers * config.q_heads
    assert cached.step_dot_products == [per * 50 * 51 // 2] + [per * (50 + n) for n in range(1, 101)]
    assert full.step_dot_products == [per * (49 + n) * (50 + n) // 2 for n in range(1, 101)]
    assert cached.dot_products == attention_dot_products(50, 100, True, config.layers, config.q_heads)
    assert full.dot_products == attention_dot_products(50, 100, False, config.layers, config.q_heads)
    assert attention_dot_products(50, 100, True) == 150 * 151 // 2  # each causal pair of the 150 tokens once


@pytest.mark.parametrize("commit_last", [True, False])
def test_count_formulas_equal_their_sums(commit_last):
    """The closed forms equal the step-by-step sums they are derived from, for many (P, N)."""
    for P in range(1, 12):
        for N in range(1, 12):
            c = int(commit_last)
            assert token_computations(P, N, False) == sum(P + n - 1 for n in range(1, N + 1))
            assert token_computations(P, N, True, c) == P + sum(1 for n in range(1, N + c))
            assert attention_dot_products(P, N, False) == sum(T * (T + 1) // 2 for T in range(P, P + N))
            assert attention_dot_products(P, N, True, commit_last=c) == (
                P * (P + 1) // 2 + sum(P + n for n in range(1, N + c)))
            assert attention_dot_products(P, N, True, layers=3, q_heads=4, commit_last=c) == (
                12 * attention_dot_products(P, N, True, commit_last=c))


@pytest.mark.parametrize("use_cache, commit_last", [(False, True), (True, True), (True, False)])
def test_recorded_counts_equal_formulas(use_cache, commit_last):
    model = ToyModel(TINY_GQA)
    for P, N in [(1, 1), (1, 5), (4, 1), (6, 7)]:
        result = model.generate(prompt_of(TINY_GQA, P), N, use_cache=use_cache, backend="python",
                                commit_last=commit_last)
        assert isinstance(result, GenerationResult) and result.tokens.shape == (N,)
        assert result.token_computations == token_computations(P, N, use_cache, commit_last)
        assert result.dot_products == attention_dot_products(P, N, use_cache, 2, 4, commit_last)
        if use_cache:
            assert result.cache.get_seq_length() == P + N - 1 + commit_last
            assert (result.final_logits is not None) == commit_last
        else:
            assert result.cache is None and result.final_logits is None


def test_work_object():
    work = Work()
    model = ToyModel(TINY)
    model.forward_full(np.arange(5), work)
    model.forward_cached(np.arange(3), model.new_cache(backend="python"), work=work)
    assert work.step_tokens == [5, 3]
    assert work.step_dot_products == [2 * 4 * 15, 2 * 4 * 6]
    assert work.token_computations == 8 and work.dot_products == 168


# ---------------------------------------------------------------------------------------------------------------
# Determinism, configuration, errors
# ---------------------------------------------------------------------------------------------------------------
def test_same_seed_same_weights_and_tokens():
    a, b = ToyModel(TINY_GQA), ToyModel(TINY_GQA)
    pa, pb = a.parameters(), b.parameters()
    assert list(pa) == list(pb)
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name])
        assert pa[name].dtype == np.float32
    prompt = prompt_of(TINY_GQA, 6)
    np.testing.assert_array_equal(a.generate(prompt, 12, backend="python").tokens,
                                  b.generate(prompt, 12, backend="python").tokens)


def test_different_seed_different_weights_and_tokens():
    other = ToyConfig(**{**TINY_GQA.__dict__, "seed": TINY_GQA.seed + 1})
    a, b = ToyModel(TINY_GQA), ToyModel(other)
    assert not np.array_equal(a.parameters()["embed"], b.parameters()["embed"])
    assert not np.array_equal(a.parameters()["layers.1.wq"], b.parameters()["layers.1.wq"])
    prompt = prompt_of(TINY_GQA, 6)
    assert not np.array_equal(a.generate(prompt, 12, use_cache=False).tokens,
                              b.generate(prompt, 12, use_cache=False).tokens)


def test_config_and_parameters():
    c = SMALL_GQA
    assert c.cache_shape() == kvref.CacheShape(layers=3, q_heads=8, kv_heads=2, head_dim=16)
    assert c.cache_shape("float16").dtype == "float16"
    assert c.group_size == 4
    model = ToyModel(c)
    p = model.parameters()
    assert p["layers.0.wq"].shape == (64, 8 * 16) and p["layers.0.wk"].shape == (64, 2 * 16)
    assert p["layers.2.wo"].shape == (8 * 16, 64) and p["head"].shape == (64, 128)
    assert model.num_parameters == sum(w.size for w in p.values())
    logits = model.forward_full(prompt_of(c, 20))
    assert logits.shape == (20, 128) and logits.dtype == np.float32
    assert 0.3 < logits.std() < 3  # activations stay sane


@pytest.mark.parametrize("bad", [dict(kv_heads=3), dict(head_dim=7), dict(vocab=0), dict(layers=1.5), dict(seed=-1),
                                 dict(rope_theta=1.0)])
def test_bad_config_raises(bad):
    with pytest.raises(kvref.ShapeError):
        ToyConfig(**bad)


def test_errors_leave_the_cache_unchanged():
    model = ToyModel(TINY_GQA)
    with pytest.raises(kvref.IndexOutOfRangeError):
        model.forward_full([0, TINY_GQA.vocab])
    with pytest.raises(kvref.ShapeError):
        model.forward_full([])
    wrong = kvref.FlatCache(kvref.CacheShape(2, 4, 4, 8), max_tokens=8, backend="python")
    with pytest.raises(kvref.ShapeError):
        model.forward_cached([1, 2], wrong)
    cache = model.new_cache(backend="python", max_tokens=8)
    model.forward_cached(np.arange(6), cache)
    before = cache.state()
    with pytest.raises(kvref.CacheOverflowError):
        model.forward_cached(np.arange(3), cache)
    after = cache.state()
    assert np.array_equal(before["kv"], after["kv"]) and np.array_equal(before["lengths"], after["lengths"])
    with pytest.raises(kvref.CacheOverflowError):  # 6 + 3 tokens (with the commit) do not fit in 8 slots
        model.generate(np.arange(6), 3, cache=model.new_cache(backend="python", max_tokens=8))
    model.generate(np.arange(6), 3, cache=model.new_cache(backend="python", max_tokens=8), commit_last=False)


def test_module_level_generate():
    model = ToyModel(TINY)
    r = generate(model, [1, 2, 3], 4, use_cache=True, backend="python")
    np.testing.assert_array_equal(r.tokens, model.generate([1, 2, 3], 4, use_cache=False).tokens)
    np.testing.assert_array_equal(r.sequence[:3], [1, 2, 3])
