"""RingCache(backend="cuda") against the python backend (the spec run as plain Python) and the float64 oracle.

Runs in the CUDA simulator by default (see conftest.py), one Python thread per CUDA thread, so every launch is tiny:
head_dim 4, 2 KV heads, windows of 4 and 5 slots, a handful of tokens per step. The schedules wrap the ring, run
deferred chunks (rasbt/LLMs-from-scratch #1013) and chunks longer than the ring, with and without attention sinks.
"""

import re

import numpy as np
import pytest
from numba import cuda

import kvref
import oracle
from kvref import CacheShape, DTypeError, IndexOutOfRangeError, RingCache, ShapeError, StaleStepError
from kvref.cuda import ring as cuda_ring

HEAD_DIM = 4
LAYERS = 2
BATCH = 2
DTYPES = ["float32", "float16"]
#: (window, sinks)
RINGS = [(4, 0), (5, 2)]
#: (T, sequences): seq 0 gets a head start; deferred chunks, decode across the wrap, a chunk longer than the ring
STEPS = [(3, [0]), (2, [0, 1]), (1, [1, 0]), (3, [1]), (1, [0, 1]), (7, [0]), (2, [1, 0]), (1, [0, 1])]
#: attention vs the spec: float32 rounding only (a real GPU fuses a*b+c into FMA and uses libdevice's expf)
SPEC_TOL = dict(rtol=1e-5, atol=2e-6)
#: attention vs the float64 oracle
ORACLE_TOL = dict(rtol=0, atol=1e-5)


def _pair(dtype="float32", window=4, sinks=0, q_heads=4, kv_heads=2):
    shape = CacheShape(layers=LAYERS, q_heads=q_heads, kv_heads=kv_heads, head_dim=HEAD_DIM, dtype=dtype)
    kwargs = {"batch": BATCH, "window": window, "sinks": sinks}
    return RingCache(shape, backend="python", **kwargs), RingCache(shape, backend="cuda", **kwargs)


def _random_kv(rng, n_seq, n_tokens, kv_heads, dtype):
    return [rng.standard_normal((n_seq, n_tokens, kv_heads, HEAD_DIM)).astype(dtype) for _ in range(2)]


def _assert_same_storage(dev, spec):
    assert dev.kv.dtype == spec.kv.dtype
    np.testing.assert_array_equal(dev.kv, spec.kv)
    np.testing.assert_array_equal(dev.slot_positions, spec.slot_positions)


def test_cuda_ring_backend_is_numba_cuda():
    available, reason = kvref.backends()["cuda"]
    assert available, reason
    _, dev = _pair()
    assert isinstance(dev._kv, type(cuda.device_array(1)))
    assert {name.split("[")[0] for name in cuda_ring.KERNELS} == {"ring.write", "ring.attend"}


@pytest.mark.parametrize("window,sinks", RINGS, ids=["W4", "W5-S2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_and_attend_match_spec_and_oracle(rng, dtype, window, sinks):
    """Every step of the schedule, every layer: stored bytes and slot positions bit-identical to the spec's, the
    attention output within float32 rounding of the spec and within 1e-5 of the oracle over the unwrapped K/V."""
    spec, dev = _pair(dtype, window, sinks)
    model = oracle.RingModel(LAYERS, BATCH, window, sinks)
    scale = kvref.default_scale(HEAD_DIM)
    saw_deferred = False
    for n_tokens, seq_ids in STEPS:
        step_s, step_d = spec.plan(n_tokens, seq_ids), dev.plan(n_tokens, seq_ids)
        np.testing.assert_array_equal(step_d.positions, step_s.positions)
        np.testing.assert_array_equal(step_d.slots, step_s.slots)
        assert step_d.deferred == step_s.deferred
        saw_deferred |= step_d.deferred
        for layer in range(LAYERS):
            k, v = _random_kv(rng, len(seq_ids), n_tokens, 2, dtype)
            q = rng.standard_normal((len(seq_ids), n_tokens, 4, HEAD_DIM)).astype(np.float32)
            spec.write(step_s, layer, k, v)
            dev.write(step_d, layer, k, v)
            _assert_same_storage(dev, spec)
            out_s = spec.attend(step_s, layer, q)
            out_d = dev.attend(step_d, layer, q)
            assert out_d.dtype == np.float32 and out_d.shape == q.shape
            np.testing.assert_allclose(out_d, out_s, **SPEC_TOL)
            for i, seq in enumerate(seq_ids):
                model.append(layer, seq, k[i], v[i])  # float16 inputs are what an fp16 cache stores
                expected = oracle.window_chunk_attention(q[i], model.keys(layer, seq), model.values(layer, seq),
                                                         step_d.positions[i], window, float(scale), sinks)
                np.testing.assert_allclose(out_d[i], expected, **ORACLE_TOL)
        spec.advance(step_s)
        dev.advance(step_d)
        _assert_same_storage(dev, spec)
        assert dev.lengths.tolist() == spec.lengths.tolist() == model.lengths()
    assert saw_deferred
    for layer in range(LAYERS):
        for seq in range(BATCH):
            held = model.held(seq)
            assert dev.held_positions(seq, layer).tolist() == held
            np.testing.assert_array_equal(dev.keys(layer, seq).astype(np.float64), model.keys(layer, seq, held))
            np.testing.assert_array_equal(dev.values(layer, seq).astype(np.float64), model.values(layer, seq, held))
    if sinks:
        np.testing.assert_array_equal(dev.slot_positions[:, :, :sinks], np.broadcast_to(np.arange(sinks),
                                                                                         (LAYERS, BATCH, sinks)))
    stats_d, stats_s = dev.stats(), spec.stats()
    assert stats_d.pop("backend") == "cuda" and stats_s.pop("backend") == "python"
    assert stats_d == stats_s


def test_deferred_chunk_waits_for_advance(rng):
    """W = 4, 3 tokens, then a chunk of 3: the device ring is untouched until advance, the queries see the keys the
    chunk will overwrite, and after advance the ring holds 2 .. 5 exactly as the spec's does."""
    spec, dev = _pair("float32", 4)
    k0, v0 = _random_kv(rng, BATCH, 3, 2, np.float32)
    k1, v1 = _random_kv(rng, BATCH, 3, 2, np.float32)
    q = rng.standard_normal((BATCH, 3, 4, HEAD_DIM)).astype(np.float32)
    scale = float(kvref.default_scale(HEAD_DIM))
    for cache in (spec, dev):
        cache.append(np.stack([k0] * LAYERS), np.stack([v0] * LAYERS))
        step = cache.plan(3)
        assert step.deferred and step.positions.tolist() == [[3, 4, 5]] * BATCH
        before = cache.kv.copy(), cache.slot_positions.copy()
        for layer in range(LAYERS):
            cache.write(step, layer, k1, v1)
        np.testing.assert_array_equal(cache.kv, before[0])
        np.testing.assert_array_equal(cache.slot_positions, before[1])
        out = cache.attend(step, 1, q)
        for s in range(BATCH):
            keys = np.concatenate([k0[s], k1[s]]).transpose(1, 0, 2).astype(np.float64)
            values = np.concatenate([v0[s], v1[s]]).transpose(1, 0, 2).astype(np.float64)
            expected = oracle.window_chunk_attention(q[s], keys, values, [3, 4, 5], 4, scale)
            np.testing.assert_allclose(out[s], expected, **ORACLE_TOL)
        cache.advance(step)
        assert cache.held_positions(1).tolist() == [2, 3, 4, 5]
    _assert_same_storage(dev, spec)


def test_device_arrays_in_and_out_for_a_deferred_step(rng):
    """k/v/q already on the device: the held-aside copy of a deferred step is a device copy, so reusing the
    caller's device buffers after write() changes nothing; a device ``out`` is filled in place."""
    spec, dev = _pair("float16", 4)
    k0, v0 = _random_kv(rng, BATCH, 3, 2, np.float16)
    for cache in (spec, dev):
        cache.append(np.stack([k0] * LAYERS), np.stack([v0] * LAYERS))
    k, v = _random_kv(rng, BATCH, 2, 2, np.float16)
    q = rng.standard_normal((BATCH, 2, 4, HEAD_DIM)).astype(np.float32)
    step_s, step_d = spec.plan(2), dev.plan(2)
    assert step_d.deferred
    d_k, d_v = cuda.to_device(k), cuda.to_device(v)
    for layer in range(LAYERS):
        spec.write(step_s, layer, k, v)
        dev.write(step_d, layer, d_k, d_v)
    d_k.copy_to_device(np.zeros_like(k))  # the caller reuses its buffers before advance
    d_v.copy_to_device(np.zeros_like(v))
    d_out = cuda.device_array(q.shape, np.float32)
    assert dev.attend(step_d, 0, cuda.to_device(q), out=d_out) is d_out
    np.testing.assert_allclose(d_out.copy_to_host(), spec.attend(step_s, 0, q), **SPEC_TOL)
    spec.advance(step_s)
    dev.advance(step_d)
    _assert_same_storage(dev, spec)


def test_strided_write_threads_and_partial_attend_blocks(rng, monkeypatch):
    """Launch shapes other than the default: write threads striding over head_dim (as for head_dim > 1024), and an
    attend grid of five key chunks per item (flash-decoding), through a deferred chunk and decode."""
    import kvref.cuda as kvcuda

    monkeypatch.setattr(cuda_ring, "MAX_BLOCK_THREADS", 3)  # 3 threads over 4 elements: thread 0 writes 0 and 3
    monkeypatch.setattr(kvcuda, "choose_chunks", lambda n_keys, items, sms=None: 5)  # 5 key chunks, some empty
    spec, dev = _pair("float32", 4)
    for n_tokens in (3, 3, 1, 6):
        step_s, step_d = spec.plan(n_tokens), dev.plan(n_tokens)
        for layer in range(LAYERS):
            k, v = _random_kv(rng, BATCH, n_tokens, 2, np.float32)
            q = rng.standard_normal((BATCH, n_tokens, 4, HEAD_DIM)).astype(np.float32)
            spec.write(step_s, layer, k, v)
            dev.write(step_d, layer, k, v)
            _assert_same_storage(dev, spec)
            np.testing.assert_allclose(dev.attend(step_d, layer, q), spec.attend(step_s, layer, q), **SPEC_TOL)
        spec.advance(step_s)
        dev.advance(step_d)
        _assert_same_storage(dev, spec)


def test_reset_and_crop(rng):
    """reset clears slot positions to -1 (K/V bytes untouched); allowed crops keep what the spec keeps; afterwards
    both backends continue identically."""
    spec, dev = _pair("float32", 5, 2)
    k7, v7 = _random_kv(rng, BATCH, 7, 2, np.float32)
    k2, v2 = _random_kv(rng, BATCH, 2, 2, np.float32)
    q = rng.standard_normal((BATCH, 1, 4, HEAD_DIM)).astype(np.float32)
    outs = []
    for cache in (spec, dev):
        cache.append(np.stack([k7] * LAYERS), np.stack([v7] * LAYERS))  # wrapped: holds 0, 1, 4, 5, 6
        kv_before = cache.kv.copy()
        cache.reset(seq=1)
        assert np.all(cache.slot_positions[:, 1] == -1) and cache.lengths.tolist() == [7, 0]
        np.testing.assert_array_equal(cache.kv, kv_before)
        cache.crop(2, seq=0)  # wrapped, but keeps only the sinks
        assert cache.held_positions(0).tolist() == [0, 1]
        cache.append(np.stack([k2] * LAYERS), np.stack([v2] * LAYERS))  # seq 0: positions 2, 3; seq 1: 0, 1
        cache.crop(-1)  # neither sequence has wrapped now
        assert cache.lengths.tolist() == [3, 1]
        step = cache.plan(1)
        for layer in range(LAYERS):
            cache.write(step, layer, k7[:, :1], v7[:, :1])
        outs.append(cache.attend(step, 0, q))
    _assert_same_storage(dev, spec)
    np.testing.assert_allclose(outs[1], outs[0], **SPEC_TOL)
    scale = float(kvref.default_scale(HEAD_DIM))
    keys = np.concatenate([k7[0, :2], k2[0, :1], k7[0, :1]]).transpose(1, 0, 2).astype(np.float64)
    values = np.concatenate([v7[0, :2], v2[0, :1], v7[0, :1]]).transpose(1, 0, 2).astype(np.float64)
    expected = oracle.window_chunk_attention(q[0], keys, values, [3], 5, scale, 2)
    np.testing.assert_allclose(outs[1][0], expected, **ORACLE_TOL)


def _bad_calls(cache, rng_state):
    """Invalid operations, each expected to raise a kvref error and leave the cache unchanged."""
    rng = np.random.default_rng(rng_state)
    shape = cache.shape
    dtype = shape.public_dtype
    good_k = rng.standard_normal((BATCH, 2, shape.kv_heads, HEAD_DIM)).astype(dtype)
    good_q = rng.standard_normal((BATCH, 2, shape.q_heads, HEAD_DIM)).astype(np.float32)
    step = cache.plan(2)  # deferred: seq 0 has wrapped
    assert step.deferred
    cache.write(step, 0, good_k, good_k)  # layer 0 held aside
    return {
        "bad seq id": (IndexOutOfRangeError, lambda: cache.plan(1, [0, BATCH])),
        "layer out of range": (IndexOutOfRangeError, lambda: cache.write(step, LAYERS, good_k, good_k)),
        "k dtype": (DTypeError, lambda: cache.write(step, 1, good_k.astype(np.float64), good_k)),
        "v shape": (ShapeError, lambda: cache.write(step, 1, good_k, good_k[:, :1])),
        "q dtype": (DTypeError, lambda: cache.attend(step, 0, good_q.astype(np.float16))),
        "q shape": (ShapeError, lambda: cache.attend(step, 0, good_q[:, :, :1])),
        "attend before write": (StaleStepError, lambda: cache.attend(step, 1, good_q)),
        "advance before every layer": (StaleStepError, lambda: cache.advance(step)),
        "crop after wrap": (IndexOutOfRangeError, lambda: cache.crop(3)),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_input_raises_same_errors_and_changes_nothing(rng, dtype):
    spec, dev = _pair(dtype, 4)
    k, v = _random_kv(rng, BATCH, 3, 2, dtype)
    for cache in (spec, dev):
        cache.append(np.stack([k] * LAYERS), np.stack([v] * LAYERS))
        cache.append(np.stack([k[:1, :2]] * LAYERS), np.stack([v[:1, :2]] * LAYERS), seq_ids=[0])
        assert cache.lengths.tolist() == [5, 3]
    for name in _bad_calls(spec, 7):
        messages = []
        for cache in (spec, dev):
            kind, call = _bad_calls(cache, 7)[name]
            before = cache.state()
            with pytest.raises(kind) as info:
                call()
            messages.append(re.sub(r"version \d+", "version N", str(info.value)))
            after = cache.state()
            assert before.keys() == after.keys()
            for key in ("kv", "slot_positions", "lengths"):
                np.testing.assert_array_equal(after[key], before[key], err_msg=f"{name}: {key}")
            for key in ("version", "step_key", "written"):
                assert after[key] == before[key], f"{name}: {key}"
            assert before["pending"].keys() == after["pending"].keys() == {0}, name
            for a, b in zip(before["pending"][0], after["pending"][0]):
                np.testing.assert_array_equal(a, b, err_msg=f"{name}: pending")
        assert messages[0] == messages[1], name
    _assert_same_storage(dev, spec)
