"""FlatCache(backend="cuda") against the python backend (the spec run as plain Python) and the float64 oracle.

Runs in the CUDA simulator by default (see conftest.py). Every launch is tiny, because the simulator runs one Python
thread per CUDA thread: head_dim 32 (one warp per write block), 2 KV heads, at most 40 slots per sequence.
"""

import re
import subprocess
import sys

import numpy as np
import pytest
from numba import cuda

import kvref
import oracle
from kvref import (CacheOverflowError, CacheShape, DTypeError, FlatCache, IndexOutOfRangeError, ShapeError,
                   StaleStepError)
from kvref.cuda import flat as cuda_flat

HEAD_DIM = 32
MAX_TOKENS = 40
LAYERS = 2
BATCH = 2
#: (q_heads, kv_heads): GQA with G = 2, and MHA
HEADS = [(4, 2), (2, 2)]
DTYPES = ["float32", "float16"]
#: the steps of the scenario: (T new tokens, sequences); seq 0 gets a head start so the lengths differ. Even and odd
#: T: with T coprime to kv_heads a thread mapping that mixes up t and h can still cover every (t, h) pair once.
STEPS = [(4, [0]), (3, [0, 1]), (2, [1, 0]), (1, [0, 1]), (1, [1, 0])]
#: attention vs the spec: float32 rounding only (a real GPU fuses a*b+c into FMA and uses libdevice's expf)
SPEC_TOL = dict(rtol=1e-5, atol=2e-6)
#: attention vs the float64 oracle: float32 accumulation over <= 40 keys
ORACLE_TOL = dict(rtol=1e-4, atol=2e-5)


def _pair(dtype, q_heads, kv_heads, **kwargs):
    shape = CacheShape(layers=LAYERS, q_heads=q_heads, kv_heads=kv_heads, head_dim=HEAD_DIM, dtype=dtype)
    kwargs = {"batch": BATCH, "max_tokens": MAX_TOKENS, **kwargs}
    return FlatCache(shape, backend="python", **kwargs), FlatCache(shape, backend="cuda", **kwargs)


def _random_kv(rng, n_seq, n_tokens, kv_heads, dtype):
    return [rng.standard_normal((n_seq, n_tokens, kv_heads, HEAD_DIM)).astype(dtype) for _ in range(2)]


def test_cuda_backend_is_available_and_is_numba_cuda():
    available, reason = kvref.backends()["cuda"]
    assert available, reason
    assert cuda.implementation == "NVIDIA"
    assert isinstance(cuda_flat.OPS.zeros((2, 3), np.float32), type(cuda.device_array(1)))


@pytest.mark.parametrize("q_heads,kv_heads", HEADS, ids=["gqa2", "mha"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_and_attend_match_spec_and_oracle(rng, dtype, q_heads, kv_heads):
    """Prefill (T > 1, causal, also on top of earlier tokens) then decode (T = 1), batch of 2 with different lengths,
    every layer: the stored bytes equal the spec's exactly, the attention output matches the spec and the oracle."""
    spec, dev = _pair(dtype, q_heads, kv_heads)
    model = oracle.FlatModel(LAYERS, BATCH, MAX_TOKENS)
    scale = kvref.default_scale(HEAD_DIM)
    for n_tokens, seq_ids in STEPS:
        step_s, step_d = spec.plan(n_tokens, seq_ids), dev.plan(n_tokens, seq_ids)
        np.testing.assert_array_equal(step_d.positions, step_s.positions)
        for layer in range(LAYERS):
            k, v = _random_kv(rng, len(seq_ids), n_tokens, kv_heads, dtype)
            q = rng.standard_normal((len(seq_ids), n_tokens, q_heads, HEAD_DIM)).astype(np.float32)
            spec.write(step_s, layer, k, v)
            dev.write(step_d, layer, k, v)
            assert dev.kv.dtype == spec.kv.dtype
            np.testing.assert_array_equal(dev.kv, spec.kv)  # bit-identical storage, every layer, every step
            out_s = spec.attend(step_s, layer, q)
            out_d = dev.attend(step_d, layer, q)
            assert out_d.dtype == np.float32 and out_d.shape == q.shape
            np.testing.assert_allclose(out_d, out_s, **SPEC_TOL)
            for i, seq in enumerate(seq_ids):
                model.append(layer, seq, k[i], v[i])  # float16 inputs are already what an fp16 cache stores
                expected = oracle.causal_chunk_attention(q[i], model.keys(layer, seq), model.values(layer, seq),
                                                         step_d.positions[i], scale)
                np.testing.assert_allclose(out_d[i], expected, **ORACLE_TOL)
        spec.advance(step_s)
        dev.advance(step_d)
        assert dev.lengths.tolist() == spec.lengths.tolist() == model.lengths()
    for layer in range(LAYERS):
        for seq in range(BATCH):
            np.testing.assert_array_equal(dev.keys(layer, seq), spec.keys(layer, seq))
            np.testing.assert_array_equal(dev.values(layer, seq), spec.values(layer, seq))
            assert dev.keys(layer, seq).dtype == np.dtype(dtype)
    assert dev.nbytes == spec.nbytes
    stats_d, stats_s = dev.stats(), spec.stats()
    assert stats_d.pop("backend") == "cuda" and stats_s.pop("backend") == "python"
    assert stats_d == stats_s


def test_fp16_write_keeps_every_bit_pattern(rng):
    """The write is a copy of uint16 bit patterns: NaN payloads, infinities, subnormals and -0 survive exactly."""
    spec, dev = _pair("float16", 4, 2)
    bits = rng.integers(0, 1 << 16, size=(2, 2, BATCH, 3, 2, HEAD_DIM), dtype=np.uint16)  # (L, K|V, n, T, h, d)
    bits[0, 0, 0, 0, 0, :8] = [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x0001, 0x8000, 0x03FF, 0xFBFF]
    step_s, step_d = spec.plan(3), dev.plan(3)
    for layer in range(LAYERS):
        k, v = bits[layer, 0].view(np.float16), bits[layer, 1].view(np.float16)
        spec.write(step_s, layer, k, v)
        dev.write(step_d, layer, k, v)
    assert dev.kv.dtype == np.uint16
    np.testing.assert_array_equal(dev.kv, spec.kv)
    np.testing.assert_array_equal(dev.kv[0, 0, 0, 0, 0, :8], bits[0, 0, 0, 0, 0, :8])


def test_device_arrays_in_and_out(rng):
    """k/v/q may already live on the device, and a device ``out`` is filled in place."""
    spec, dev = _pair("float16", 4, 2)
    step_s, step_d = spec.plan(2), dev.plan(2)
    k, v = _random_kv(rng, BATCH, 2, 2, np.float16)
    q = rng.standard_normal((BATCH, 2, 4, HEAD_DIM)).astype(np.float32)
    spec.write(step_s, 0, k, v)
    dev.write(step_d, 0, cuda.to_device(k), cuda.to_device(v))
    np.testing.assert_array_equal(dev.kv, spec.kv)
    d_out = cuda.device_array(q.shape, np.float32)
    returned = dev.attend(step_d, 0, cuda.to_device(q), out=d_out)
    assert returned is d_out
    np.testing.assert_allclose(d_out.copy_to_host(), spec.attend(step_s, 0, q), **SPEC_TOL)
    host_out = np.full(q.shape, np.nan, np.float32)  # a host ``out`` receives the result in place
    assert dev.attend(step_d, 0, q, out=host_out) is host_out
    np.testing.assert_allclose(host_out, spec.attend(step_s, 0, q), **SPEC_TOL)


def test_strided_write_threads_and_partial_attend_blocks(rng, monkeypatch):
    """Launch shapes other than the default: write threads striding over head_dim (as for head_dim > 1024), and an
    attend grid of three key chunks per item (flash-decoding), one of them empty."""
    monkeypatch.setattr(cuda_flat, "MAX_BLOCK_THREADS", 8)  # 8 threads, 4 elements each
    # 3 key chunks per item: the keys (<= 40, 2 tiles) leave one chunk empty, merged without NaN
    monkeypatch.setattr(kvref.cuda, "choose_chunks", lambda n_keys, items, sms=None: 3)
    spec, dev = _pair("float32", 4, 2)
    for n_tokens in (3, 5):
        step_s, step_d = spec.plan(n_tokens), dev.plan(n_tokens)
        k, v = _random_kv(rng, BATCH, n_tokens, 2, np.float32)
        q = rng.standard_normal((BATCH, n_tokens, 4, HEAD_DIM)).astype(np.float32)
        for layer in range(LAYERS):  # every layer: a step is advanced only once all its layers are written
            spec.write(step_s, layer, k, v)
            dev.write(step_d, layer, k, v)
        np.testing.assert_array_equal(dev.kv, spec.kv)
        np.testing.assert_allclose(dev.attend(step_d, 1, q), spec.attend(step_s, 1, q), **SPEC_TOL)
        spec.advance(step_s)
        dev.advance(step_d)


def test_reset_and_crop_then_overwrite(rng):
    """After crop/reset, new tokens overwrite old slots; the old bytes beyond the length are never read."""
    spec, dev = _pair("float32", 4, 2)
    shape = spec.shape
    k5 = rng.standard_normal((LAYERS, BATCH, 5, 2, HEAD_DIM)).astype(np.float32)
    v5 = rng.standard_normal((LAYERS, BATCH, 5, 2, HEAD_DIM)).astype(np.float32)
    k2, v2 = k5[:, :, :2] + 1, v5[:, :, :2] - 1
    q = rng.standard_normal((BATCH, 1, shape.q_heads, HEAD_DIM)).astype(np.float32)
    outs = []
    for cache in (spec, dev):
        cache.append(k5, v5)
        cache.crop(3)
        cache.reset(seq=1)
        cache.append(k2, v2)  # seq 0: positions 3, 4 (over the cropped ones); seq 1: positions 0, 1
        step = cache.plan(1)
        cache.write(step, 0, k5[0, :, :1], v5[0, :, :1])
        outs.append(cache.attend(step, 0, q))
    np.testing.assert_array_equal(dev.kv, spec.kv)
    assert dev.lengths.tolist() == spec.lengths.tolist() == [5, 2]
    np.testing.assert_allclose(outs[1], outs[0], **SPEC_TOL)


def _bad_calls(cache, rng_state):
    """Invalid operations, each expected to raise a kvref error and leave the cache unchanged."""
    rng = np.random.default_rng(rng_state)
    shape = cache.shape
    dtype = shape.public_dtype
    good_k = rng.standard_normal((BATCH, 2, shape.kv_heads, HEAD_DIM)).astype(dtype)
    good_q = rng.standard_normal((BATCH, 2, shape.q_heads, HEAD_DIM)).astype(np.float32)
    step = cache.plan(2)
    stale = cache.plan(1)
    return {
        "overflow": (CacheOverflowError, lambda: cache.plan(MAX_TOKENS - cache.get_seq_length(0) + 1)),
        "append overflow": (CacheOverflowError, lambda: cache.append(
            np.zeros((LAYERS, BATCH, MAX_TOKENS, shape.kv_heads, HEAD_DIM), dtype),
            np.zeros((LAYERS, BATCH, MAX_TOKENS, shape.kv_heads, HEAD_DIM), dtype))),
        "bad seq id": (IndexOutOfRangeError, lambda: cache.plan(1, [0, BATCH])),
        "layer out of range": (IndexOutOfRangeError, lambda: cache.write(step, LAYERS, good_k, good_k)),
        "k dtype": (DTypeError, lambda: cache.write(step, 0, good_k.astype(np.float64), good_k)),
        "v shape": (ShapeError, lambda: cache.write(step, 0, good_k, good_k[:, :1])),
        "q dtype": (DTypeError, lambda: cache.attend(step, 0, good_q.astype(np.float16))),
        "q shape": (ShapeError, lambda: cache.attend(step, 0, good_q[:, :, :1])),
        "stale step": (StaleStepError, lambda: (cache.advance(stale), cache.write(step, 0, good_k, good_k))),
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_input_raises_same_errors_and_changes_nothing(rng, dtype):
    spec, dev = _pair(dtype, 4, 2)
    k, v = _random_kv(rng, BATCH, 3, 2, dtype)
    for cache in (spec, dev):
        step = cache.plan(3)
        for layer in range(LAYERS):
            cache.write(step, layer, k, v)
        cache.advance(step)
    for name in _bad_calls(spec, 7):
        messages = []
        for cache in (spec, dev):
            kind, call = _bad_calls(cache, 7)[name]
            before = cache.state()
            with pytest.raises(kind) as info:
                call()
            # version numbers are unique to each cache, so compare the messages with digits of versions masked
            messages.append(re.sub(r"version \d+", "version N", str(info.value)))
            after = cache.state()
            if name != "stale step":  # that one advances the cache on purpose to make the step stale
                assert after["version"] == before["version"], name
                assert np.array_equal(after["lengths"], before["lengths"]), name
            np.testing.assert_array_equal(after["kv"], before["kv"], err_msg=name)
        assert messages[0] == messages[1], name
    np.testing.assert_array_equal(dev.kv, spec.kv)


def test_import_kvref_does_not_import_numba_cuda():
    """Whether numba.cuda is the simulator is fixed at import; kvref must leave that choice to the user."""
    code = "import sys, kvref; kvref.FlatCache(kvref.CacheShape(1, 1, 1, 4), backend='python'); " \
           "assert 'numba.cuda' not in sys.modules, sorted(m for m in sys.modules if 'cuda' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)
