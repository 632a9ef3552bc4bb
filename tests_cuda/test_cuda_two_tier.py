"""TwoTierCache(backend="cuda") against the python backend (the spec run as plain Python), the list model
``oracle.TwoTierModel`` (bytes from ``gguf.quants``) and the float64 oracle.

Runs in the CUDA simulator by default (see conftest.py), one Python thread per CUDA thread, so everything is tiny:
2 layers, 2 KV heads, head_dim 32 (one ggml block per row) or 64 (two), a tail of 3 slots, M = 7, a few tokens per
step. The schedule migrates in batches, prefills straight into the store, evicts (also inside a chunk longer than M)
and runs sequences of different lengths.
"""

import re

import numpy as np
import pytest
from numba import cuda

import kvref
import oracle
from kvref import (CacheShape, DTypeError, IndexOutOfRangeError, NonFiniteError, ShapeError, StaleStepError,
                   TwoTierCache, memory)

LAYERS = 2
BATCH = 2
TAIL, MAX_TOKENS, MIGRATION = 3, 7, 2
#: (T, sequences): a chunk that migrates, decode across migrations, prefill straight into the store, a chunk longer
#: than M (tokens evicted inside the step), then decode with eviction
STEPS = [(2, [0]), (3, [0, 1]), (1, [1, 0]), (5, [1]), (1, [0, 1]), (9, [0]), (1, [0, 1]), (2, [1, 0])]
#: attention vs the spec: float32 rounding only (a real GPU fuses a*b+c into FMA and uses libdevice's expf)
SPEC_TOL = dict(rtol=1e-5, atol=2e-6)
#: attention vs the float64 oracle over the model's values
ORACLE_TOL = dict(rtol=0, atol=1e-5)


def _pair(dtype="float32", fmt="q8_0", head_dim=32, q_heads=4, kv_heads=2):
    shape = CacheShape(layers=LAYERS, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    kwargs = {"batch": BATCH, "tail_tokens": TAIL, "max_tokens": MAX_TOKENS, "store_format": fmt,
              "migration_batch": MIGRATION}
    return TwoTierCache(shape, backend="python", **kwargs), TwoTierCache(shape, backend="cuda", **kwargs)


def _model(fmt):
    pytest.importorskip("gguf", reason="the list model's ggml bytes come from the gguf package (pip install gguf)")
    return oracle.TwoTierModel(LAYERS, BATCH, TAIL, MAX_TOKENS, MIGRATION, fmt)


def _random(rng, dims, dtype):
    return rng.standard_normal(dims).astype(dtype)


def _assert_same_storage(dev, spec):
    assert dev.kv.dtype == spec.kv.dtype and dev.store.dtype == spec.store.dtype == np.uint8
    np.testing.assert_array_equal(dev.kv, spec.kv)
    np.testing.assert_array_equal(dev.store, spec.store)
    np.testing.assert_array_equal(dev.lengths, spec.lengths)
    for seq in range(BATCH):
        assert dev.tiers(seq) == spec.tiers(seq)


def _run_schedule(spec, dev, model, rng, steps=STEPS):
    """Every step, every layer, through both caches: attention vs the spec and vs the oracle; after advance the
    storage is bit-identical to the spec's and the device cache matches the model exactly."""
    shape = dev.shape
    scale = float(kvref.default_scale(shape.head_dim))
    for n_tokens, seq_ids in steps:
        step_s, step_d = spec.plan(n_tokens, seq_ids), dev.plan(n_tokens, seq_ids)
        np.testing.assert_array_equal(step_d.positions, step_s.positions)
        np.testing.assert_array_equal(step_d.slots, step_s.slots)
        np.testing.assert_array_equal(step_d.tiers, step_s.tiers)
        dims = (len(seq_ids), n_tokens, shape.kv_heads, shape.head_dim)
        k = _random(rng, (LAYERS,) + dims, shape.public_dtype)
        v = _random(rng, (LAYERS,) + dims, shape.public_dtype)
        for layer in range(LAYERS):
            q = _random(rng, (len(seq_ids), n_tokens, shape.q_heads, shape.head_dim), np.float32)
            spec.write(step_s, layer, k[layer], v[layer])
            dev.write(step_d, layer, k[layer], v[layer])
            out_s = spec.attend(step_s, layer, q)
            out_d = dev.attend(step_d, layer, q)
            assert out_d.dtype == np.float32 and out_d.shape == q.shape
            np.testing.assert_allclose(out_d, out_s, **SPEC_TOL)
            for i, seq in enumerate(seq_ids):
                expected = model.attention(layer, seq, q[i], k[layer, i], v[layer, i], scale)
                np.testing.assert_allclose(out_d[i], expected, **ORACLE_TOL)
        spec.advance(step_s)
        dev.advance(step_d)
        for i, seq in enumerate(seq_ids):
            model.advance(seq, k[:, i], v[:, i])
        _assert_same_storage(dev, spec)
        oracle.assert_two_tier_matches_model(dev, model)


def test_cuda_two_tier_backend_is_numba_cuda():
    from kvref.cuda import two_tier as cuda_two_tier

    available, reason = kvref.backends()["cuda"]
    assert available, reason
    _, dev = _pair()
    assert isinstance(dev._kv, type(cuda.device_array(1))) and isinstance(dev._store, type(cuda.device_array(1)))
    assert {name.split("[")[0] for name in cuda_two_tier.KERNELS} == {"two_tier.migrate", "two_tier.append",
                                                                      "two_tier.attend"}
    assert dev.nbytes == memory.two_tier_bytes(dev.shape, BATCH, TAIL, MAX_TOKENS, "q8_0", MIGRATION)


@pytest.mark.parametrize("dtype, fmt, head_dim", [("float32", "q8_0", 32), ("float16", "q4_0", 64),
                                                  ("float32", "q5_1", 32), ("float16", "q4_1", 32),
                                                  ("float32", "q5_0", 32)])
def test_schedule_matches_spec_model_and_oracle(rng, dtype, fmt, head_dim):
    spec, dev = _pair(dtype, fmt, head_dim)
    model = _model(fmt)
    _run_schedule(spec, dev, model, rng)
    assert model.quantized_count > 10, "tokens went through the store"
    assert any(model.evicted(seq) for seq in range(BATCH))
    stats_d, stats_s = dev.stats(), spec.stats()
    assert stats_d.pop("backend") == "cuda" and stats_s.pop("backend") == "python"
    assert stats_d == stats_s


def test_mha_and_materialized_path(rng):
    """MHA (q_heads = kv_heads) through the schedule; attend() vs attend_materialized() on the device cache."""
    spec, dev = _pair("float16", "q8_0", 32, q_heads=2, kv_heads=2)
    model = _model("q8_0")
    _run_schedule(spec, dev, model, rng, STEPS[:4])
    step = dev.plan(2)
    k = _random(rng, (BATCH, 2, 2, 32), np.float16)
    q = _random(rng, (BATCH, 2, 2, 32), np.float32)
    for layer in range(LAYERS):
        dev.write(step, layer, k, -k)
    np.testing.assert_allclose(dev.attend(step, 1, q), dev.attend_materialized(step, 1, q), rtol=0, atol=2e-6)


def test_device_arrays_in_and_out(rng):
    """k/v/q already on the device: write() keeps its own copy (the caller may reuse its buffers before advance),
    NaN on the device is still refused, and a device ``out`` is filled in place."""
    spec, dev = _pair("float32", "q8_0")
    k0 = _random(rng, (LAYERS, BATCH, 4, 2, 32), np.float32)
    for cache in (spec, dev):
        cache.append(k0, -k0)
    k = _random(rng, (BATCH, 2, 2, 32), np.float32)
    v = _random(rng, (BATCH, 2, 2, 32), np.float32)
    q = _random(rng, (BATCH, 2, 4, 32), np.float32)
    step_s, step_d = spec.plan(2), dev.plan(2)
    assert step_d.tiers[0, 1] > step_d.tiers[0, 0], "this step migrates"
    bad = k.copy()
    bad[1, 1, 0, 3] = np.nan
    before = dev.state()
    with pytest.raises(NonFiniteError) as info:
        dev.write(step_d, 0, cuda.to_device(bad), cuda.to_device(v))
    assert info.value.argument == "k_new"
    np.testing.assert_array_equal(dev.state()["store"], before["store"])
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


def test_reset_and_crop_then_continue(rng):
    """A crop into the store (the tail empties, kept bytes unchanged), a crop inside the tail, reset of one
    sequence: both backends stay bit-identical and match the model, and continue identically."""
    spec, dev = _pair("float16", "q4_0")
    model = _model("q4_0")
    _run_schedule(spec, dev, model, rng, [(6, [0, 1])])  # store [0, 4), tail [4, 6)
    kept = dev.store_blocks(1, 0)[:, :, :2].copy()
    for cache in (spec, dev):
        cache.crop(2, seq=0)
        cache.crop(5, seq=1)
        cache.reset(seq=1)
    model.crop(2, 0)
    model.reset(1)
    assert dev.tiers(0) == {"evicted": (0, 0), "store": (0, 2), "tail": (2, 2)}
    np.testing.assert_array_equal(dev.store_blocks(1, 0), kept)
    _assert_same_storage(dev, spec)
    oracle.assert_two_tier_matches_model(dev, model)
    _run_schedule(spec, dev, model, rng, [(3, [0, 1]), (1, [1]), (4, [0])])


def _bad_calls(cache):
    """Invalid operations, each expected to raise a kvref error and leave the cache unchanged (layer 0 of a step
    held aside)."""
    shape = cache.shape
    good = np.ones((BATCH, 1, shape.kv_heads, shape.head_dim), shape.public_dtype)
    nan = good.copy()
    nan[0, 0, 1, 7] = np.nan
    q = np.zeros((BATCH, 1, shape.q_heads, shape.head_dim), np.float32)
    step = cache.plan(1)
    cache.write(step, 0, good, good)
    return {
        "NaN in k": (NonFiniteError, lambda: cache.write(step, 1, nan, good)),
        "inf in v": (NonFiniteError, lambda: cache.write(step, 1, good, nan * np.inf)),
        "bad seq id": (IndexOutOfRangeError, lambda: cache.plan(1, [0, BATCH])),
        "layer out of range": (IndexOutOfRangeError, lambda: cache.write(step, LAYERS, good, good)),
        "k dtype": (DTypeError, lambda: cache.write(step, 1, good.astype(np.float64), good)),
        "v shape": (ShapeError, lambda: cache.write(step, 1, good, good[:, :, :1])),
        "q dtype": (DTypeError, lambda: cache.attend(step, 0, q.astype(np.float16))),
        "attend before write": (StaleStepError, lambda: cache.attend(step, 1, q)),
        "advance before every layer": (StaleStepError, lambda: cache.advance(step)),
        "crop after eviction": (IndexOutOfRangeError, lambda: cache.crop(3)),
    }


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bad_input_raises_same_errors_and_changes_nothing(rng, dtype):
    spec, dev = _pair(dtype, "q8_0")
    k = _random(rng, (LAYERS, BATCH, 9, 2, 32), dtype)
    for cache in (spec, dev):
        cache.append(k, k)  # 9 > M: evicted
    for name in _bad_calls(spec):
        messages = []
        for cache in (spec, dev):
            kind, call = _bad_calls(cache)[name]
            before = cache.state()
            with pytest.raises(kind) as info:
                call()
            messages.append(re.sub(r"version \d+", "version N", str(info.value)))
            after = cache.state()
            assert before.keys() == after.keys()
            for key in ("tail", "store", "lengths", "migrated"):
                np.testing.assert_array_equal(after[key], before[key], err_msg=f"{name}: {key}")
            for key in ("version", "step_key", "written"):
                assert after[key] == before[key], f"{name}: {key}"
            assert before["pending"].keys() == after["pending"].keys() == {0}, name
            for a, b in zip(before["pending"][0], after["pending"][0]):
                np.testing.assert_array_equal(a, b, err_msg=f"{name}: pending")
        assert messages[0] == messages[1], name
    _assert_same_storage(dev, spec)


def test_launch_dimensions_are_python_ints():
    """A real GPU refuses a numpy integer as a launch dimension (``LaunchConfig.block must be an int``), which the
    simulator accepts: the item counts of the migrate and append launches are computed with numpy (seen on an H200)."""
    from kvref.cuda.quant import QUANT_LANES
    from kvref.cuda.two_tier import _warp_per_item

    for n_items in (np.int64(1), np.int64(70), 64, 65):
        blocks, threads = _warp_per_item(n_items)
        assert type(blocks) is int and type(threads) is int
        assert (blocks, threads) == (int(n_items), QUANT_LANES)
