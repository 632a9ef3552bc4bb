"""kvref.shapes and kvref.memory: presets against published config.json values, byte offsets against real NumPy
strides and addresses, and every memory formula against the ``nbytes`` of a really allocated cache (flat, ring,
two-tier and pooled) and against the bytes a filled two-tier or pooled cache reports using."""

import math

import numpy as np
import pytest

import kvref
from kvref import memory, shapes
from kvref.errors import DTypeError, IndexOutOfRangeError, ShapeError
from kvref.shapes import CacheShape

# ---------------------------------------------------------------------------------------------------------------
# presets: (layers, q_heads, kv_heads, head_dim), copied from each model's config.json on the Hugging Face Hub
# ---------------------------------------------------------------------------------------------------------------
PUBLISHED = {
    # openai-community/gpt2: n_layer 12, n_head 12, n_embd 768 -> head_dim 64 (MHA)
    "gpt2": (12, 12, 12, 64),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0: num_hidden_layers 22, num_attention_heads 32, num_key_value_heads 4,
    # hidden_size 2048 -> head_dim 64
    "tinyllama-1.1b": (22, 32, 4, 64),
    # meta-llama/Llama-2-7b-hf: num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 32, hidden_size 4096
    "llama-2-7b": (32, 32, 32, 128),
    # meta-llama/Meta-Llama-3-8B: num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 8, hidden_size 4096
    "llama-3-8b": (32, 32, 8, 128),
    # mistralai/Mistral-7B-v0.1: num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 8, hidden_size 4096
    "mistral-7b": (32, 32, 8, 128),
    # microsoft/phi-2: num_hidden_layers 32, num_attention_heads 32, num_key_value_heads null (= 32), hidden_size 2560
    "phi-2": (32, 32, 32, 80),
    # microsoft/phi-4: num_hidden_layers 40, num_attention_heads 40, num_key_value_heads 10, hidden_size 5120
    "phi-4": (40, 40, 10, 128),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_matches_published_config(name):
    layers, q_heads, kv_heads, head_dim = PUBLISHED[name]
    p = kvref.PRESETS[name]
    assert (p.layers, p.q_heads, p.kv_heads, p.head_dim) == (layers, q_heads, kv_heads, head_dim)
    assert p.group_size == q_heads // kv_heads
    half = kvref.preset(name)
    assert half.dtype == "float16" and half.element_bytes == 2, "preset() defaults to fp16 storage"
    full = kvref.preset(name, "float32")
    assert (full.layers, full.q_heads, full.kv_heads, full.head_dim) == (layers, q_heads, kv_heads, head_dim)
    assert full.element_bytes == 4


def test_every_preset_is_covered():
    assert set(kvref.PRESETS) == set(PUBLISHED)


def test_unknown_preset():
    with pytest.raises(ShapeError) as info:
        kvref.preset("llama-9")
    assert info.value.argument == "name" and str(info.value).startswith("name: expected")
    with pytest.raises(DTypeError) as info:
        kvref.preset("gpt2", "bfloat16")
    assert info.value.argument == "dtype"


def test_cacheshape_properties():
    s = CacheShape(layers=3, q_heads=12, kv_heads=4, head_dim=8, dtype="float16")
    assert s.group_size == 3
    assert s.element_bytes == 2 and s.storage_dtype == np.uint16 and s.public_dtype == np.float16
    t = s.with_dtype("float32")
    assert (t.layers, t.q_heads, t.kv_heads, t.head_dim) == (3, 12, 4, 8)
    assert t.element_bytes == 4 and t.storage_dtype == np.float32 and t.public_dtype == np.float32
    assert s.dtype == "float16", "with_dtype returns a new shape"


@pytest.mark.parametrize("kwargs, error, argument", [
    ({"q_heads": 6, "kv_heads": 4}, ShapeError, "kv_heads"),
    ({"q_heads": 4, "kv_heads": 8}, ShapeError, "kv_heads"),
    ({"q_heads": 10, "kv_heads": 3}, ShapeError, "kv_heads"),
    ({"layers": 0}, ShapeError, "layers"),
    ({"layers": -1}, ShapeError, "layers"),
    ({"q_heads": 0}, ShapeError, "q_heads"),
    ({"q_heads": True}, ShapeError, "q_heads"),
    ({"kv_heads": 0}, ShapeError, "kv_heads"),
    ({"kv_heads": 2.0}, ShapeError, "kv_heads"),
    ({"head_dim": 1.5}, ShapeError, "head_dim"),
    ({"head_dim": "64"}, ShapeError, "head_dim"),
    ({"dtype": "bfloat16"}, DTypeError, "dtype"),
    ({"dtype": "float64"}, DTypeError, "dtype"),
    ({"dtype": np.float16}, DTypeError, "dtype"),
], ids=lambda p: repr(p) if not isinstance(p, type) else p.__name__)
def test_bad_cacheshape_arguments(kwargs, error, argument):
    args = {"layers": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 16, "dtype": "float32"}
    args.update(kwargs)
    with pytest.raises(error) as info:
        CacheShape(**args)
    assert type(info.value) is error
    assert info.value.argument == argument
    assert str(info.value).startswith(f"{argument}: expected ")


def test_cacheshape_accepts_numpy_integers():
    s = CacheShape(np.int64(2), np.int32(4), np.int64(2), np.int64(16))
    assert s.group_size == 2


# ---------------------------------------------------------------------------------------------------------------
# byte offsets against real arrays
# ---------------------------------------------------------------------------------------------------------------
SMALL = [
    (CacheShape(layers=3, q_heads=4, kv_heads=2, head_dim=4, dtype="float32"), 2, 5),
    (CacheShape(layers=2, q_heads=6, kv_heads=3, head_dim=3, dtype="float16"), 3, 4),
    (CacheShape(layers=4, q_heads=1, kv_heads=1, head_dim=2, dtype="float32"), 1, 7),
]


@pytest.mark.parametrize("shape, batch, max_tokens", SMALL)
def test_layer_k_v_offsets_equal_real_addresses(shape, batch, max_tokens):
    buf = np.zeros(shapes.buffer_dims(shape, batch, max_tokens), shape.storage_dtype)
    assert buf.nbytes == shape.layers * shapes.layer_bytes(shape, batch, max_tokens)
    for layer in range(shape.layers):
        assert shapes.layer_offset(shape, batch, max_tokens, layer) == buf[layer].ctypes.data - buf.ctypes.data
        assert shapes.k_offset(shape, batch, max_tokens, layer) == buf[layer, 0].ctypes.data - buf.ctypes.data
        assert shapes.v_offset(shape, batch, max_tokens, layer) == buf[layer, 1].ctypes.data - buf.ctypes.data
        assert buf[layer].nbytes == shapes.layer_bytes(shape, batch, max_tokens)
    offsets = [shapes.layer_offset(shape, batch, max_tokens, layer) for layer in range(shape.layers)]
    assert len(set(offsets)) == shape.layers and offsets[0] == 0


@pytest.mark.parametrize("layout", ["head_major", "token_major"])
@pytest.mark.parametrize("shape, batch, max_tokens", SMALL)
def test_element_offset_equals_ndarray_strides(shape, batch, max_tokens, layout):
    dims = shapes.buffer_dims(shape, batch, max_tokens, layout)
    buf = np.zeros(dims, shape.storage_dtype)
    seen = set()
    for layer, kv, seq, head, slot, dim in np.ndindex(shape.layers, 2, batch, shape.kv_heads, max_tokens,
                                                      shape.head_dim):
        if layout == "head_major":
            index = (layer, kv, seq, head, slot, dim)
        else:
            index = (layer, kv, seq, slot, head, dim)
        from_strides = int(np.dot(index, buf.strides))
        from_address = buf[index[:-1]][index[-1]:].ctypes.data - buf.ctypes.data
        got = shapes.element_offset(shape, batch, max_tokens, layer, kv, seq, head, slot, dim, layout)
        assert got == from_strides == from_address, index
        seen.add(got)
    # a bijection onto the buffer's elements
    assert seen == set(range(0, buf.nbytes, shape.element_bytes))


def test_token_major_offset_is_seed001_formula():
    """Seed 001, per layer's K block [max_context, num_heads, head_dim]: dst = (pos * num_heads + head) * D + dim."""
    shape = CacheShape(layers=2, q_heads=8, kv_heads=8, head_dim=128, dtype="float16")
    max_context, batch = 64, 1
    for layer in range(2):
        base = shapes.k_offset(shape, batch, max_context, layer)
        for pos, head, dim in [(0, 0, 0), (5, 3, 7), (63, 7, 127), (10, 0, 1)]:
            dst_idx = (pos * shape.kv_heads + head) * shape.head_dim + dim
            got = shapes.element_offset(shape, batch, max_context, layer, 0, 0, head, pos, dim, "token_major")
            assert got - base == dst_idx * 2


@pytest.mark.parametrize("call, argument", [
    (lambda s: shapes.layer_offset(s, 1, 4, 2), "layer"),
    (lambda s: shapes.layer_offset(s, 1, 4, -1), "layer"),
    (lambda s: shapes.v_offset(s, 1, 4, 5), "layer"),
    (lambda s: shapes.element_offset(s, 1, 4, 0, 2, 0, 0, 0, 0), "kv_index"),
    (lambda s: shapes.element_offset(s, 1, 4, 0, 0, 1, 0, 0, 0), "seq"),
    (lambda s: shapes.element_offset(s, 1, 4, 0, 0, 0, 2, 0, 0), "head"),
    (lambda s: shapes.element_offset(s, 1, 4, 0, 0, 0, 0, 4, 0), "slot"),
    (lambda s: shapes.element_offset(s, 1, 4, 0, 0, 0, 0, 0, 8), "dim"),
    (lambda s: shapes.element_offset(s, 1, 4, 0, 0, 0, 0, 0, -1), "dim"),
])
def test_offsets_reject_out_of_range_indices(call, argument):
    s = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8)
    with pytest.raises(IndexOutOfRangeError) as info:
        call(s)
    assert info.value.argument == argument


def test_unknown_layout():
    s = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8)
    for call in (lambda: shapes.buffer_dims(s, 1, 4, "tokens"),
                 lambda: shapes.element_offset(s, 1, 4, 0, 0, 0, 0, 0, 0, "tokens")):
        with pytest.raises(ShapeError) as info:
            call()
        assert info.value.argument == "layout"


def test_flat_cache_storage_uses_buffer_dims():
    shape = CacheShape(layers=3, q_heads=4, kv_heads=2, head_dim=8, dtype="float16")
    cache = kvref.FlatCache(shape, batch=2, max_tokens=5, backend="python")
    assert cache.kv.shape == shapes.buffer_dims(shape, 2, 5) == (3, 2, 2, 2, 5, 8)
    assert cache.kv.dtype == np.uint16 and cache.kv.flags.c_contiguous


# ---------------------------------------------------------------------------------------------------------------
# memory formulas against real nbytes
# ---------------------------------------------------------------------------------------------------------------
SHAPES = [
    CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=16, dtype="float32"),
    CacheShape(layers=3, q_heads=8, kv_heads=1, head_dim=8, dtype="float16"),
    CacheShape(layers=1, q_heads=6, kv_heads=6, head_dim=12, dtype="float16"),
    CacheShape(layers=4, q_heads=12, kv_heads=4, head_dim=32, dtype="float32"),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{s.layers}q{s.q_heads}kv{s.kv_heads}d{s.head_dim}{s.dtype}")
@pytest.mark.parametrize("batch, max_tokens", [(1, 1), (1, 17), (3, 8), (4, 33)])
def test_memory_formulas_equal_allocated_nbytes(shape, batch, max_tokens):
    cache = kvref.FlatCache(shape, batch=batch, max_tokens=max_tokens, backend="python")
    assert memory.cache_bytes(shape, batch, max_tokens) == cache.nbytes == cache.kv.nbytes
    for layer in range(shape.layers):
        assert memory.bytes_per_layer(shape, batch, max_tokens) == cache.kv[layer].nbytes
        assert shapes.layer_bytes(shape, batch, max_tokens) == cache.kv[layer].nbytes
    one_token = cache.kv[:, :, 0, :, 0, :]  # every layer, K and V, every KV head, one slot of one sequence
    assert memory.bytes_per_token(shape) == one_token.nbytes
    assert memory.bytes_per_token(shape) * batch * max_tokens == cache.nbytes
    assert cache.stats()["bytes_per_token"] == memory.bytes_per_token(shape)


@pytest.mark.parametrize("kv_heads, tp_size, local", [(8, 1, 8), (8, 2, 4), (8, 4, 2), (8, 8, 1), (4, 4, 1),
                                                      (2, 4, 1), (2, 8, 1), (1, 4, 1)])
def test_tp_sharding_equals_per_rank_allocation(kv_heads, tp_size, local):
    """Each rank allocates a cache for its own KV heads (q_heads split the same way); replicated when tp > kv."""
    q_heads = 16
    shape = CacheShape(layers=3, q_heads=q_heads, kv_heads=kv_heads, head_dim=8, dtype="float16")
    assert memory.local_kv_heads(kv_heads, tp_size) == local
    rank_shape = CacheShape(layers=3, q_heads=q_heads // tp_size, kv_heads=local, head_dim=8, dtype="float16")
    rank_cache = kvref.FlatCache(rank_shape, batch=2, max_tokens=10, backend="python")
    assert memory.cache_bytes(shape, 2, 10, tp_size) == rank_cache.nbytes
    assert memory.bytes_per_layer(shape, 2, 10, tp_size) == rank_cache.kv[0].nbytes
    assert memory.bytes_per_token(shape, tp_size) * 2 * 10 == rank_cache.nbytes
    if tp_size <= kv_heads:
        assert memory.cache_bytes(shape, 2, 10, tp_size) * tp_size == memory.cache_bytes(shape, 2, 10)


@pytest.mark.parametrize("kv_heads, tp_size", [(8, 3), (8, 0), (8, -2), (4, 6), (8, 12), (8, 2.0), (8, True)])
def test_tp_size_must_divide_or_be_a_multiple(kv_heads, tp_size):
    shape = CacheShape(layers=2, q_heads=8, kv_heads=kv_heads, head_dim=8)
    for call in (lambda: memory.local_kv_heads(kv_heads, tp_size), lambda: memory.cache_bytes(shape, 1, 8, tp_size),
                 lambda: memory.bytes_per_token(shape, tp_size)):
        with pytest.raises(ShapeError) as info:
            call()
        assert info.value.argument == "tp_size"


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_cache_allocates_formula_bytes(name):
    layers, q_heads, kv_heads, head_dim = PUBLISHED[name]
    shape = kvref.preset(name)  # fp16
    cache = kvref.FlatCache(shape, batch=1, max_tokens=4, backend="python")
    assert cache.nbytes == 2 * layers * 1 * kv_heads * 4 * head_dim * 2
    assert memory.cache_bytes(shape, 1, 4) == cache.nbytes
    # at full context, from the config numbers alone
    assert memory.cache_bytes(shape, 1, 8192) == 2 * layers * kv_heads * 8192 * head_dim * 2
    assert memory.wrong_heads_bytes(shape, 1, 8192) == memory.cache_bytes(shape, 1, 8192) * q_heads // kv_heads


def test_known_sizes():
    """Numbers worked out by hand from the configs."""
    # Llama-3-8B, fp16, 8192 tokens: 2 * 32 layers * 8 KV heads * 8192 * 128 * 2 bytes = 1 GiB
    assert memory.cache_bytes(kvref.preset("llama-3-8b"), 1, 8192) == memory.GIB
    # Llama-2-7B (MHA), fp16, 4096 tokens: 2 * 32 * 32 * 4096 * 128 * 2 = 2 GiB
    assert memory.cache_bytes(kvref.preset("llama-2-7b"), 1, 4096) == 2 * memory.GIB
    # per token, Llama-3-8B fp16: 2 * 32 * 8 * 128 * 2 = 128 KiB
    assert memory.bytes_per_token(kvref.preset("llama-3-8b")) == 128 * 1024
    assert memory.MIB == 2**20 and memory.GIB == 2**30


@pytest.mark.parametrize("call, argument", [
    (lambda s: memory.bytes_per_layer(s, 0, 8), "batch"),
    (lambda s: memory.bytes_per_layer(s, 1, 0), "max_tokens"),
    (lambda s: memory.cache_bytes(s, 1.5, 8), "batch"),
    (lambda s: memory.cache_bytes(s, 1, -3), "max_tokens"),
])
def test_memory_rejects_bad_sizes(call, argument):
    s = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8)
    with pytest.raises(ShapeError) as info:
        call(s)
    assert info.value.argument == argument


def test_memory_table_rows():
    rows = memory.memory_table(names=["tinyllama-1.1b", "llama-3-8b"], contexts=(2048, 4096))
    assert [(r[0], r[1]) for r in rows] == [("tinyllama-1.1b", 2048), ("tinyllama-1.1b", 4096),
                                            ("llama-3-8b", 2048), ("llama-3-8b", 4096)]
    # TinyLlama fp16 at 2048: 2 * 22 * 4 * 2048 * 64 * 2 = 44 MiB; Llama-3-8B fp16 at 4096: 512 MiB
    assert rows[0][2] == 44 * memory.MIB and rows[1][2] == 88 * memory.MIB
    assert rows[3][2] == 512 * memory.MIB
    everything = memory.memory_table()
    assert len(everything) == len(PUBLISHED) * 4


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{s.layers}q{s.q_heads}kv{s.kv_heads}d{s.head_dim}{s.dtype}")
@pytest.mark.parametrize("batch, window, sinks", [(1, 1, 0), (1, 17, 3), (3, 8, 0), (2, 5, 4)])
def test_ring_formulas_equal_allocated_bytes(shape, batch, window, sinks):
    """ring_bytes = a real RingCache's nbytes (K/V of W slots, however long the sequence); ring_position_bytes =
    its int64 slot positions, one per layer, sequence and slot."""
    cache = kvref.RingCache(shape, batch=batch, window=window, sinks=sinks, backend="python")
    assert memory.ring_bytes(shape, batch, window) == cache.nbytes == cache.kv.nbytes
    assert memory.ring_bytes(shape, batch, window) == memory.cache_bytes(shape, batch, window)
    assert memory.ring_bytes(shape, batch, window) == 2 * shape.layers * batch * shape.kv_heads * window * \
        shape.head_dim * shape.element_bytes
    assert memory.ring_position_bytes(shape, batch, window) == cache.stats()["position_bytes"]
    assert memory.ring_position_bytes(shape, batch, window) == shape.layers * batch * window * 8
    assert cache.slot_positions.nbytes == memory.ring_position_bytes(shape, batch, window)


def test_ring_bytes_stay_flat_past_the_window():
    shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8, dtype="float16")
    cache = kvref.RingCache(shape, batch=1, window=4, backend="python")
    for n in range(1, 11):
        step = cache.plan(1)
        k = np.full((1, 1, 2, 8), n, np.float16)
        for layer in range(shape.layers):
            cache.write(step, layer, k, k)
        cache.advance(step)
        assert cache.nbytes == memory.ring_bytes(shape, 1, 4)
        assert cache.stats()["position_bytes"] == memory.ring_position_bytes(shape, 1, 4)
    # Mistral-7B (sliding_window 4096 in its config), fp16: 512 MiB of K/V and 1 MiB of positions
    mistral = kvref.preset("mistral-7b")
    assert memory.ring_bytes(mistral, 1, 4096) == 512 * memory.MIB
    assert memory.ring_position_bytes(mistral, 1, 4096) == memory.MIB


@pytest.mark.parametrize("call, argument", [
    (lambda s: memory.ring_bytes(s, 1, 0), "window"),
    (lambda s: memory.ring_bytes(s, 0, 4), "batch"),
    (lambda s: memory.ring_position_bytes(s, 1, -1), "window"),
    (lambda s: memory.ring_position_bytes(s, 1.0, 4), "batch"),
])
def test_ring_memory_rejects_bad_sizes(call, argument):
    s = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8)
    with pytest.raises(ShapeError) as info:
        call(s)
    assert info.value.argument == argument


# ---------------------------------------------------------------------------------------------------------------
# two-tier memory formulas against real TwoTierCache arrays
# ---------------------------------------------------------------------------------------------------------------
TWO_TIER_SHAPES = [
    CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=32, dtype="float16"),
    CacheShape(layers=1, q_heads=8, kv_heads=1, head_dim=64, dtype="float32"),
    CacheShape(layers=3, q_heads=6, kv_heads=3, head_dim=96, dtype="float16"),
    CacheShape(layers=2, q_heads=2, kv_heads=2, head_dim=128, dtype="float32"),
]
#: bytes per block of 32 elements (ggml-common.h, facts file §1.1)
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}


@pytest.mark.parametrize("shape", TWO_TIER_SHAPES,
                         ids=lambda s: f"L{s.layers}q{s.q_heads}kv{s.kv_heads}d{s.head_dim}{s.dtype}")
@pytest.mark.parametrize("fmt", list(BLOCK_BYTES))
@pytest.mark.parametrize("batch, tail_tokens, max_tokens, migration_batch", [(1, 4, 4, 1), (1, 8, 30, 3),
                                                                             (3, 16, 40, 16), (2, 5, 9, 2)])
def test_two_tier_bytes_equal_allocated_nbytes(shape, fmt, batch, tail_tokens, max_tokens, migration_batch):
    """two_tier_bytes = a real TwoTierCache's nbytes = its tail array (R slots in the shape's dtype) plus its store
    array (S = M - R + B - 1 slots of head_dim / 32 blocks per KV head, K and V, every layer)."""
    cache = kvref.TwoTierCache(shape, batch=batch, tail_tokens=tail_tokens, max_tokens=max_tokens, store_format=fmt,
                               migration_batch=migration_batch, backend="python")
    slots = max_tokens - tail_tokens + migration_batch - 1
    row = shape.head_dim // 32 * BLOCK_BYTES[fmt]
    tail = 2 * shape.layers * batch * shape.kv_heads * tail_tokens * shape.head_dim * shape.element_bytes
    store = 2 * shape.layers * batch * shape.kv_heads * slots * row
    assert memory.two_tier_bytes(shape, batch, tail_tokens, max_tokens, fmt, migration_batch) == cache.nbytes
    assert cache.nbytes == tail + store == cache.kv.nbytes + cache.store.nbytes
    assert cache.kv.nbytes == tail and cache.store.nbytes == store and cache.store.shape[-2:] == (slots, row)
    assert memory.store_bytes_per_token(shape, fmt) == 2 * shape.layers * shape.kv_heads * row
    if slots:  # M = R with B = 1 needs no store at all: a token leaves the tail exactly when it is evicted
        assert memory.store_bytes_per_token(shape, fmt) == cache.store[:, :, 0, :, 0].nbytes
    stats = cache.stats()
    assert (stats["tail_bytes"], stats["store_bytes"], stats["nbytes"]) == (tail, store, cache.nbytes)
    assert stats["store_compression_vs_fp16"] == pytest.approx(shape.head_dim * 2 / row)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q5_1"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_two_tier_held_bytes_equal_bytes_used(fmt, dtype):
    """Fill a two-tier cache past M (a prefill longer than R, decode steps, a chunk, with different lengths per
    sequence): after every step, two_tier_held_bytes of each sequence's held and tail tokens sums to
    stats()["bytes_used"], and the tokens per tier follow min(L, M) held, of which L - m in the tail."""
    shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=32, dtype=dtype)
    R, M, B = 6, 14, 4
    cache = kvref.TwoTierCache(shape, batch=2, tail_tokens=R, max_tokens=M, store_format=fmt, migration_batch=B,
                               backend="python")
    rng = np.random.default_rng(0)
    for num_tokens, seq_ids in [(9, [0, 1]), (1, [0, 1]), (3, [1]), (1, [0, 1]), (12, [0]), (1, [1, 0])] + \
            [(1, [0, 1])] * 4:
        step = cache.plan(num_tokens, seq_ids)
        dims = (len(seq_ids), num_tokens, shape.kv_heads, shape.head_dim)
        for layer in range(shape.layers):
            cache.write(step, layer, rng.standard_normal(dims).astype(shape.public_dtype),
                        rng.standard_normal(dims).astype(shape.public_dtype))
        cache.advance(step)
        stats = cache.stats()
        expected = 0
        for seq in range(2):
            length = cache.get_seq_length(seq)
            migrated = B * math.ceil((length - R) / B) if length > R else 0
            held, tail = min(length, M), length - migrated
            assert stats["tokens_held"][seq] == held and stats["tokens_in_tail"][seq] == tail
            expected += memory.two_tier_held_bytes(shape, held, tail, fmt)
        assert stats["bytes_used"] == expected
        assert stats["bytes_used"] == stats["tail_bytes_used"] + stats["store_bytes_used"]
    assert cache.lengths.tolist() == [28, 19] and stats["tokens_evicted"] == [14, 5]
    # compression against fp16: held tokens * fp16 bytes per token / bytes used
    fp16_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2
    assert stats["compression_vs_fp16"] == pytest.approx(2 * M * fp16_token / stats["bytes_used"])


def test_two_tier_known_sizes():
    """Numbers worked out by hand: Llama-3-8B fp16, one token in the store: 2 * 32 layers * 8 KV heads *
    (128 / 32 blocks * 34 bytes) = 68 KiB for q8_0, 36 KiB for q4_0, against 128 KiB in fp16."""
    llama = kvref.preset("llama-3-8b")
    assert memory.store_bytes_per_token(llama, "q8_0") == 68 * 1024
    assert memory.store_bytes_per_token(llama, "q4_0") == 36 * 1024
    assert memory.two_tier_bytes(llama, 1, 256, 8192, "q8_0", 64) == 256 * 128 * 1024 + 7999 * 68 * 1024
    assert memory.two_tier_held_bytes(llama, 8192, 256, "q4_0") == 256 * 128 * 1024 + 7936 * 36 * 1024


# ---------------------------------------------------------------------------------------------------------------
# pooled memory formulas against real PooledCache and FlatCache arrays
# ---------------------------------------------------------------------------------------------------------------
def fill_pooled(cache, lengths, steps=(None,)):
    """Append ``lengths[s]`` tokens to sequence s of a PooledCache for real (plan, write every layer, advance), in
    chunks: each entry of ``steps`` is a chunk size (None: the rest), the last repeated until the length is reached."""
    shape = cache.shape
    for seq, length in enumerate(lengths):
        done, i = 0, 0
        while done < length:
            chunk = steps[min(i, len(steps) - 1)]
            n = length - done if chunk is None else min(chunk, length - done)
            step = cache.plan(n, [seq])
            k = np.full((1, n, shape.kv_heads, shape.head_dim), seq + 1, shape.public_dtype)
            for layer in range(shape.layers):
                cache.write(step, layer, k, k)
            cache.advance(step)
            done, i = done + n, i + 1


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{s.layers}q{s.q_heads}kv{s.kv_heads}d{s.head_dim}{s.dtype}")
@pytest.mark.parametrize("num_blocks, block_size", [(1, 1), (7, 4), (12, 16), (3, 5)])
def test_pooled_bytes_equal_allocated_nbytes(shape, num_blocks, block_size):
    """pooled_bytes = a real PooledCache's nbytes = its pool array (layers, 2, num_blocks, kv_heads, B, head_dim);
    bytes_per_block = B * bytes_per_token, whatever the batch and max_tokens."""
    for batch, max_tokens in [(1, None), (3, 2)]:
        cache = kvref.PooledCache(shape, num_blocks=num_blocks, block_size=block_size, batch=batch,
                                  max_tokens=max_tokens, backend="python")
        assert memory.pooled_bytes(shape, num_blocks, block_size) == cache.nbytes == cache.kv.nbytes
        assert cache.kv.shape == (shape.layers, 2, num_blocks, shape.kv_heads, block_size, shape.head_dim)
        assert memory.pooled_bytes(shape, num_blocks, block_size) == 2 * shape.layers * num_blocks * \
            shape.kv_heads * block_size * shape.head_dim * shape.element_bytes
        stats = cache.stats()
        assert stats["bytes_per_block"] == cache.kv[:, :, 0].nbytes == block_size * memory.bytes_per_token(shape)
        assert stats["nbytes"] == cache.nbytes and stats["bytes_used"] == 0


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("block_size", [1, 3, 4, 16, 32])
@pytest.mark.parametrize("lengths, steps", [([45, 8, 25, 22], (None,)), ([1, 17, 0, 33, 16, 5], (7, 1)),
                                            ([64, 63, 65], (16, 3, 1))])
def test_pooled_used_bytes_equal_stats_after_appending(dtype, block_size, lengths, steps):
    """Tokens of mixed lengths really appended (prefills, chunks, decode steps): blocks_used = blocks_needed,
    bytes_used = pooled_used_bytes and internal_fragmentation = the formula, after the last step; and against a
    FlatCache sized for the longest sequence, both sides are slots * bytes_per_token."""
    shape = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8, dtype=dtype)
    per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * shape.element_bytes
    needed = sum(math.ceil(n / block_size) for n in lengths)  # written out here, not from memory
    cache = kvref.PooledCache(shape, num_blocks=needed + 2, block_size=block_size, batch=len(lengths),
                              backend="python")
    fill_pooled(cache, lengths, steps)
    stats = cache.stats()
    assert stats["lengths"] == lengths and stats["tokens_held"] == sum(lengths)
    assert stats["blocks_used"] == memory.blocks_needed(lengths, block_size) == needed
    assert stats["blocks_free"] == 2 and stats["allocations"] == needed
    assert stats["bytes_used"] == memory.pooled_used_bytes(shape, lengths, block_size) == \
        needed * block_size * per_token
    waste = sum(math.ceil(n / block_size) * block_size - n for n in lengths)
    assert stats["internal_fragmentation"] == memory.internal_fragmentation(lengths, block_size) == waste
    assert all(math.ceil(n / block_size) * block_size - n < block_size for n in lengths)
    assert stats["allocated_slots"] == stats["slots_filled"] + waste
    assert stats["bytes_used"] == (sum(lengths) + waste) * memory.bytes_per_token(shape)
    assert cache.nbytes == memory.pooled_bytes(shape, needed + 2, block_size)
    # the flat cache a batch of these lengths needs: every sequence gets max(L) slots
    flat = kvref.FlatCache(shape, batch=len(lengths), max_tokens=max(lengths), backend="python")
    assert flat.nbytes == memory.cache_bytes(shape, len(lengths), max(lengths)) == \
        len(lengths) * max(lengths) * per_token
    assert flat.nbytes - stats["bytes_used"] == \
        (len(lengths) * max(lengths) - sum(lengths) - waste) * per_token
    if block_size == 1:
        assert stats["internal_fragmentation"] == 0 and stats["bytes_used"] == sum(lengths) * per_token


def test_pooled_sharing_uses_fewer_blocks_than_blocks_needed():
    """blocks_needed counts no sharing: a fork lists its parent's blocks without taking any until copy-on-write."""
    shape = CacheShape(layers=1, q_heads=2, kv_heads=1, head_dim=4, dtype="float32")
    cache = kvref.PooledCache(shape, num_blocks=8, block_size=4, max_seqs=2, backend="python")
    fill_pooled(cache, [10])
    child = cache.fork(0)
    stats = cache.stats()
    assert stats["lengths"] == [10, 10] and memory.blocks_needed(stats["lengths"], 4) == 6
    assert stats["blocks_used"] == 3 and stats["bytes_used"] == memory.pooled_used_bytes(shape, [10], 4)
    assert stats["internal_fragmentation"] == memory.internal_fragmentation([10], 4) == 2  # shared slots once
    step = cache.plan(1, [child])  # appends into the shared, partially filled last block: copy it first
    cache.write(step, 0, np.ones((1, 1, 1, 4), np.float32), np.ones((1, 1, 1, 4), np.float32))
    cache.advance(step)
    stats = cache.stats()
    assert stats["cow_copies"] == 1 and stats["blocks_used"] == 4
    assert stats["bytes_used"] == memory.pooled_used_bytes(shape, [10], 4) + stats["bytes_per_block"]


def test_pooled_known_sizes():
    """Numbers worked out by hand: Llama-3-8B fp16 takes 128 KiB per token, so a block of vLLM's default 16 tokens
    is 2 MiB; FlashInfer's example batch (lengths 45, 8, 25, 22, page_size 16) takes 3 + 1 + 2 + 2 = 8 pages with
    3 + 8 + 7 + 10 = 28 empty slots."""
    llama = kvref.preset("llama-3-8b")
    assert memory.pooled_bytes(llama, 1, 16) == 2 * memory.MIB
    assert memory.pooled_bytes(llama, 4096, 16) == 8 * memory.GIB
    assert memory.blocks_needed([45, 8, 25, 22], 16) == 8
    assert memory.internal_fragmentation([45, 8, 25, 22], 16) == 28
    assert memory.pooled_used_bytes(llama, [45, 8, 25, 22], 16) == 16 * memory.MIB
    assert memory.blocks_needed([], 16) == 0 and memory.blocks_needed([0, 0], 4) == 0
    assert memory.internal_fragmentation([0, 16, 32], 16) == 0
    # flat for the longest: 4 * 45 slots; pooled: 128 slots = 100 held + 28 empty
    assert memory.cache_bytes(llama, 4, 45) - memory.pooled_used_bytes(llama, [45, 8, 25, 22], 16) == \
        (4 * 45 - 128) * 128 * 1024


@pytest.mark.parametrize("call, argument", [
    (lambda s: memory.pooled_bytes(s, 0, 16), "num_blocks"),
    (lambda s: memory.pooled_bytes(s, 4, 0), "block_size"),
    (lambda s: memory.blocks_needed([3, 4], 0), "block_size"),
    (lambda s: memory.blocks_needed([3, -1], 4), "lengths"),
    (lambda s: memory.blocks_needed([3, 2.5], 4), "lengths"),
    (lambda s: memory.pooled_used_bytes(s, [3, 4], 1.0), "block_size"),
    (lambda s: memory.internal_fragmentation([True], 4), "lengths"),
])
def test_pooled_memory_rejects_bad_sizes(call, argument):
    s = CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8)
    with pytest.raises(ShapeError) as info:
        call(s)
    assert info.value.argument == argument
