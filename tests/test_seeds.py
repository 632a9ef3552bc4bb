"""One regression test per seed defect that applies to what kvref has now (flat cache, shapes, memory, attention).

The seeds are in ../shared/seeds; their defects are listed in ../shared/seeds/README.md. Seed 000's ring defects are
checked on the ring cache at the end of this file; two-tier, pooled and quantization defects belong to those variants'
tests; seed 002's 9,950-token count belongs to the toy decoder's.
"""

import math

import numpy as np
import pytest

import kvref
from kvref import memory, shapes
from kvref.errors import CacheOverflowError
from kvref.shapes import CacheShape

import oracle


def scale_of(shape):
    return float(np.float32(1.0 / math.sqrt(shape.head_dim)))


def state_equal(a, b):
    return a.keys() == b.keys() and all(
        (a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes())
        if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)


# ---------------------------------------------------------------------------------------------------------------
# seed 000: every layer bound the buffer at offset 0; the cache was sized by query heads; element size unsure
# ---------------------------------------------------------------------------------------------------------------
def test_seed000_layers_do_not_alias(backend, rng):
    layers = 5
    shape = CacheShape(layers=layers, q_heads=4, kv_heads=2, head_dim=8)
    cache = kvref.FlatCache(shape, batch=2, max_tokens=6, backend=backend)
    k = (rng.standard_normal((layers, 2, 4, 2, 8)) + np.arange(layers)[:, None, None, None, None]).astype(np.float32)
    v = np.broadcast_to(np.arange(layers, dtype=np.float32)[:, None, None, None, None] + 1, k.shape).copy()
    step = cache.plan(4)
    for layer in range(layers):
        cache.write(step, layer, k[layer], v[layer])
    # attention of each layer sees that layer's V only: every V of layer l is l + 1
    for layer in range(layers):
        out = cache.attend(step, layer, rng.standard_normal((2, 4, 4, 8)).astype(np.float32))
        np.testing.assert_allclose(out, layer + 1, rtol=1e-6)
    cache.advance(step)
    buf = cache.kv
    raw = buf.reshape(-1).view(np.uint8)
    half = shapes.layer_bytes(shape, 2, 6) // 2
    for layer in range(layers):
        for s in range(2):
            assert np.array_equal(cache.keys(layer, s), np.transpose(k[layer, s], (1, 0, 2)))
            assert np.array_equal(cache.values(layer, s), np.transpose(v[layer, s], (1, 0, 2)))
        # the explicit byte offsets point at this layer's K and V
        k_block = raw[shapes.k_offset(shape, 2, 6, layer):][:half].view(np.float32).reshape(2, 2, 6, 8)
        v_block = raw[shapes.v_offset(shape, 2, 6, layer):][:half].view(np.float32).reshape(2, 2, 6, 8)
        assert np.array_equal(k_block[:, :, :4], np.transpose(k[layer], (0, 2, 1, 3)))
        assert np.array_equal(v_block[:, :, :4], np.transpose(v[layer], (0, 2, 1, 3)))
    assert len({shapes.layer_offset(shape, 2, 6, layer) for layer in range(layers)}) == layers


def test_seed000_cache_sized_by_kv_heads_not_query_heads():
    """Phi-4 (microsoft/phi-4 config.json: 40 layers, 40 attention heads, 10 KV heads, hidden 5120 -> head_dim 128).
    Seed 000 used HEADS = 40; the cache holds 10 KV heads, so its size was 4x too large."""
    shape = kvref.preset("phi-4")  # fp16
    tokens = 4096
    right = 2 * 40 * 1 * 10 * tokens * 128 * 2
    wrong = 2 * 40 * 1 * 40 * tokens * 128 * 2
    assert memory.cache_bytes(shape, 1, tokens) == right
    assert memory.wrong_heads_bytes(shape, 1, tokens) == wrong == 4 * right
    small = kvref.FlatCache(shape, batch=1, max_tokens=4, backend="python")
    assert small.nbytes == 2 * 40 * 10 * 4 * 128 * 2
    assert small.kv.shape[3] == 10, "the storage has one row block per KV head"


def test_seed000_element_size_is_explicit():
    """Seed 000 was unsure whether an element is 2 or 4 bytes: it is 2 for fp16, 4 for fp32, and the storage agrees."""
    for dtype, size in (("float16", 2), ("float32", 4)):
        shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8, dtype=dtype)
        cache = kvref.FlatCache(shape, batch=1, max_tokens=3, backend="python")
        assert shape.element_bytes == size == cache.kv.itemsize
        assert cache.nbytes == 2 * 2 * 2 * 3 * 8 * size
        assert cache.stats()["element_bytes"] == size


# ---------------------------------------------------------------------------------------------------------------
# seed 001: add-then-check overflow; O(capacity) reset; token-major layout
# ---------------------------------------------------------------------------------------------------------------
def test_seed001_overflow_checked_before_any_change(backend, rng):
    """Seed 001's example: max context 5, position 5, advance 1 -> overflow. After the error the cache must be
    exactly as before (seed 001 had already moved its position to 6) and must keep working."""
    shape = CacheShape(layers=2, q_heads=2, kv_heads=1, head_dim=8)
    cache = kvref.FlatCache(shape, batch=2, max_tokens=5, backend=backend)
    k = rng.standard_normal((2, 2, 5, 1, 8)).astype(np.float32)
    cache.append(k, k, seq_ids=[0, 1])
    cache.reset(seq=1)
    cache.append(k[:, :1, :2], k[:, :1, :2], seq_ids=[1])
    assert cache.lengths.tolist() == [5, 2]
    before = cache.state()
    for attempt in (lambda: cache.plan(1), lambda: cache.plan(1, [0]), lambda: cache.plan(4, [1]),
                    lambda: cache.append(k[:, :, :1], k[:, :, :1])):
        with pytest.raises(CacheOverflowError):
            attempt()
        assert state_equal(before, cache.state())
        assert cache.get_seq_length(0) == 5 and cache.get_seq_length(1) == 2
    # the cache still works: sequence 1 continues at position 2
    step = cache.plan(3, [1])
    assert step.positions.tolist() == [[2, 3, 4]]


def test_seed001_reset_is_O1(backend, rng):
    """reset() changes lengths only: it never touches the K/V buffer (made read-only here, so any write would raise),
    and afterwards writes and attention see only the new tokens."""
    shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8)
    cache = kvref.FlatCache(shape, batch=2, max_tokens=12, backend=backend)
    old = rng.standard_normal((2, 2, 7, 2, 8)).astype(np.float32) * 100
    cache.append(old, old)
    kv_before = cache.kv.copy()
    buffer = cache.kv
    buffer.flags.writeable = False
    try:
        cache.reset()
        cache.reset(seq=1)
    finally:
        buffer.flags.writeable = True
    assert np.array_equal(cache.kv, kv_before), "reset did not zero (or touch) the buffer"
    assert cache.lengths.tolist() == [0, 0]
    # new tokens land at position 0 and attention sees only them, not the old (still stored) rows
    new_k = rng.standard_normal((2, 2, 3, 2, 8)).astype(np.float32)
    new_v = rng.standard_normal((2, 2, 3, 2, 8)).astype(np.float32)
    step = cache.plan(3)
    assert step.positions.tolist() == [[0, 1, 2], [0, 1, 2]]
    for layer in range(2):
        cache.write(step, layer, new_k[layer], new_v[layer])
        q = rng.standard_normal((2, 3, 4, 8)).astype(np.float32)
        out = cache.attend(step, layer, q)
        for s in range(2):
            keys = np.transpose(new_k[layer, s], (1, 0, 2))
            values = np.transpose(new_v[layer, s], (1, 0, 2))
            expected = oracle.causal_chunk_attention(q[s], keys, values, [0, 1, 2], scale_of(shape))
            np.testing.assert_allclose(out[s], expected, rtol=0, atol=1e-5)
    cache.advance(step)
    assert np.array_equal(cache.keys(1, 0), np.transpose(new_k[1, 0], (1, 0, 2)))


def test_seed001_token_major_vs_head_major_offsets():
    """Both layouts' element offsets equal NumPy's strides; reading one head's n tokens is contiguous head-major
    (step head_dim elements) and strided token-major (step kv_heads * head_dim elements, seed 001's layout)."""
    shape = CacheShape(layers=2, q_heads=8, kv_heads=4, head_dim=16, dtype="float16")
    batch, max_tokens = 2, 10
    e = shape.element_bytes
    steps = {"head_major": shape.head_dim * e, "token_major": shape.kv_heads * shape.head_dim * e}
    for layout, token_step in steps.items():
        buf = np.zeros(shapes.buffer_dims(shape, batch, max_tokens, layout), shape.storage_dtype)
        for idx in [(0, 0, 0, 0, 0, 0), (1, 1, 1, 3, 9, 15), (1, 0, 0, 2, 4, 7), (0, 1, 1, 1, 1, 1)]:
            layer, kv, seq, head, slot, dim = idx
            array_index = idx if layout == "head_major" else (layer, kv, seq, slot, head, dim)
            assert shapes.element_offset(shape, batch, max_tokens, *idx, layout=layout) == \
                int(np.dot(array_index, buf.strides))
        a = shapes.element_offset(shape, batch, max_tokens, 1, 0, 1, 2, 3, 0, layout=layout)
        b = shapes.element_offset(shape, batch, max_tokens, 1, 0, 1, 2, 4, 0, layout=layout)
        assert b - a == token_step
    cache = kvref.FlatCache(shape, batch=batch, max_tokens=max_tokens, backend="python")
    assert cache.kv[1, 0, 1, 2, :7, :].flags.c_contiguous, "kvref stores head-major: one head's tokens are contiguous"


# ---------------------------------------------------------------------------------------------------------------
# seed 002: prefill/decode with TP; its memory formula is right and kept
# ---------------------------------------------------------------------------------------------------------------
def test_seed002_tp_memory_formula():
    """2 * layers * batch * local_kv_heads * max_seq * head_dim * bytes; seed 002's example: 4 layers, batch 1,
    1 local head (4 KV heads over 4 GPUs), 512 tokens, head_dim 64, fp32 = 1 MiB per GPU."""
    assert 2 * 4 * 1 * 1 * 512 * 64 * 4 == 2**20
    full = CacheShape(layers=4, q_heads=4, kv_heads=4, head_dim=64, dtype="float32")
    assert memory.local_kv_heads(4, 4) == 1
    assert memory.cache_bytes(full, 1, 512, tp_size=4) == memory.MIB
    rank = CacheShape(layers=4, q_heads=1, kv_heads=1, head_dim=64, dtype="float32")
    assert kvref.FlatCache(rank, batch=1, max_tokens=512, backend="python").nbytes == memory.MIB
    assert memory.cache_bytes(full, 1, 512) == 4 * memory.MIB, "without TP one device holds all 4 heads"


def test_seed002_prefill_then_decode_equals_recompute(backend, rng):
    """Prefill a prompt as one causal chunk, then decode token by token: each cached step's output equals a full
    recomputation of attention over the whole sequence so far (the float64 oracle, no cache)."""
    shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8)
    prompt, new = 12, 6
    cache = kvref.FlatCache(shape, batch=1, max_tokens=prompt + new, backend=backend)
    total = prompt + new
    k = rng.standard_normal((2, 1, total, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, 1, total, 2, 8)).astype(np.float32)
    q = rng.standard_normal((2, 1, total, 4, 8)).astype(np.float32)
    chunks = [(0, prompt)] + [(p, p + 1) for p in range(prompt, total)]
    for start, stop in chunks:
        step = cache.plan(stop - start)
        for layer in range(2):
            cache.write(step, layer, k[layer, :, start:stop], v[layer, :, start:stop])
            out = cache.attend(step, layer, q[layer, :, start:stop])
            for t, p in enumerate(range(start, stop)):
                full_k = np.transpose(k[layer, 0, :p + 1], (1, 0, 2))
                full_v = np.transpose(v[layer, 0, :p + 1], (1, 0, 2))
                expected = oracle.decode_attention_gqa(q[layer, 0, p], full_k, full_v, scale_of(shape))
                np.testing.assert_allclose(out[0, t], expected, rtol=0, atol=1e-5)
        cache.advance(step)
    assert cache.get_seq_length() == total and cache.is_full()


# ---------------------------------------------------------------------------------------------------------------
# seed 003: memory formula with n_heads; the TinyLlama row; batch with per-sequence lengths
# ---------------------------------------------------------------------------------------------------------------
def test_seed003_heads_formula_uses_kv_heads():
    """Seed 003: 2 x n_layers x batch x max_seq x n_heads x head_dim x 4 with n_heads = attention heads. kvref's
    formula uses KV heads: for every GQA preset the seed's number is q_heads / kv_heads times too large."""
    for name in kvref.PRESETS:
        shape = kvref.preset(name, "float32")
        right = 2 * shape.layers * 3 * 1000 * shape.kv_heads * shape.head_dim * 4
        assert memory.cache_bytes(shape, 3, 1000) == right
        assert memory.wrong_heads_bytes(shape, 3, 1000) == right * shape.q_heads // shape.kv_heads
    tiny = kvref.preset("tinyllama-1.1b", "float32")
    assert memory.wrong_heads_bytes(tiny, 1, 2048) == 8 * memory.cache_bytes(tiny, 1, 2048)


def test_seed003_tinyllama_row():
    """TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json: 22 layers, 32 attention heads, 4 KV heads, hidden 2048
    (head_dim 64). At fp32 and 2048 tokens: 2 * 22 * 4 * 2048 * 64 * 4 = 88 MiB exactly, not the seed's 144 MB
    (which came from '12 layers, 12 heads')."""
    shape = kvref.preset("tinyllama-1.1b", "float32")
    assert (shape.layers, shape.q_heads, shape.kv_heads, shape.head_dim) == (22, 32, 4, 64)
    size = memory.cache_bytes(shape, 1, 2048)
    assert size == 2 * 22 * 4 * 2048 * 64 * 4 == 88 * memory.MIB == 92_274_688
    assert size not in (144 * 10**6, 144 * memory.MIB)
    seed_row = 2 * 12 * 1 * 2048 * 12 * 64 * 4  # the seed's own formula with its wrong row: 144 MiB
    assert seed_row == 144 * memory.MIB and size != seed_row
    # a real allocation agrees (a short context keeps it small): bytes scale linearly with tokens
    cache = kvref.FlatCache(shape, batch=1, max_tokens=32, backend="python")
    assert cache.nbytes * (2048 // 32) == size


def test_seed003_batch_sequences_keep_their_own_lengths(backend, rng):
    """A batch of sequences with different lengths: each sequence's attention sees only its own tokens (V of
    sequence s is s + 1 everywhere, so its output must be exactly s + 1), and lengths advance independently."""
    shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8)
    cache = kvref.FlatCache(shape, batch=3, max_tokens=16, backend=backend)
    plan = [(5, [0, 1, 2]), (4, [1]), (2, [2, 0]), (1, [0, 1, 2]), (1, [2])]
    for num_tokens, ids in plan:
        step = cache.plan(num_tokens, ids)
        for layer in range(2):
            k = rng.standard_normal((len(ids), num_tokens, 2, 8)).astype(np.float32)
            v = np.empty_like(k)
            for i, s in enumerate(ids):
                v[i] = s + 1
            cache.write(step, layer, k, v)
            out = cache.attend(step, layer, rng.standard_normal((len(ids), num_tokens, 4, 8)).astype(np.float32))
            for i, s in enumerate(ids):
                np.testing.assert_allclose(out[i], s + 1, rtol=1e-6)
        cache.advance(step)
    assert cache.lengths.tolist() == [8, 10, 9]
    assert [cache.get_seq_length(s) for s in range(3)] == [8, 10, 9]
    assert [cache.remaining_capacity(s) for s in range(3)] == [8, 6, 7]


# ---------------------------------------------------------------------------------------------------------------
# seed 004 defects that apply to the flat cache's attention and stats
# ---------------------------------------------------------------------------------------------------------------
def test_seed004_attention_is_per_head_with_gqa(backend, rng):
    """Seed 004's attend() took one dot product over num_kv_heads * head_dim as if it were one head, with no GQA.
    kvref's output equals the per-head GQA oracle and differs from that flattened computation."""
    shape = CacheShape(layers=1, q_heads=4, kv_heads=2, head_dim=8)
    cache = kvref.FlatCache(shape, batch=1, max_tokens=8, backend=backend)
    k = rng.standard_normal((1, 1, 6, 2, 8)).astype(np.float32)
    v = rng.standard_normal((1, 1, 6, 2, 8)).astype(np.float32)
    q = rng.standard_normal((1, 1, 4, 8)).astype(np.float32)
    cache.append(k[:, :, :5], v[:, :, :5])
    step = cache.plan(1)
    cache.write(step, 0, k[0, :, 5:], v[0, :, 5:])
    out = cache.attend(step, 0, q)[0, 0]
    keys, values = np.transpose(k[0, 0], (1, 0, 2)), np.transpose(v[0, 0], (1, 0, 2))
    expected = oracle.decode_attention_gqa(q[0, 0], keys, values, scale_of(shape))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    # the seed's computation: query heads 0..1 flattened against the KV heads flattened, one softmax for all
    flat_q = q[0, 0, :2].reshape(-1)
    flat_k = k[0, 0].reshape(6, -1)
    flat_v = v[0, 0].reshape(6, -1)
    wrong = oracle.attention(flat_q, flat_k, flat_v, 1 / math.sqrt(16)).reshape(2, 8)
    assert not np.allclose(out[:2], wrong, atol=1e-3)


def test_seed004_stats_count_fp16_as_two_bytes():
    """Seed 004's stats() called its tail fp16 but counted 4 bytes per element."""
    shape = CacheShape(layers=3, q_heads=4, kv_heads=2, head_dim=8, dtype="float16")
    cache = kvref.FlatCache(shape, batch=2, max_tokens=5, backend="python")
    cache.append(np.ones((3, 2, 2, 2, 8), np.float16), np.ones((3, 2, 2, 2, 8), np.float16))
    stats = cache.stats()
    assert stats["element_bytes"] == 2
    assert stats["bytes_per_token"] == 2 * 3 * 2 * 8 * 2
    assert stats["bytes_used"] == 4 * stats["bytes_per_token"]
    assert stats["nbytes"] == cache.kv.nbytes == 2 * 5 * stats["bytes_per_token"]


# ---------------------------------------------------------------------------------------------------------------
# seed 000 on the ring cache it planned: per-layer offsets, KV-head sizing, element size, wrap p % W, visible keys
# ---------------------------------------------------------------------------------------------------------------
def test_seed000_layers_never_alias(backend, rng):
    """40 layers (seed 000's model) of a tiny width, written past the wrap: every layer keeps its own K/V (V of layer
    l is l + 1, so its attention output is exactly l + 1), and shapes' per-layer byte offsets are distinct, equal the
    storage strides and point at that layer's data (seed 000 bound every layer at offset 0)."""
    layers, window, n = 40, 3, 7
    shape = CacheShape(layers=layers, q_heads=2, kv_heads=1, head_dim=2)
    cache = kvref.RingCache(shape, batch=1, window=window, backend=backend)
    k = (rng.standard_normal((n, layers, 1, 1, 1, 2)) + np.arange(layers)[:, None, None, None, None]).astype(
        np.float32)
    for p in range(n):
        step = cache.plan(1)
        for layer in range(layers):
            cache.write(step, layer, k[p, layer], np.full((1, 1, 1, 2), layer + 1, np.float32))
        for layer in (0, 1, layers // 2, layers - 1):
            out = cache.attend(step, layer, rng.standard_normal((1, 1, 2, 2)).astype(np.float32))
            np.testing.assert_allclose(out, layer + 1, rtol=1e-6)
        cache.advance(step)
    buf = cache.kv
    raw = buf.reshape(-1).view(np.uint8)
    half = shapes.layer_bytes(shape, 1, window) // 2
    offsets = [shapes.layer_offset(shape, 1, window, layer) for layer in range(layers)]
    assert len(set(offsets)) == layers and offsets == [layer * buf.strides[0] for layer in range(layers)]
    for layer in range(layers):
        held = k[n - window:, layer, 0, 0, 0]  # positions 4, 5, 6 of this layer, (3, 2)
        assert np.array_equal(cache.keys(layer)[0], held)
        assert np.all(cache.values(layer) == layer + 1)
        assert shapes.v_offset(shape, 1, window, layer) - shapes.k_offset(shape, 1, window, layer) == buf.strides[1]
        k_block = raw[shapes.k_offset(shape, 1, window, layer):][:half].view(np.float32).reshape(window, 2)
        v_block = raw[shapes.v_offset(shape, 1, window, layer):][:half].view(np.float32).reshape(window, 2)
        assert np.array_equal(k_block[[p % window for p in range(n - window, n)]], held)
        assert np.all(v_block == layer + 1)


def test_seed000_ring_sized_by_kv_heads():
    """Phi-4 (40 layers, 40 query heads, 10 KV heads, head_dim 128): a ring of W slots is
    2 * layers * batch * kv_heads * W * head_dim * bytes, 4x smaller than seed 000's HEADS = 40 sizing."""
    shape = kvref.preset("phi-4")  # fp16
    assert (shape.layers, shape.q_heads, shape.kv_heads, shape.head_dim) == (40, 40, 10, 128)
    window = 4096
    right = 2 * 40 * 1 * 10 * window * 128 * 2
    assert memory.cache_bytes(shape, 1, window) == right
    assert memory.wrong_heads_bytes(shape, 1, window) == 4 * right
    small = kvref.RingCache(shape, batch=1, window=4, backend="python")  # a real allocation, kept small
    assert small.nbytes == memory.cache_bytes(shape, 1, 4) == 2 * 40 * 10 * 4 * 128 * 2
    assert small.nbytes * (window // 4) == right
    assert small.kv.shape == (40, 2, 1, 10, 4, 128), "one block per KV head, not per query head"


def test_seed000_ring_wraps_modulo_window(backend, rng):
    """Seed 000 wrote at seq_pos * HEAD_DIM with no wrap; the fix is slot p % W. After 2W + 3 tokens (W = 5,
    positions 0 .. 12) the ring holds the last W positions, position p in slot p % W: slots [10, 11, 12, 8, 9]."""
    window = 5
    n = 2 * window + 3
    shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=4)
    cache = kvref.RingCache(shape, batch=2, window=window, backend=backend)
    k = rng.standard_normal((2, 2, n, 2, 4)).astype(np.float32)
    cache.append(k[:, :, :4], k[:, :, :4])  # seq 0 and 1: a chunk, then decode steps across the wrap
    for p in range(4, n):
        cache.append(k[:, :, p:p + 1], k[:, :, p:p + 1])
    expected = [10, 11, 12, 8, 9]
    assert expected == [max(p for p in range(n) if p % window == slot) for slot in range(window)]
    assert np.array_equal(cache.slot_positions, np.broadcast_to(expected, (2, 2, window)))
    model = oracle.RingModel(2, 2, window)
    for layer in range(2):
        for s in range(2):
            model.append(layer, s, k[layer, s], k[layer, s])
    for layer in range(2):
        for s in range(2):
            assert cache.held_positions(s, layer).tolist() == model.held(s) == list(range(8, 13))
            for slot, p in enumerate(expected):
                assert np.array_equal(cache.kv[layer, 0, s, :, slot], k[layer, s, p])


def test_seed000_visible_keys_after_wrap(backend, rng):
    """Seed 000 left open which keys a query sees once the ring has wrapped: the query at p sees exactly
    p - W + 1 .. p (W keys, itself included). Checked by kvref.visible and by the attention output, which equals the
    oracle over those keys and differs from the W + 1 and W - 1 key off-by-ones."""
    window, p = 4, 10
    shape = CacheShape(layers=1, q_heads=2, kv_heads=1, head_dim=8)
    cache = kvref.RingCache(shape, batch=1, window=window, backend=backend)
    k = rng.standard_normal((1, 1, p + 1, 1, 8)).astype(np.float32)
    v = rng.standard_normal((1, 1, p + 1, 1, 8)).astype(np.float32)
    q = rng.standard_normal((1, 1, 2, 8)).astype(np.float32)
    cache.append(k[:, :, :p], v[:, :, :p])
    assert [j for j in range(-1, p + 3) if kvref.visible(p, j, window)] == [7, 8, 9, 10]
    assert oracle.window_keys(p, window) == [7, 8, 9, 10]
    step = cache.plan(1)
    cache.write(step, 0, k[0, :, p:], v[0, :, p:])
    out = cache.attend(step, 0, q)[0, 0]
    # the slots (including the step just written, not yet committed) hold exactly the W visible positions
    assert sorted(int(j) for j in cache.slot_positions[0, 0] if kvref.visible(p, j, window)) == [7, 8, 9, 10]
    keys, values = k[0, 0, :, 0].astype(np.float64), v[0, 0, :, 0].astype(np.float64)

    def over(positions):
        return oracle.decode_attention_gqa(q[0, 0], keys[None, positions], values[None, positions], scale_of(shape))

    np.testing.assert_allclose(out, over([7, 8, 9, 10]), rtol=0, atol=1e-5)
    assert not np.allclose(out, over([6, 7, 8, 9, 10]), atol=1e-3), "W + 1 keys (FlashAttention's (W, W))"
    assert not np.allclose(out, over([8, 9, 10]), atol=1e-3), "W - 1 keys"


def test_seed000_element_size():
    """Seed 000 was unsure whether an element is 2 or 4 bytes. The ring's storage: 2 for fp16, 4 for fp32, and nbytes
    counts exactly that (the slot positions are int64 metadata, reported separately)."""
    for dtype, size in (("float16", 2), ("float32", 4)):
        shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8, dtype=dtype)
        cache = kvref.RingCache(shape, batch=3, window=5, backend="python")
        assert shape.element_bytes == size == cache.kv.itemsize
        assert cache.nbytes == 2 * 2 * 3 * 2 * 5 * 8 * size == memory.cache_bytes(shape, 3, 5)
        stats = cache.stats()
        assert stats["element_bytes"] == size and stats["nbytes"] == cache.nbytes
        assert stats["position_bytes"] == 2 * 3 * 5 * 8
        cache.append(np.ones((2, 3, 7, 2, 8), dtype), np.ones((2, 3, 7, 2, 8), dtype))
        assert cache.keys(0, 1).dtype == np.dtype(dtype) and cache.nbytes == 2 * 2 * 3 * 2 * 5 * 8 * size


# ---------------------------------------------------------------------------------------------------------------
# seed 004 on the two-tier cache it described: real bytes, independent K/V scales, per-block per-head scales,
# honest stats, exact eviction accounting, GQA, migration in batches of any size
# ---------------------------------------------------------------------------------------------------------------
def two_tier(backend, fmt="q8_0", dtype="float32", layers=2, q_heads=4, kv_heads=2, head_dim=64, batch=1, tail=4,
             max_tokens=10, migration=2):
    shape = CacheShape(layers=layers, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    return kvref.TwoTierCache(shape, batch=batch, tail_tokens=tail, max_tokens=max_tokens, store_format=fmt,
                              migration_batch=migration, backend=backend)


def fp16_scale(block_amax, levels=127):
    """The fp16 scale ggml stores for a q8_0 block: fp16(float32(amax) / 127)."""
    return (np.float32(block_amax) / np.float32(levels)).astype(np.float16)


@pytest.mark.parametrize("fmt, bytes_per_elem", [("q8_0", 1.0625), ("q4_0", 0.5625)])
def test_seed004_quantization_is_stored_as_bytes(backend, rng, fmt, bytes_per_elem):
    """Seed 004 'quantized' into f32 codes, which saved nothing. kvref's store is a uint8 array of ggml blocks: its
    size is the formula (34 or 18 bytes per 32 elements: 1.0625 or 0.5625 bytes per element, less than fp16's 2),
    and the bytes of every stored token are gguf's quantization of that token."""
    cache = two_tier(backend, fmt)
    k = rng.standard_normal((2, 1, 9, 2, 64)).astype(np.float32)
    v = rng.standard_normal((2, 1, 9, 2, 64)).astype(np.float32)
    cache.append(k, v)
    store = cache.store
    slots = 10 - 4 + 2 - 1
    assert store.dtype == np.uint8
    assert store.shape == (2, 2, 1, 2, slots, 64 // 32 * {"q8_0": 34, "q4_0": 18}[fmt])
    assert store.nbytes == 2 * 2 * 1 * 2 * slots * 64 * bytes_per_elem
    stats = cache.stats()
    n_store = stats["tokens_in_store"][0]
    assert n_store == 6  # tail 9 - 6 = 3 tokens (R = 4, B = 2)
    assert stats["store_bytes_used"] / (n_store * 2 * 2 * 2 * 64) == bytes_per_elem < 2 < 4
    assert stats["store_compression_vs_fp16"] == pytest.approx(2 / bytes_per_elem)
    for layer in range(2):
        blocks = cache.store_blocks(layer)
        assert np.array_equal(blocks[0], oracle.gguf_quantize(k[layer, 0, :n_store].transpose(1, 0, 2), fmt))
        assert np.array_equal(blocks[1], oracle.gguf_quantize(v[layer, 0, :n_store].transpose(1, 0, 2), fmt))


def test_seed004_k_and_v_have_independent_scales(backend, rng):
    """Seed 004 computed one scale from the keys and applied it to the values too. With keys 1000x larger than the
    values, that scale rounds every value code to 0 (error = |v|). kvref's V blocks have their own scales: the V error
    stays within V's own q8_0 bound (amax_V / 254 + fp16 rounding of d), over 100x smaller than the seed's."""
    cache = two_tier(backend, "q8_0", layers=1)
    k = (1000 * rng.standard_normal((1, 1, 8, 2, 64))).astype(np.float32)
    v = rng.standard_normal((1, 1, 8, 2, 64)).astype(np.float32)
    cache.append(k, v)
    n_store = cache.tiers()["store"][1]
    assert n_store == 4
    v_true = v[0, 0, :n_store].transpose(1, 0, 2)  # (kv_heads, n, D)
    v_held = cache.values(0)[:, :n_store]
    v_err = np.abs(v_held.astype(np.float64) - v_true)
    assert np.all(v_err <= oracle.quant_error_bound(v_true, "q8_0"))
    k_blocks, v_blocks = cache.store_blocks(0)
    k_scales = k_blocks[..., :2].copy().view(np.float16).astype(np.float64)  # the first block's d of every row
    v_scales = v_blocks[..., :2].copy().view(np.float16).astype(np.float64)
    assert np.all(k_scales > 100 * v_scales)
    # the seed's way: the keys' scale applied to the values
    d_keys = np.abs(k[0, 0, :n_store]).max(axis=(1, 2)) / 127  # one per token
    seed_v = np.round(v[0, 0, :n_store] / d_keys[:, None, None]) * d_keys[:, None, None]
    seed_err = np.abs(seed_v.transpose(1, 0, 2) - v_true)
    assert v_err.max() * 100 < seed_err.max()


def test_seed004_one_scale_per_32_channel_block_per_head(backend, rng):
    """Seed 004 used one scale per whole token across all heads. kvref stores one fp16 scale per 32-channel block,
    per head, per token, K and V apart: here every (token, head, block) of K and of V has its own magnitude (amax
    3e-3 .. 3e3, all different), each stored q8_0 scale is fp16(that block's amax / 127), and each element's error is
    within its own block's bound. A per-token scale would wipe out the small blocks (error = their whole size)."""
    cache = two_tier(backend, "q8_0", layers=1, kv_heads=2, head_dim=128, tail=4, max_tokens=12, migration=4)

    def draw(lo, hi):
        """(1, 1, 9 tokens, 2 heads, 128): block b of head h of token t has amax exactly 3 * its own magnitude,
        72 magnitudes spread evenly (factors of 1.1 apart) over 10^lo .. 10^hi; each token gets 8 of them from all
        over the range (the largest over 1000x its smallest), in a random order over its heads and blocks."""
        spread = (10.0 ** np.linspace(lo, hi, 9 * 2 * 4)).reshape(8, 9).T  # token t: t, t + 9, ..., t + 63
        magnitude = rng.permuted(spread, axis=1).reshape(9, 2, 4, 1)
        x = np.clip(rng.standard_normal((9, 2, 4, 32)), -2.9, 2.9)
        x[..., 0] = 3.0
        return (x * magnitude).reshape(1, 1, 9, 2, 128).astype(np.float32)

    k, v = draw(-3, 0), draw(0.05, 3)
    cache.append(k, v)
    n_store = cache.tiers()["store"][1]
    assert n_store == 8
    scales = {}
    for kv_index, x in ((0, k), (1, v)):
        held = x[0, 0, :n_store].transpose(1, 0, 2)  # (heads, n, 128)
        blocks = cache.store_blocks(0)[kv_index].reshape(2, n_store, 4, 34)
        scales[kv_index] = blocks[..., :2].copy().view(np.float16)[..., 0]  # (heads, n, 4 blocks)
        amax = np.abs(held.reshape(2, n_store, 4, 32)).max(axis=-1)
        assert np.array_equal(scales[kv_index], fp16_scale(amax))
        got = (cache.keys(0) if kv_index == 0 else cache.values(0))[:, :n_store]
        err = np.abs(got.astype(np.float64) - held)
        assert np.all(err <= oracle.quant_error_bound(held, "q8_0"))
        relative = err.reshape(2, n_store, 4, 32).max(axis=-1) / amax  # worst error of each block / its amax
        assert relative.max() < 1 / 254 + 1 / 2048
    both = np.concatenate([scales[0].ravel(), scales[1].ravel()])
    assert len(np.unique(both)) == both.size == 2 * 2 * n_store * 4, "one scale per block, head, token, K and V"
    # the seed's per-token scale: the largest block of the token decides, so small blocks round to 0
    keys = k[0, 0, :n_store].astype(np.float64)  # (n, heads, 128)
    token_d = np.abs(keys).max(axis=(1, 2), keepdims=True) / 127
    seed_err = np.abs(np.round(keys / token_d) * token_d - keys).reshape(n_store, 2, 4, 32).max(axis=-1)
    seed_relative = seed_err / np.abs(keys).reshape(n_store, 2, 4, 32).max(axis=-1)
    assert seed_relative.max() == 1, "the small blocks of a token round to all zeros"


@pytest.mark.parametrize("dtype, element_bytes", [("float16", 2), ("float32", 4)])
def test_seed004_stats_count_the_tail_dtype(dtype, element_bytes):
    """Seed 004 called its tail fp16 but counted 4 bytes per element. kvref's tail counts 2 bytes for fp16 (4 for
    fp32), from the real array."""
    cache = two_tier("python", "q4_0", dtype=dtype, layers=3, kv_heads=2, head_dim=32, batch=2)
    cache.append(np.ones((3, 2, 7, 2, 32), dtype), np.ones((3, 2, 7, 2, 32), dtype))
    stats = cache.stats()
    assert stats["element_bytes"] == element_bytes == cache.kv.itemsize
    assert stats["tail_bytes"] == cache.kv.nbytes == 3 * 2 * 2 * 2 * 4 * 32 * element_bytes
    tail_tokens = sum(stats["tokens_in_tail"])
    assert tail_tokens == 2 * (7 - 4)
    assert stats["tail_bytes_used"] == tail_tokens * 2 * 3 * 2 * 32 * element_bytes


def test_seed004_compression_ratio_is_original_over_stored(backend, rng):
    """Seed 004's compression_ratio was tail bytes / store bytes. kvref's is original bytes / stored bytes: what the
    held tokens would take in fp16 (or fp32) over what they take here, tail and store together; > 1 once tokens are
    in the store, and equal to 1 for an fp16 tail holding everything."""
    cache = two_tier(backend, "q4_0", dtype="float16", layers=1, kv_heads=2, head_dim=64, tail=4, max_tokens=40,
                     migration=4)
    cache.append(np.ones((1, 1, 4, 2, 64), np.float16), np.ones((1, 1, 4, 2, 64), np.float16))
    assert cache.stats()["compression_vs_fp16"] == 1.0  # all in the fp16 tail
    k = rng.standard_normal((1, 1, 30, 2, 64)).astype(np.float16)
    cache.append(k, k)
    stats = cache.stats()
    held, tail = stats["tokens_held"][0], stats["tokens_in_tail"][0]
    fp16_token = 2 * 1 * 2 * 64 * 2
    used = tail * fp16_token + (held - tail) * 2 * 1 * 2 * 2 * 18
    assert stats["bytes_used"] == used
    assert stats["compression_vs_fp16"] == pytest.approx(held * fp16_token / used)
    assert stats["compression_vs_fp32"] == pytest.approx(2 * held * fp16_token / used)
    assert 1 < stats["compression_vs_fp16"] < 2 / 0.5625
    seed_ratio = stats["tail_bytes_used"] / stats["store_bytes_used"]
    assert seed_ratio < 1 < stats["compression_vs_fp16"], "the seed's ratio says the cache grew"


def test_seed004_eviction_accounting_has_no_drift(backend, rng):
    """Seed 004's enforce_max_tokens subtracted a count taken after it had shrunk the tail, so total_tokens drifted.
    Over 150 steps of random sizes (decode, chunks longer than the tail and than max_tokens, on random subsets of
    sequences) kvref's counts stay exact: held == min(L, M), evicted == L - held, tail + store == held."""
    tail, max_tokens = 3, 7
    cache = two_tier(backend, "q4_1", layers=1, q_heads=2, kv_heads=1, head_dim=32, batch=3, tail=tail,
                     max_tokens=max_tokens, migration=2)
    lengths = np.zeros(3, int)
    for _ in range(150):
        ids = sorted(rng.choice(3, size=rng.integers(1, 4), replace=False).tolist())
        n = int(rng.choice([1, 1, 1, 2, 4, 9]))
        k = rng.standard_normal((1, len(ids), n, 1, 32)).astype(np.float32)
        cache.append(k, k, seq_ids=ids)
        lengths[ids] += n
        stats = cache.stats()
        held = np.minimum(lengths, max_tokens)
        assert stats["lengths"] == lengths.tolist()
        assert stats["tokens_held"] == held.tolist()
        assert stats["tokens_evicted"] == (lengths - held).tolist()
        assert (np.array(stats["tokens_in_tail"]) + np.array(stats["tokens_in_store"])).tolist() == held.tolist()
        assert all(0 <= t <= tail for t in stats["tokens_in_tail"])
        for s in range(3):
            tiers = cache.tiers(s)
            assert tiers["evicted"] == (0, lengths[s] - held[s])
            assert tiers["tail"][1] == lengths[s] and tiers["store"][0] == tiers["evicted"][1]
            assert cache.store_blocks(0, s).shape[2] == stats["tokens_in_store"][s]
    assert lengths.min() > 10 * max_tokens


def test_seed004_two_tier_attention_is_per_head_with_gqa(backend, rng):
    """Seed 004's attend() took one dot product over num_kv_heads * head_dim, with no GQA. kvref's two-tier attention
    (q_heads = 4 > kv_heads = 2, keys partly in the store) equals the per-head GQA oracle over the held values, and
    differs from the flattened computation."""
    cache = two_tier(backend, "q8_0", layers=1, q_heads=4, kv_heads=2, head_dim=32, tail=4, max_tokens=10)
    k = rng.standard_normal((1, 1, 9, 2, 32)).astype(np.float32)
    v = rng.standard_normal((1, 1, 9, 2, 32)).astype(np.float32)
    q = rng.standard_normal((1, 1, 4, 32)).astype(np.float32)
    cache.append(k[:, :, :8], v[:, :, :8])
    assert cache.tiers()["store"] == (0, 4)  # 8 - R = 4 overflow, in batches of B = 2
    keys = np.concatenate([cache.keys(0), k[0, 0, 8:].transpose(1, 0, 2)], axis=1)
    values = np.concatenate([cache.values(0), v[0, 0, 8:].transpose(1, 0, 2)], axis=1)
    step = cache.plan(1)
    cache.write(step, 0, k[0, :, 8:], v[0, :, 8:])
    out = cache.attend(step, 0, q)[0, 0]
    scale = float(kvref.default_scale(32))
    np.testing.assert_allclose(out, oracle.decode_attention_gqa(q[0, 0], keys, values, scale), rtol=0, atol=1e-5)
    flat_q = q[0, 0, :2].reshape(-1)
    wrong = oracle.attention(flat_q, keys.transpose(1, 0, 2).reshape(9, -1), values.transpose(1, 0, 2).reshape(9, -1),
                             1 / math.sqrt(64)).reshape(2, 32)
    assert not np.allclose(out[:2], wrong, atol=1e-3)


def test_seed004_migration_in_batches_of_any_size(backend, rng):
    """Seed 004 migrated token by token. ggml's blocks run along head_dim within one token, so a token's bytes do not
    depend on which tokens migrate with it: batches of 1, 2, 3 and R = 4 (and a prefill straight into the store)
    give the same bytes for every stored position, equal to gguf's quantization of that token alone. No minimum batch
    is needed. KIVI-style per-channel *key* quantization groups each channel over G tokens; a batch of one token
    gives every channel a group with min = max (scale 0: nothing is quantized, VeloxQuant-MLX #162), so such a cache
    would need batches that are multiples of G. kvref does not quantize per channel."""
    k = rng.standard_normal((1, 1, 12, 1, 32)).astype(np.float32)
    stored = {}
    for migration in (1, 2, 3, 4):
        for prefill in (False, True):
            cache = two_tier(backend, "q4_0", layers=1, q_heads=2, kv_heads=1, head_dim=32, tail=4, max_tokens=12,
                             migration=migration)
            if prefill:
                cache.append(k, k)
            else:
                for p in range(12):
                    cache.append(k[:, :, p:p + 1], k[:, :, p:p + 1])
            lo, hi = cache.tiers()["store"]
            assert 4 - migration + 1 <= 12 - hi <= 4
            blocks = cache.store_blocks(0)[0, 0]
            for p in range(lo, hi):
                assert np.array_equal(blocks[p - lo], oracle.gguf_quantize(k[0, 0, p, 0], "q4_0"))
                stored.setdefault(p, blocks[p - lo].tobytes())
                assert stored[p] == blocks[p - lo].tobytes()
    assert len(stored) >= 8
    # KIVI's per-channel grouping over a batch of one token: a zero range in every channel
    one_token = k[0, 0, :1, 0]  # (1 token, 32 channels)
    assert np.all(one_token.max(axis=0) - one_token.min(axis=0) == 0)


# ---------------------------------------------------------------------------------------------------------------
# seed 004's PooledKvCache: blocks came from byte size classes, so a block held more than tokens_per_block; and
# enforce_max_tokens removed a whole block when fewer tokens had to go
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("head_dim", [4, 64])
def test_seed004_pooled_block_holds_exactly_block_size_tokens(backend, dtype, head_dim):
    """Seed 004 took each block from a byte size class (a 1 KiB buffer for 2 tokens of 32 bytes), so a block held
    up to 32 tokens and its own test could only assert 1 <= blocks <= 5. kvref, block_size = 2, the seed's 5 tokens
    appended one at a time (keys i, values 2i): exactly 3 blocks (2 + 2 + 1) whatever the dtype and the bytes per
    token; the storage's block dimension is 2; token 4 is row 0 of the third block; the tokens read back in order."""
    shape = CacheShape(layers=1, q_heads=2, kv_heads=2, head_dim=head_dim, dtype=dtype)
    cache = kvref.PooledCache(shape, num_blocks=8, block_size=2, backend=backend)
    for i in range(5):
        k = np.full((1, 1, 1, 2, head_dim), i, shape.public_dtype)
        cache.append(k, 2 * k)
    stats = cache.stats()
    assert stats["blocks_used"] == 3 and cache.block_table(0).size == 3
    assert cache.kv.shape == (1, 2, 8, 2, 2, head_dim), "(layers, K|V, blocks, kv_heads, block_size, head_dim)"
    token_bytes = 2 * 2 * head_dim * (2 if dtype == "float16" else 4)
    assert stats["bytes_per_block"] == 2 * token_bytes and stats["bytes_used"] == 3 * 2 * token_bytes
    assert stats["internal_fragmentation"] == 3 * 2 - 5
    table = cache.block_table(0)
    per_block = [sum(1 for p in range(5) if table[p // 2] == b) for b in table]
    assert per_block == [2, 2, 1]
    raw = cache.kv.view(np.float16) if dtype == "float16" else cache.kv
    assert np.all(raw[0, 0, table[2], :, 0] == 4) and np.all(raw[0, 1, table[2], :, 0] == 8)
    keys, values = cache.keys(0), cache.values(0)
    for i in range(5):
        assert np.all(keys[:, i] == i) and np.all(values[:, i] == 2 * i)


def test_seed004_pooled_eviction_never_removes_more_tokens_than_asked(backend, rng):
    """Seed 004's enforce_max_tokens removed the whole first block when fewer tokens had to go. kvref evicts exactly
    the tokens asked: evict_tokens(1) with blocks of 4 drops one token, keeps the block, and the next query still
    attends to the other 5 (the seed's output, over the last 2 tokens only, differs); with evict="oldest" a step past
    max_tokens drops exactly L + T - max_tokens tokens."""
    shape = CacheShape(layers=1, q_heads=2, kv_heads=1, head_dim=8)
    scale = scale_of(shape)
    cache = kvref.PooledCache(shape, num_blocks=4, block_size=4, backend=backend)
    k = rng.standard_normal((1, 1, 7, 1, 8)).astype(np.float32)
    v = rng.standard_normal((1, 1, 7, 1, 8)).astype(np.float32)
    cache.append(k[:, :, :6], v[:, :, :6])
    assert cache.evict_tokens(0, 1) == 0, "a block goes only when all its tokens do"
    assert cache.first_position(0) == 1 and cache.keys(0).shape[1] == 5
    assert cache.stats()["blocks_used"] == 2 and cache.stats()["evicted_tokens"] == 1
    q = rng.standard_normal((1, 1, 2, 8)).astype(np.float32)
    step = cache.plan(1)
    cache.write(step, 0, k[0, :, 6:], v[0, :, 6:])
    out = cache.attend(step, 0, q)[0, 0]
    keys, values = k[0, 0].transpose(1, 0, 2), v[0, 0].transpose(1, 0, 2)  # (Hkv, 7, D)
    expected = oracle.decode_attention_gqa(q[0, 0], keys[:, 1:7], values[:, 1:7], scale)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    seed_like = oracle.decode_attention_gqa(q[0, 0], keys[:, 4:7], values[:, 4:7], scale)
    assert not np.allclose(out, seed_like, atol=1e-3)
    cache.advance(step)
    # the sliding window: exactly L + T - max_tokens each time
    window = kvref.PooledCache(shape, num_blocks=4, block_size=4, max_tokens=5, evict="oldest", backend=backend)
    window.append(k[:, :, :5], v[:, :, :5])
    evicted = []
    for lo, hi in ((5, 6), (6, 7)):
        before = window.get_seq_length(0)
        window.append(k[:, :, lo:hi], v[:, :, lo:hi])
        evicted.append(window.stats()["evicted_tokens"])
        assert window.first_position(0) == before + (hi - lo) - 5
    assert evicted == [1, 2]
    assert window.block_table(0).size == 2, "block 0 still holds positions 2 and 3"
    assert np.array_equal(window.keys(0), keys[:, 2:7])
