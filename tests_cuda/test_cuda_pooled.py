"""PooledCache(backend="cuda") against the python backend (the spec run as plain Python) and a float64 oracle.

Runs in the CUDA simulator by default (see conftest.py). Every launch is tiny, because the simulator runs one Python
thread per CUDA thread: head_dim 16, 2 KV heads, blocks of B = 4 tokens, pools of at most 10 blocks.

The oracle is independent of ``kvref.pooled``: a per-sequence dict ``position -> (k_row, v_row)`` of what was
written (a fork copies the parent's dict), a gather written here that reads position p of a sequence through its
block table (block ``table[p // B - e // B]``, row ``p % B``), and float64 attention from ``oracle``. Every stored
row reached through the page table must equal the model's row bit for bit, and every attention output must match
float64 attention over the model's rows ``e .. p``.
"""

import numpy as np
import pytest
from numba import cuda

import kvref
import oracle
from kvref import CacheShape, PooledCache
from kvref.cuda import pooled as cuda_pooled

HEAD_DIM = 16
B = 4
LAYERS = 2
#: attention vs the spec: float32 rounding only (a real GPU fuses a*b+c into FMA and uses libdevice's expf)
SPEC_TOL = dict(rtol=1e-5, atol=2e-6)
#: attention vs the float64 oracle: float32 accumulation over <= 16 keys
ORACLE_TOL = dict(rtol=1e-4, atol=2e-5)


def _pair(dtype="float32", q_heads=4, kv_heads=2, **kwargs):
    shape = CacheShape(layers=LAYERS, q_heads=q_heads, kv_heads=kv_heads, head_dim=HEAD_DIM, dtype=dtype)
    kwargs = {"num_blocks": 8, "block_size": B, "batch": 2, **kwargs}
    return PooledCache(shape, backend="python", **kwargs), PooledCache(shape, backend="cuda", **kwargs)


class _Model:
    """What each sequence holds, by absolute position: rows[seq][layer][p] = (k_row, v_row), each (kv_heads, D) in
    the cache's public dtype. Knows nothing of blocks: append sets rows, fork copies a sequence's dict."""

    def __init__(self):
        self.rows = {}

    def append(self, seq, layer, positions, k, v):
        layers = self.rows.setdefault(seq, {})
        for t, p in enumerate(positions):
            layers.setdefault(layer, {})[int(p)] = (k[t].copy(), v[t].copy())

    def fork(self, parent, child):
        self.rows[child] = {layer: dict(rows) for layer, rows in self.rows.get(parent, {}).items()}

    def kv(self, seq, layer, first, last):
        """Rows of positions first .. last (inclusive) as (kv_heads, n, D) arrays, K and V."""
        rows = [self.rows[seq][layer][p] for p in range(first, last + 1)]
        return np.stack([r[0] for r in rows], axis=1), np.stack([r[1] for r in rows], axis=1)


def _gather(kv_host, layer, table, start, first, last, public_dtype):
    """The page-table walk, written independently: position p -> block table[p // B - start // B], row p % B.
    kv_host: (layers, 2, num_blocks, kv_heads, B, D) storage as NumPy. Returns K, V (kv_heads, n, D)."""
    storage = kv_host.view(public_dtype)
    size = storage.shape[4]  # the block size B
    k, v = [], []
    for p in range(first, last + 1):
        block = int(table[p // size - start // size])
        assert block >= 0, f"position {p} maps to no block"
        k.append(storage[layer, 0, block, :, p % size])
        v.append(storage[layer, 1, block, :, p % size])
    return np.stack(k, axis=1), np.stack(v, axis=1)


def _check_against_oracle(dev, step, layer, q, out, model, scale):
    """Every query's visible rows, gathered from the device storage through the step's tables, equal the model's
    rows exactly; the output matches float64 attention over them."""
    kv_host = dev.kv
    dtype = dev.shape.public_dtype
    for i, seq in enumerate(step.seq_ids.tolist()):
        start = int(step.starts[i])
        for t, p in enumerate(step.positions[i].tolist()):
            k, v = _gather(kv_host, layer, step.tables[i], start, start, p, dtype)
            k_model, v_model = model.kv(seq, layer, start, p)
            np.testing.assert_array_equal(k, k_model)
            np.testing.assert_array_equal(v, v_model)
            expected = oracle.decode_attention_gqa(q[i, t], k.astype(np.float64), v.astype(np.float64), scale)
            np.testing.assert_allclose(out[i, t], expected, **ORACLE_TOL)


def _assert_same_cache(dev, spec, model=None):
    """Bit-identical storage, the same books, the same stored rows per live sequence (and the model's)."""
    assert dev.kv.dtype == spec.kv.dtype
    np.testing.assert_array_equal(dev.kv, spec.kv)
    assert dev.live_sequences() == spec.live_sequences()
    np.testing.assert_array_equal(dev.lengths, spec.lengths)
    for seq in dev.live_sequences():
        np.testing.assert_array_equal(dev.block_table(seq), spec.block_table(seq))
        assert dev.first_position(seq) == spec.first_position(seq)
        for layer in range(LAYERS):
            k, v = dev.keys(layer, seq), dev.values(layer, seq)
            np.testing.assert_array_equal(k, spec.keys(layer, seq))
            np.testing.assert_array_equal(v, spec.values(layer, seq))
            assert k.dtype == dev.shape.public_dtype
            if model is not None and k.shape[1]:
                k_model, v_model = model.kv(seq, layer, dev.first_position(seq), dev.get_seq_length(seq) - 1)
                np.testing.assert_array_equal(k, k_model)
                np.testing.assert_array_equal(v, v_model)
    stats_d, stats_s = dev.stats(), spec.stats()
    assert stats_d.pop("backend") == "cuda" and stats_s.pop("backend") == "python"
    assert stats_d == stats_s


def _run(spec, dev, model, rng, steps):
    """Every step, every layer, through both caches: identical plans, bit-identical storage after each write,
    attention vs the spec and vs the oracle. Returns the steps' copy counts."""
    shape = dev.shape
    scale = float(kvref.default_scale(HEAD_DIM))
    copies = []
    for n_tokens, seq_ids in steps:
        step_s, step_d = spec.plan(n_tokens, seq_ids), dev.plan(n_tokens, seq_ids)
        for name in ("positions", "slots", "tables", "starts", "copies"):
            np.testing.assert_array_equal(getattr(step_d, name), getattr(step_s, name), err_msg=name)
        copies.append(step_d.copies.shape[0])
        for layer in range(LAYERS):
            dims = (len(seq_ids), n_tokens, shape.kv_heads, HEAD_DIM)
            k = rng.standard_normal(dims).astype(shape.public_dtype)
            v = rng.standard_normal(dims).astype(shape.public_dtype)
            q = rng.standard_normal((len(seq_ids), n_tokens, shape.q_heads, HEAD_DIM)).astype(np.float32)
            spec.write(step_s, layer, k, v)
            dev.write(step_d, layer, k, v)
            np.testing.assert_array_equal(dev.kv, spec.kv)  # copies and writes: bit-identical, every layer
            for i, seq in enumerate(seq_ids):
                model.append(seq, layer, step_d.positions[i], k[i], v[i])
            out_s = spec.attend(step_s, layer, q)
            out_d = dev.attend(step_d, layer, q)
            assert out_d.dtype == np.float32 and out_d.shape == q.shape
            np.testing.assert_allclose(out_d, out_s, **SPEC_TOL)
            _check_against_oracle(dev, step_d, layer, q, out_d, model, scale)
        spec.advance(step_s)
        dev.advance(step_d)
        _assert_same_cache(dev, spec, model)
    return copies


def test_cuda_pooled_backend_is_numba_cuda():
    available, reason = kvref.backends()["cuda"]
    assert available, reason
    _, dev = _pair()
    assert isinstance(dev._kv, type(cuda.device_array(1)))
    assert dev._ops is cuda_pooled.OPS
    assert {name.split("[")[0] for name in cuda_pooled.KERNELS} == {"pooled.copy", "pooled.write", "pooled.attend"}
    assert all(len(sigs) == 2 for _, sigs in cuda_pooled.KERNELS.values())  # fp32 and uint16 storage
    assert dev.nbytes == dev.num_blocks * dev.block_bytes


@pytest.mark.parametrize("dtype,q_heads,kv_heads", [("float32", 4, 2), ("float16", 4, 2), ("float16", 2, 2)],
                         ids=["fp32-gqa2", "fp16-gqa2", "fp16-mha"])
def test_prefill_and_decode_match_spec_and_oracle(rng, dtype, q_heads, kv_heads):
    """Chunked prefill across block edges (also on top of a partly filled block), then decode, two sequences of
    different lengths in both orders."""
    spec, dev = _pair(dtype, q_heads, kv_heads)
    model = _Model()
    copies = _run(spec, dev, model, rng, [(5, [0]), (3, [0, 1]), (2, [1, 0]), (1, [0, 1])])
    assert copies == [0, 0, 0, 0]
    assert dev.lengths.tolist() == [11, 6]
    assert len(dev.block_table(0)) == 3


def test_blocks_longer_than_a_tile(rng):
    """A block of 40 rows (more than a 32-row tile) is folded in turns of at most a tile, from mid-block offsets."""
    spec, dev = _pair("float32", num_blocks=3, block_size=40, batch=1)
    model = _Model()
    _run(spec, dev, model, rng, [(35, [0]), (20, [0]), (1, [0])])
    assert dev.lengths.tolist()[:1] == [56]


@pytest.mark.parametrize("dtype,strided", [("float32", False), ("float16", True)], ids=["fp32", "fp16-strided"])
def test_fork_copy_on_write(rng, monkeypatch, dtype, strided):
    """Two forks share a partly filled block (ref count 3); the next decode copies it three times on the device (every
    sharer that appends copies a block shared before the step; the original returns to the pool), the full block
    stays shared. ``strided``: 8 threads per copy/write block, so each
    thread strides over several elements, and attend grids of three key chunks per item."""
    if strided:
        monkeypatch.setattr(cuda_pooled, "MAX_BLOCK_THREADS", 8)  # copy: 64 elements / 8; write: 16 / 8
        monkeypatch.setattr(kvref.cuda, "choose_chunks", lambda n_keys, items, sms=None: 3)  # 3 key chunks
    spec, dev = _pair(dtype, batch=1, max_seqs=3)
    model = _Model()
    _run(spec, dev, model, rng, [(6, [0])])  # blocks [0 full, 1 with 2 rows]
    for cache in (spec, dev):
        assert cache.fork(0) == 1 and cache.fork(1) == 2
    model.fork(0, 1)
    model.fork(1, 2)
    shared = dev.block_table(0)
    assert dev.pool.ref_counts[shared].tolist() == [3, 3]
    copies = _run(spec, dev, model, rng, [(1, [0, 1, 2]), (2, [2, 0])])
    assert copies == [3, 0]
    assert dev.stats()["cow_copies"] == 3
    tables = [dev.block_table(s).tolist() for s in range(3)]
    assert tables[0][0] == tables[1][0] == tables[2][0] == shared[0]  # the full block is still shared
    assert len({t[1] for t in tables}) == 3  # the partly filled one is private to each sequence now
    assert dev.pool.ref_counts[shared[0]] == 3


def test_copy_blocks_launches_nothing_without_copies(monkeypatch):
    """A step with no copy-on-write launches no copy kernel (a grid of 0 blocks is invalid on a GPU)."""

    class NoLaunch:
        def __getitem__(self, config):
            raise AssertionError(f"copy kernel launched with {config}")

    monkeypatch.setattr(cuda_pooled, "_copy_kernel", NoLaunch())
    kv = cuda_pooled.OPS.zeros((1, 2, 2, 2, B, HEAD_DIM), np.float32)
    cuda_pooled.copy_blocks(kv, 0, np.zeros((0, 2), np.int64))
    assert not kv.copy_to_host().any()


def test_eviction_matches_spec_and_oracle(rng):
    """evict="oldest": pool exhaustion drops the oldest block of the sequence holding the most, max_tokens keeps a
    sliding window that starts inside a block (its evicted rows are never read), freed blocks are reused."""
    spec, dev = _pair("float16", num_blocks=5, max_tokens=7, evict="oldest")
    model = _Model()
    _run(spec, dev, model, rng, [(6, [0, 1]), (3, [0, 1]), (1, [1, 0]), (2, [0]), (1, [0, 1])])
    stats = dev.stats()
    assert stats["evicted_tokens"] == 10 and stats["reuses"] > 0
    assert dev.first_position(0) % B and dev.first_position(0) > B  # a window starting mid-block


def test_device_arrays_in_and_out(rng):
    """k/v/q may already live on the device (k/v as float16 device arrays), and a device ``out`` is filled in place;
    a host ``out`` receives the result."""
    spec, dev = _pair("float16", batch=1, max_seqs=2)
    model = _Model()
    _run(spec, dev, model, rng, [(3, [0])])
    for cache in (spec, dev):
        cache.fork(0)
    step_s, step_d = spec.plan(1), dev.plan(1)
    assert step_d.copies.shape[0] == 2  # both sharers append: both copy
    k = rng.standard_normal((2, 1, 2, HEAD_DIM)).astype(np.float16)
    v = rng.standard_normal((2, 1, 2, HEAD_DIM)).astype(np.float16)
    q = rng.standard_normal((2, 1, 4, HEAD_DIM)).astype(np.float32)
    for layer in range(LAYERS):
        spec.write(step_s, layer, k, v)
        dev.write(step_d, layer, cuda.to_device(k), cuda.to_device(v))
    np.testing.assert_array_equal(dev.kv, spec.kv)
    d_out = cuda.device_array(q.shape, np.float32)
    assert dev.attend(step_d, 1, cuda.to_device(q), out=d_out) is d_out
    np.testing.assert_allclose(d_out.copy_to_host(), spec.attend(step_s, 1, q), **SPEC_TOL)
    host_out = np.full(q.shape, np.nan, np.float32)
    assert dev.attend(step_d, 0, q, out=host_out) is host_out
    np.testing.assert_allclose(host_out, spec.attend(step_s, 0, q), **SPEC_TOL)
    spec.advance(step_s)
    dev.advance(step_d)
    _assert_same_cache(dev, spec)
