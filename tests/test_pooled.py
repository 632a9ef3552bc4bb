"""PooledCache (paged KV cache) on the host backends, against the list model ``oracle.PooledModel`` and float64
attention over K/V gathered straight out of the raw pool (``oracle.gather_pooled`` / ``oracle.gather_page_table``).

Every attention output is compared with the float64 oracle run on the K/V that a plain NumPy gather reads through
the step's block tables, and that gather must equal the model's token rows bit for bit (so the oracle also sees
exactly the tokens that were appended, from position e' on). Block tables, ref counts, the free queue and the
counters in ``stats()`` are checked against the model's books, restated from kvref/pooled.py's docstring.

The second half checks every refusal: the specific kvref.errors class, the argument it names, and that
``cache.state()`` is bitwise what it was (``snapshots.run_bad_call``); then the FlashInfer / vLLM exports and
``validate_page_table``.
"""

import dataclasses
import math

import numpy as np
import pytest

import kvref
import kvref.cpu  # noqa: F401  (registers the compiled primitives)
from kvref.errors import (CacheOverflowError, DoubleFreeError, DTypeError, IndexOutOfRangeError, PageTableError,
                          PoolExhaustedError, ShapeError, StaleStepError, UnknownSequenceError)

import oracle
from snapshots import assert_state_equal, run_bad_call

ATOL = 1e-5  # float32 compute against the float64 oracle (as for the flat cache)

#: (q_heads, kv_heads)
HEADS = {"mha": (4, 4), "gqa": (4, 2)}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def make_cache(backend="cpu", layers=2, q_heads=4, kv_heads=2, head_dim=8, dtype="float32", num_blocks=16,
               block_size=4, batch=1, **kwargs):
    shape = kvref.CacheShape(layers=layers, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    return kvref.PooledCache(shape, num_blocks=num_blocks, block_size=block_size, batch=batch, backend=backend,
                             **kwargs)


def ceil_div(a, b):
    return -(-a // b)


class Run:
    """A cache, its list model and a seeded generator. ``step`` runs plan -> write/attend per layer -> advance and
    checks every output against the oracle; ``check`` compares everything the cache reports with the model."""

    def __init__(self, backend="cpu", seed=0, **kwargs):
        self.cache = make_cache(backend, **kwargs)
        c = self.cache
        self.model = oracle.PooledModel(c.shape.layers, c.num_blocks, c.block_size, batch=len(c.live_sequences()),
                                        max_seqs=c.max_seqs, max_tokens=c.max_tokens, evict=c.evict)
        self.rng = np.random.default_rng(seed)
        self.scale = float(np.float32(1 / math.sqrt(c.shape.head_dim)))

    def kv(self, n_seq, num_tokens):
        s = self.cache.shape
        return self.rng.standard_normal((s.layers, n_seq, num_tokens, s.kv_heads, s.head_dim)).astype(s.public_dtype)

    def step(self, num_tokens, ids=None, append=False):
        """One step of num_tokens for ``ids`` (default: every live sequence); returns the Step."""
        c, m = self.cache, self.model
        ids = m.live() if ids is None else list(ids)
        k, v = self.kv(len(ids), num_tokens), self.kv(len(ids), num_tokens)
        if append:
            step = c.append(k, v, seq_ids=ids)
            m.step(ids, k, v)
            self.check()
            return step
        step = c.plan(num_tokens, ids)
        info = m.step(ids, k, v)  # the model commits now; the cache at advance
        assert step.positions.tolist() == [info["positions"][s] for s in ids]
        assert step.starts.tolist() == [info["first"][s] for s in ids]
        assert [tuple(c) for c in step.copies.tolist()] == info["copies"]
        s = c.shape
        for layer in range(s.layers):
            c.write(step, layer, k[layer], v[layer])
            q = self.rng.standard_normal((len(ids), num_tokens, s.q_heads, s.head_dim)).astype(np.float32)
            out = c.attend(step, layer, q)
            assert out.shape == q.shape and out.dtype == np.float32
            for i, seq in enumerate(ids):
                first, end = int(step.starts[i]), int(step.positions[i, -1]) + 1
                keys, values = oracle.gather_pooled(c.kv, layer, step.tables[i], first, end, c.block_size)
                assert np.array_equal(keys, m.keys(layer, seq)) and np.array_equal(values, m.values(layer, seq)), \
                    f"gathered K/V of seq {seq} layer {layer} differ from the tokens appended"
                expected = oracle.causal_chunk_attention(q[i], keys, values, step.positions[i] - first, self.scale)
                np.testing.assert_allclose(out[i], expected, rtol=0, atol=ATOL,
                                           err_msg=f"layer {layer}, seq {seq}, positions {step.positions[i]}")
        c.advance(step)
        self.check()
        return step

    def check(self):
        oracle.assert_pooled_matches_model(self.cache, self.model)
        oracle.assert_pool_invariants(self.cache)

    # the same operation on the cache and on the model
    def fork(self, seq):
        child = self.cache.fork(seq)
        assert child == self.model.fork(seq)
        return child

    def release(self, seq):
        self.cache.release(seq)
        self.model.release(seq)

    def evict(self, seq, num_tokens):
        freed = self.cache.evict_tokens(seq, num_tokens)
        assert freed == self.model.evict(seq, num_tokens)
        return freed

    def crop(self, max_length, seq=None):
        self.cache.crop(max_length, seq=seq)
        self.model.crop(max_length, seq=seq)


# ---------------------------------------------------------------------------------------------------------------
# paged attention against the oracle on the gathered K/V
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("heads", list(HEADS), ids=list(HEADS))
def test_prefill_then_decode_matches_oracle(backend, dtype, heads):
    """Three sequences of different lengths, chunked prefills (T > 1, crossing several block boundaries, on subsets
    in non-sorted order) and decode steps (T = 1); the blocks of the sequences interleave in the pool."""
    q_heads, kv_heads = HEADS[heads]
    big = backend == "cpu"
    run = Run(backend, seed=1, q_heads=q_heads, kv_heads=kv_heads, head_dim=16 if big else 8, dtype=dtype,
              num_blocks=40 if big else 16, block_size=4 if big else 3, batch=3)
    run.step(5)  # prefill all three (causal within the chunk)
    run.step(23 if big else 7, [2])  # a long chunk: many blocks
    run.step(3, [2, 0])
    for _ in range(3):
        run.step(1)  # decode every sequence
    run.step(1, [1])
    if big:
        run.step(40, [0])
    lengths = run.cache.lengths.tolist()
    assert len(set(lengths)) == 3, lengths
    tables = [run.cache.block_table(s).tolist() for s in range(3)]
    assert sorted(sum(tables, [])) == sorted(set(sum(tables, []))), "no block is listed twice without a fork"


@pytest.mark.parametrize("block_size", [32, 48, 80])
def test_blocks_longer_than_a_tile(backend, block_size):
    """Blocks of a tile (32 rows) or more: attention folds a block in turns of at most a tile, from any offset (a
    block longer than a tile once overran the softmax scratch: memory corruption in compiled code). Chunks start
    mid-block, and with eviction the held window starts mid-block too."""
    for evict in (None, "oldest"):
        run = Run(backend, seed=block_size, head_dim=8, num_blocks=10, block_size=block_size, batch=2,
                  max_tokens=3 * block_size - 5 if evict else None, evict=evict)
        run.step(block_size + 7)
        run.step(2 * block_size - 9, [1])
        for _ in range(2):
            run.step(1)
        run.step(block_size, [0, 1])
        if evict:
            assert run.cache.first_position(1) % block_size != 0, "the window starts mid-block"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_paged_equals_flat_cache(backend, dtype, rng):
    """A PooledCache and a FlatCache fed the same tokens give the same attention outputs (float32 rounding only:
    the pooled cache reads the keys block by block, the flat one tile by tile) and the same stored rows."""
    shape = kvref.CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8, dtype=dtype)
    pooled = kvref.PooledCache(shape, num_blocks=24, block_size=3, batch=2, backend=backend)
    flat = kvref.FlatCache(shape, batch=2, max_tokens=40, backend=backend)
    for num_tokens, ids in ((4, [0, 1]), (7, [1]), (2, [1, 0]), (1, [0, 1]), (1, [0, 1]), (9, [0]), (1, [0, 1])):
        k = rng.standard_normal((2, len(ids), num_tokens, 2, 8)).astype(shape.public_dtype)
        v = rng.standard_normal((2, len(ids), num_tokens, 2, 8)).astype(shape.public_dtype)
        steps = [cache.plan(num_tokens, ids) for cache in (pooled, flat)]
        assert np.array_equal(steps[0].positions, steps[1].positions)
        for layer in range(2):
            q = rng.standard_normal((len(ids), num_tokens, 4, 8)).astype(np.float32)
            outs = []
            for cache, step in zip((pooled, flat), steps):
                cache.write(step, layer, k[layer], v[layer])
                outs.append(cache.attend(step, layer, q))
            np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=2e-6)
        for cache, step in zip((pooled, flat), steps):
            cache.advance(step)
    assert pooled.lengths[:2].tolist() == flat.lengths.tolist() == [18, 16]
    for layer in range(2):
        for s in range(2):
            assert np.array_equal(pooled.keys(layer, s), flat.keys(layer, s))
            assert np.array_equal(pooled.values(layer, s), flat.values(layer, s))


def test_python_and_cpu_agree():
    """The spec run as plain Python and its numba twin: the same blocks, the same bytes, outputs within rounding."""
    runs = {b: Run(b, seed=5, num_blocks=10, block_size=2, batch=2, max_seqs=3) for b in ("python", "cpu")}
    outs = {}
    for b, run in runs.items():
        run.step(3)
        run.fork(0)
        run.step(2, [2, 1])
        step = run.cache.plan(1, [0, 2])
        k = np.full((2, 1, 2, 8), 0.5, np.float32)
        q = np.linspace(-1, 1, 2 * 4 * 8, dtype=np.float32).reshape(2, 1, 4, 8)
        for layer in range(2):
            run.cache.write(step, layer, k, -k)
        outs[b] = run.cache.attend(step, 1, q)
    same = {"version": 0, "step_key": None}  # versions are drawn per cache
    assert_state_equal(runs["python"].cache.state() | same, runs["cpu"].cache.state() | same)
    np.testing.assert_allclose(outs["python"], outs["cpu"], rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------------------------------------------
# block boundaries: a block holds exactly B tokens
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [-1, 0, 1])
@pytest.mark.parametrize("append", [False, True], ids=["plan", "append"])
def test_lengths_around_a_block(backend, offset, append):
    B = 4
    length = B + offset
    run = Run(backend, num_blocks=4, block_size=B)
    run.step(length, append=append)
    st = run.cache.stats()
    blocks = ceil_div(length, B)
    assert st["blocks_used"] == len(run.cache.block_table(0)) == blocks
    assert st["allocated_slots"] == blocks * B
    assert st["internal_fragmentation"] == blocks * B - length
    assert run.cache.block_table(0).tolist() == list(range(blocks)), "fresh blocks come from the free-queue head"
    table = run.cache.page_table()
    assert table["kv_last_page_len"].tolist() == [length - (blocks - 1) * B]
    # one more token: a new block exactly when the length was a multiple of B
    run.step(1)
    assert run.cache.stats()["blocks_used"] == ceil_div(length + 1, B)


def test_fork_at_block_boundary_shares_without_copy(backend):
    B = 2
    run = Run(backend, num_blocks=8, block_size=B, batch=1, max_seqs=2)
    run.step(2 * B)
    child = run.fork(0)
    assert child == 1
    assert run.cache.block_table(child).tolist() == run.cache.block_table(0).tolist() == [0, 1]
    assert run.cache.pool.ref_counts[:2].tolist() == [2, 2]
    run.check()
    step = run.step(1, [0, child])
    assert step.copies.shape == (0, 2), "appending after a full shared block copies nothing"
    assert run.cache.stats()["cow_copies"] == 0
    assert run.cache.block_table(0).tolist() == [0, 1, 2] and run.cache.block_table(child).tolist() == [0, 1, 3]
    assert run.cache.pool.ref_counts[:4].tolist() == [2, 2, 1, 1]
    run.step(3, [child])
    run.step(2, [0])


@pytest.mark.parametrize("order", ["parent_first", "child_first"])
def test_fork_mid_block_every_appending_sharer_copies(backend, order):
    """Two sharers of a partially filled block append in the same step: each copies the block (it was shared before
    the step), so neither writes into a row the other may hold; the original loses both references and is freed."""
    B = 4
    run = Run(backend, num_blocks=8, block_size=B, batch=1, max_seqs=2)
    run.step(B + 2)
    child = run.fork(0)
    shared = run.cache.block_table(0)[-1]
    assert run.cache.pool.ref_counts[shared] == 2
    ids = [0, child] if order == "parent_first" else [child, 0]
    fresh = list(run.cache.pool.free_queue)[:2]
    step = run.step(1, ids)
    assert step.copies.tolist() == [[shared, fresh[0]], [shared, fresh[1]]]
    assert run.cache.block_table(ids[0])[-1] == fresh[0]
    assert run.cache.block_table(ids[1])[-1] == fresh[1]
    assert run.cache.pool.ref_counts[[shared] + fresh].tolist() == [0, 1, 1]
    assert run.cache.pool.free_queue[-1] == shared, "the original returns to the free queue's tail"
    assert run.cache.stats()["cow_copies"] == 2
    # the full first block stays shared; later appends into unshared blocks copy nothing
    assert run.cache.pool.ref_counts[run.cache.block_table(0)[0]] == 2
    run.step(3, [child])
    run.step(1, [0])
    assert run.cache.stats()["cow_copies"] == 2


def test_copy_on_write_by_one_sharer_then_the_other_writes_in_place(backend):
    B = 3
    run = Run(backend, num_blocks=8, block_size=B, batch=1, max_seqs=3)
    run.step(4)
    run.fork(0)
    run.fork(0)  # three sharers: ref 3
    shared = run.cache.block_table(0)[-1]
    assert run.cache.pool.ref_counts[shared] == 3
    run.step(1, [1])  # copies: ref 2 left
    run.step(4, [0])  # still shared by 0 and 2: copies again, then crosses into a new block
    assert run.cache.pool.ref_counts[shared] == 1
    step = run.step(2, [2])  # the last sharer: in place
    assert step.copies.size == 0
    assert run.cache.block_table(2)[1] == shared
    assert run.cache.stats()["cow_copies"] == 2


def test_fork_of_a_chunk_crossing_boundaries_after_the_copy(backend):
    run = Run(backend, num_blocks=10, block_size=2, batch=1, max_seqs=2)
    run.step(3)
    run.fork(0)
    run.step(5, [1, 0])  # a copy for each sharer, then 1 and 0 each cross into new blocks
    assert run.cache.stats()["cow_copies"] == 2


# ---------------------------------------------------------------------------------------------------------------
# ref counts, release order, counters
# ---------------------------------------------------------------------------------------------------------------
def test_fork_increments_release_decrements_and_frees_last_block_first():
    run = Run("cpu", num_blocks=5, block_size=2, batch=1, max_seqs=3)
    run.step(5)  # blocks 0, 1, 2
    assert run.cache.block_table(0).tolist() == [0, 1, 2]
    assert list(run.cache.pool.free_queue) == [3, 4]
    a = run.fork(0)
    b = run.fork(a)
    assert run.cache.pool.ref_counts.tolist() == [3, 3, 3, 0, 0]
    run.release(0)
    assert run.cache.pool.ref_counts.tolist() == [2, 2, 2, 0, 0]
    run.release(b)
    assert run.cache.pool.ref_counts.tolist() == [1, 1, 1, 0, 0]
    assert list(run.cache.pool.free_queue) == [3, 4], "nothing freed while a table lists the blocks"
    run.check()
    run.release(a)
    assert list(run.cache.pool.free_queue) == [3, 4, 2, 1, 0], "freed blocks join the tail, last block first"
    assert run.cache.live_sequences() == []
    run.check()
    # reuse: a new sequence takes the least recently freed blocks first
    seq = run.cache.add_sequence()
    assert seq == run.model.add() == 0
    run.step(8, [seq])
    assert run.cache.block_table(seq).tolist() == [3, 4, 2, 1]
    st = run.cache.stats()
    assert st["allocations"] == 7 and st["reuses"] == 2 and st["hits"] == 2  # blocks 2 and 1 were used before
    assert st["high_water_blocks"] == 4


def test_release_after_copy_on_write_returns_every_block():
    run = Run("cpu", num_blocks=6, block_size=2, batch=1, max_seqs=2)
    run.step(3)
    run.fork(0)
    run.step(2, [1])
    for s in (1, 0):
        run.release(s)
        run.check()
    assert run.cache.pool.num_free == 6 and run.cache.pool.ref_counts.sum() == 0


def test_released_row_is_reused_by_add_and_fork():
    run = Run("cpu", num_blocks=6, block_size=2, batch=2, max_seqs=3)
    run.step(2)
    run.release(0)
    assert run.fork(1) == 0
    assert run.cache.add_sequence() == run.model.add() == 2
    run.step(1)
    assert run.cache.lengths.tolist() == [3, 3, 1]


def test_block_pool_alone():
    pool = kvref.BlockPool(3)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(PoolExhaustedError) as info:
        pool.allocate()
    assert info.value.argument == "num_blocks"
    pool.share(1)
    pool.free(1)
    assert pool.num_free == 0 and pool.ref_counts.tolist() == [1, 1, 1]
    pool.free(2), pool.free(0), pool.free(1)
    assert list(pool.free_queue) == [2, 0, 1]
    for call in (lambda: pool.free(2), lambda: pool.share(0)):
        with pytest.raises(DoubleFreeError) as info:
            call()
        assert info.value.argument == "block"
    with pytest.raises(IndexOutOfRangeError):
        pool.free(3)
    assert pool.allocate() == 2 and pool.reuses == 1 and pool.hits == 1
    copy = pool.copy()
    copy.allocate()
    assert pool.num_free == 2 and copy.num_free == 1, "a copy is independent"


# ---------------------------------------------------------------------------------------------------------------
# eviction: exactly the tokens asked, only fully evicted blocks freed
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("count", range(0, 8))
def test_evict_tokens_drops_exactly_n(count):
    B = 3
    run = Run("cpu", num_blocks=6, block_size=B, batch=2)
    run.step(7, [0])
    run.step(2, [1])
    used = run.cache.stats()["blocks_used"]
    assert run.evict(0, count) == count // B, "only blocks whose every token went are freed"
    assert run.cache.first_position(0) == count
    assert run.cache.keys(0, 0).shape[1] == 7 - count
    assert run.cache.stats()["blocks_used"] == used - count // B
    assert run.cache.stats()["evicted_tokens"] == count
    run.check()
    run.step(2)  # attention from the first held position on (seq 0 holds no token when count == 7)
    run.cache.evict_tokens(1, 0)
    run.check()


def test_evict_in_steps_then_attend(backend):
    run = Run(backend, num_blocks=8, block_size=4, batch=1)
    run.step(9)
    for n in (1, 2, 2, 3):
        run.evict(0, n)
        run.check()
        run.step(1)
    assert run.cache.first_position(0) == 8 and run.cache.block_table(0).size == 2


def test_evicting_a_shared_block_frees_nothing():
    run = Run("cpu", num_blocks=6, block_size=2, batch=1, max_seqs=2)
    run.step(5)
    run.fork(0)
    assert run.evict(1, 4) == 0
    assert run.cache.pool.ref_counts[:3].tolist() == [1, 1, 2]
    run.check()
    assert run.evict(0, 3) == 1  # block 0 is now unlisted; block 1 still holds seq 0's position 3
    assert run.cache.pool.ref_counts[:3].tolist() == [0, 1, 2]
    run.check()
    run.step(2)


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_window_eviction_keeps_exactly_max_tokens(backend, block_size):
    """evict="oldest": a step that would take a sequence past max_tokens drops exactly L + T - max_tokens tokens."""
    M = 7
    run = Run(backend, seed=3, num_blocks=20, block_size=block_size, batch=2, max_tokens=M, evict="oldest")
    sizes = [(5, [0, 1]), (1, [0]), (3, [0, 1]), (7, [1]), (1, [0, 1]), (2, [0]), (6, [1, 0])]
    for num_tokens, ids in sizes:
        before = {s: (run.cache.get_seq_length(s), run.cache.first_position(s)) for s in ids}
        run.step(num_tokens, ids)
        for s, (length, first) in before.items():
            assert run.cache.first_position(s) == max(first, length + num_tokens - M)
            assert len(run.cache.held_positions(s)) == min(M, length + num_tokens - first)
    assert run.cache.stats()["evicted_tokens"] == sum(run.cache.first_position(s) for s in (0, 1)) > 0


def test_window_eviction_with_max_tokens_not_a_multiple_of_block_size():
    """The window need not start on a block boundary: the table then spans ceil(M / B) + 1 blocks."""
    run = Run("cpu", num_blocks=6, block_size=4, batch=1, max_tokens=6, evict="oldest")
    run.step(6)
    run.step(3)  # e = 3, L = 9: blocks 0 (rows 3), 1, 2
    assert run.cache.block_table(0).size == 3
    run.step(1)  # e = 4: block 0 freed
    assert run.cache.first_position(0) == 4 and run.cache.block_table(0).size == 2


def test_pool_exhaustion_reclaims_oldest_full_unshared_block(backend):
    """evict="oldest" when the pool runs dry: the sequence listing the most blocks whose oldest block is full and
    unshared (ties: the lowest id) drops exactly that block's tokens; attention then starts at the new e."""
    B = 2
    run = Run(backend, num_blocks=5, block_size=B, batch=3, max_seqs=4, evict="oldest")
    run.step(4, [0])  # blocks 0, 1
    run.step(4, [1])  # blocks 2, 3
    run.step(1, [2])  # block 4: the pool is dry
    run.step(2, [2])  # seq 2 needs a block: seqs 0 and 1 tie with 2 blocks, 0 drops its block 0
    assert run.cache.first_position(0) == 2 and run.cache.block_table(0).tolist() == [1]
    assert run.cache.block_table(2).tolist() == [4, 0]
    assert run.cache.stats()["evicted_tokens"] == 2
    assert run.fork(1) == 3  # seq 1's blocks are now shared: neither 1 nor 3 can be a victim
    run.step(2, [2])  # qualifying: seq 0 (1 block) and seq 2 (2 blocks, oldest full): seq 2 drops its own block
    assert run.cache.first_position(2) == 2 and run.cache.block_table(2).tolist() == [0, 4]
    run.step(1, [0])  # seq 0 needs a block: seq 2 (2 blocks, oldest full and unshared) drops its oldest again
    assert run.cache.first_position(2) == 4 and run.cache.block_table(2).tolist() == [4]
    assert run.cache.first_position(0) == 2 and run.cache.block_table(0).tolist() == [1, 0]
    assert [run.cache.first_position(s) for s in (1, 3)] == [0, 0], "shared blocks are never reclaimed"
    assert run.cache.stats()["evicted_tokens"] == 6


def test_reclaim_victim_lists_the_most_blocks():
    run = Run("cpu", num_blocks=5, block_size=2, batch=2, evict="oldest")
    run.step(2)  # seq 0: block 0, seq 1: block 1
    step = run.cache.plan(3, [1, 0])  # seq 1 takes blocks 2, 3 (lists 3); seq 0 takes 4, then the pool is dry
    assert step.starts.tolist() == [2, 0], "seq 1, listing 3 blocks against seq 0's 2, drops its oldest"


def test_reclaim_refused_when_every_candidate_is_shared_or_partial(backend):
    run = Run(backend, num_blocks=3, block_size=2, batch=1, max_seqs=2, evict="oldest")
    run.step(5)  # blocks 0, 1, 2 (2 partial): the pool is dry
    run.fork(0)  # every block shared
    with pytest.raises(oracle.PoolRefused):
        run.model.step([0], *(run.kv(1, 2),) * 2)
    run_bad_call(run.cache, lambda c: lambda: c.plan(2, [0]), PoolExhaustedError, "num_tokens")
    run.check()


# ---------------------------------------------------------------------------------------------------------------
# exhaustion and overflow: refused, nothing changed
# ---------------------------------------------------------------------------------------------------------------
def test_pool_exhaustion_raises_and_changes_nothing(backend):
    run = Run(backend, num_blocks=3, block_size=2, batch=2)
    run.step(3, [0])  # blocks 0, 1
    run.step(2, [1])  # block 2: dry
    exc = run_bad_call(run.cache, lambda c: lambda: c.plan(1, [1]), PoolExhaustedError, "num_tokens")
    assert isinstance(exc, kvref.KVCacheError)
    run_bad_call(run.cache, lambda c: lambda: c.plan(1), PoolExhaustedError, "num_tokens")
    k = run.kv(1, 2)
    run_bad_call(run.cache, lambda c: lambda: c.append(k, k, seq_ids=[0]), PoolExhaustedError, "num_tokens")
    run.step(1, [0])  # seq 0's partial block still has a slot
    run.check()


def test_exhaustion_when_the_copy_on_write_block_runs_out(backend):
    """A fork shares a partial block; the pool is full; appending into it needs a copy: refused, unchanged. Two
    sharers appending in the same step need a copy each (the original goes back to the pool afterwards)."""
    run = Run(backend, num_blocks=2, block_size=2, batch=1, max_seqs=2)
    run.step(3)  # blocks 0, 1 (1 partial)
    run.fork(0)
    for ids in ([1], [0], [0, 1]):
        run_bad_call(run.cache, lambda c, ids=ids: lambda: c.plan(1, ids), PoolExhaustedError, "num_tokens")
    run.check()
    run2 = Run(backend, num_blocks=3, block_size=2, batch=1, max_seqs=2)
    run2.step(3)
    run2.fork(0)
    run_bad_call(run2.cache, lambda c: lambda: c.plan(1, [1, 0]), PoolExhaustedError, "num_tokens")
    run3 = Run(backend, num_blocks=4, block_size=2, batch=1, max_seqs=2)
    run3.step(3)
    run3.fork(0)
    step = run3.step(1, [1, 0])
    assert step.copies.tolist() == [[1, 2], [1, 3]] and list(run3.cache.pool.free_queue) == [1]


def test_overflow_past_max_tokens_without_eviction(backend):
    run = Run(backend, num_blocks=8, block_size=2, batch=2, max_tokens=5)
    run.step(4)
    run_bad_call(run.cache, lambda c: lambda: c.plan(2, [0]), CacheOverflowError, "num_tokens")
    k = run.kv(2, 2)
    run_bad_call(run.cache, lambda c: lambda: c.append(k, k), CacheOverflowError, "num_tokens")
    run.step(1, [1])
    run_bad_call(run.cache, lambda c: lambda: c.plan(1, [1]), CacheOverflowError, "num_tokens")
    assert run.cache.remaining_capacity(0) == 1 and run.cache.is_full(1)
    # even with eviction a step longer than max_tokens cannot fit
    ev = Run(backend, num_blocks=8, block_size=2, max_tokens=5, evict="oldest")
    run_bad_call(ev.cache, lambda c: lambda: c.plan(6), CacheOverflowError, "num_tokens")


def test_remaining_capacity_agrees_with_plan():
    """remaining_capacity(s) tokens plan; one more raises (no eviction), including a shared partial last block."""
    run = Run("cpu", num_blocks=4, block_size=4, batch=1, max_seqs=2, max_tokens=14)
    run.step(5)
    cases = []
    for fork in (False, True):
        if fork:
            run.fork(0)
        room = run.cache.remaining_capacity(0)
        cases.append(room)
        run.cache.plan(room, [0])
        with pytest.raises((PoolExhaustedError, CacheOverflowError)):
            run.cache.plan(room + 1, [0])
        assert not run.cache.is_full(0)
    # max_tokens - L = 9 < 2 free blocks + 3 slots; shared, the copy takes a free block: 3 + 4 slots
    assert cases == [9, 7]
    assert run.cache.remaining_capacity(1) == 7
    run.step(7, [1])
    # the pool is full: seq 0's last block (no longer shared) still has 3 slots, seq 1 none
    assert run.cache.pool.num_free == 0
    assert run.cache.remaining_capacity(0) == 3 and run.cache.remaining_capacity(1) == 0
    assert not run.cache.is_full(0) and run.cache.is_full(1)
    run.step(3, [0])
    assert run.cache.is_full(0)


def test_remaining_capacity_after_evict_tokens_without_eviction_policy():
    run = Run("cpu", num_blocks=8, block_size=2, max_tokens=4)
    run.step(4)
    run.evict(0, 2)
    room = run.cache.remaining_capacity(0)
    assert run.cache.is_full(0) == (room == 0)
    if room:
        run.cache.plan(room, [0])  # "tokens sequence seq can take in one step before it would raise"
    with pytest.raises((PoolExhaustedError, CacheOverflowError)):
        run.cache.plan(room + 1, [0])


# ---------------------------------------------------------------------------------------------------------------
# abandoned steps
# ---------------------------------------------------------------------------------------------------------------
def test_abandoned_step_changes_nothing_readable(backend):
    """A step written (copy-on-write included) and attended but not advanced: every live sequence still reads its
    tokens and the books are as they were; no other step or change is accepted until it is advanced."""
    run = Run(backend, num_blocks=8, block_size=4, batch=1, max_seqs=2)
    run.step(6)
    run.fork(0)
    before = run.cache.state()
    step = run.cache.plan(3, [1, 0])
    assert step.copies.shape[0] == 2
    junk = np.full((2, 2, 3, 2, 8), 0.5, np.float32)
    for layer in range(2):
        run.cache.write(step, layer, junk[layer], junk[layer])
        run.cache.attend(step, layer, np.ones((2, 3, 4, 8), np.float32))
    after = run.cache.state()
    for key in ("lengths", "starts", "tables", "status", "pool", "counters", "version"):
        assert_state_equal({key: before[key]}, {key: after[key]})
    run.check()
    for refused in (lambda: run.cache.plan(2, [0, 1]), lambda: run.cache.evict_tokens(0, 1), lambda: run.cache.release(1),
                    lambda: run.cache.crop(1)):
        run_bad_call(run.cache, lambda c, refused=refused: refused, StaleStepError, "step")
    run.cache.advance(step)
    run.model.step([1, 0], junk, junk)
    run.check()
    run.step(2, [0, 1])


def test_abandoned_step_after_crop_keeps_the_longer_sharer_intact():
    run = Run("cpu", num_blocks=8, block_size=4, batch=1, max_seqs=2)
    run.step(3)
    run.fork(0)
    run.crop(2, seq=1)  # both still list block 0: seq 0 holds 3 rows, seq 1 two
    run.check()
    step = run.cache.plan(1, [0, 1])  # block 0 was shared before the step: both sharers copy, neither writes into it
    assert step.copies[:, 0].tolist() == [0, 0]
    junk = np.full((2, 1, 2, 8), 50, np.float32)
    run.cache.write(step, 0, junk, junk)  # not advanced: seq 0's rows in block 0 must be intact
    run.check()


# ---------------------------------------------------------------------------------------------------------------
# refusals: the specific error, naming the argument, and state() bitwise unchanged (with a layer written)
# ---------------------------------------------------------------------------------------------------------------
def busy(backend):
    """Seqs 0 (e = 3), 1 and its fork 2 (a shared partial block), row 3 released, row 4 never used; an old step;
    a step for [0, 2] planned (seq 2 copies on write) with layer 0 written."""
    run = Run(backend, seed=7, num_blocks=10, block_size=4, batch=2, max_seqs=5, max_tokens=12)
    run.step(6, [0])
    run.step(3, [1])
    assert run.fork(1) == 2
    assert run.cache.add_sequence() == run.model.add() == 3
    run.release(3)
    run.evict(0, 3)
    run.old = run.step(1, [0])
    run.pending_k, run.pending_v = run.kv(2, 1), run.kv(2, 1)
    run.pending = run.cache.plan(1, [0, 2])
    assert run.pending.copies.shape[0] == 1
    run.cache.write(run.pending, 0, run.pending_k[0], run.pending_v[0])
    return run


def arr(cache, n_seq=2, num_tokens=1, heads=None, dtype=None):
    s = cache.shape
    return np.zeros((n_seq, num_tokens, heads or s.kv_heads, s.head_dim), dtype or s.public_dtype)


def query(cache, n_seq=2, num_tokens=1, heads=None, dtype=np.float32):
    s = cache.shape
    return np.zeros((n_seq, num_tokens, heads or s.q_heads, s.head_dim), dtype)


def edited(step, name, delta=1):
    array = getattr(step, name).copy()
    array.reshape(-1)[-1] += delta
    return dataclasses.replace(step, **{name: array})


BAD_CALLS = {
    "k wrong shape": (ShapeError, "k_new", lambda r, c: lambda: c.write(r.pending, 1, arr(c, num_tokens=2), arr(c))),
    "v wrong heads": (ShapeError, "v_new", lambda r, c: lambda: c.write(r.pending, 1, arr(c), arr(c, heads=1))),
    "k wrong dtype": (DTypeError, "k_new", lambda r, c: lambda: c.write(r.pending, 1, arr(c, dtype=np.float64),
                                                                         arr(c))),
    "v float16": (DTypeError, "v_new", lambda r, c: lambda: c.write(r.pending, 1, arr(c), arr(c, dtype=np.float16))),
    "k not an array": (DTypeError, "k_new", lambda r, c: lambda: c.write(r.pending, 1, arr(c).tolist(), arr(c))),
    "write layer too big": (IndexOutOfRangeError, "layer", lambda r, c: lambda: c.write(r.pending, 2, arr(c), arr(c))),
    "write layer negative": (IndexOutOfRangeError, "layer",
                             lambda r, c: lambda: c.write(r.pending, -1, arr(c), arr(c))),
    "q wrong shape": (ShapeError, "q", lambda r, c: lambda: c.attend(r.pending, 0, query(c, heads=2))),
    "q wrong dtype": (DTypeError, "q", lambda r, c: lambda: c.attend(r.pending, 0, query(c, dtype=np.float64))),
    "out wrong shape": (ShapeError, "out", lambda r, c: lambda: c.attend(r.pending, 0, query(c),
                                                                          out=query(c, num_tokens=2))),
    "attend layer": (IndexOutOfRangeError, "layer", lambda r, c: lambda: c.attend(r.pending, 2, query(c))),
    "attend before write": (StaleStepError, "step", lambda r, c: lambda: c.attend(r.pending, 1, query(c))),
    "advance before all layers": (StaleStepError, "step", lambda r, c: lambda: c.advance(r.pending)),
    "write a stale step": (StaleStepError, "step", lambda r, c: lambda: c.write(r.old, 0, arr(c, 1), arr(c, 1))),
    "advance a stale step": (StaleStepError, "step", lambda r, c: lambda: c.advance(r.old)),
    "attend a stale step": (StaleStepError, "step", lambda r, c: lambda: c.attend(r.old, 0, query(c, 1))),
    "edited slots": (StaleStepError, "step", lambda r, c: lambda: c.write(edited(r.pending, "slots"), 1, arr(c),
                                                                           arr(c))),
    "edited copies": (StaleStepError, "step", lambda r, c: lambda: c.advance(edited(r.pending, "copies"))),
    "edited tables": (StaleStepError, "step", lambda r, c: lambda: c.slot_mapping(edited(r.pending, "tables"))),
    "not a step": (StaleStepError, "step", lambda r, c: lambda: c.slot_mapping("step")),
    "plan released seq": (UnknownSequenceError, "seq_ids", lambda r, c: lambda: c.plan(1, [0, 3])),
    "plan never-added seq": (UnknownSequenceError, "seq_ids", lambda r, c: lambda: c.plan(1, [4])),
    "plan seq out of range": (IndexOutOfRangeError, "seq_ids", lambda r, c: lambda: c.plan(1, [5])),
    "plan repeated seq": (ShapeError, "seq_ids", lambda r, c: lambda: c.plan(1, [1, 1])),
    "plan zero tokens": (ShapeError, "num_tokens", lambda r, c: lambda: c.plan(0)),
    "plan past max_tokens": (CacheOverflowError, "num_tokens", lambda r, c: lambda: c.plan(10, [1])),
    "append released seq": (UnknownSequenceError, "seq_ids",
                            lambda r, c: lambda: c.append(arr(c)[None].repeat(2, 0), arr(c)[None].repeat(2, 0),
                                                          seq_ids=[3, 0])),
    "append wrong shape": (ShapeError, "k_new", lambda r, c: lambda: c.append(arr(c), arr(c), seq_ids=[0, 1])),
    "fork released": (UnknownSequenceError, "seq", lambda r, c: lambda: c.fork(3)),
    "fork never added": (UnknownSequenceError, "seq", lambda r, c: lambda: c.fork(4)),
    "fork out of range": (IndexOutOfRangeError, "seq", lambda r, c: lambda: c.fork(5)),
    "release twice": (DoubleFreeError, "seq", lambda r, c: lambda: c.release(3)),
    "release never added": (UnknownSequenceError, "seq", lambda r, c: lambda: c.release(4)),
    "release out of range": (IndexOutOfRangeError, "seq", lambda r, c: lambda: c.release(-1)),
    "keys released": (UnknownSequenceError, "seq", lambda r, c: lambda: c.keys(0, 3)),
    "values never added": (UnknownSequenceError, "seq", lambda r, c: lambda: c.values(1, 4)),
    "keys layer": (IndexOutOfRangeError, "layer", lambda r, c: lambda: c.keys(2, 0)),
    "block_table released": (UnknownSequenceError, "seq", lambda r, c: lambda: c.block_table(3)),
    "pool free of a free block": (DoubleFreeError, "block", lambda r, c: lambda: c.pool.free(c.pool.free_queue[-1])),
    "pool share of a free block": (DoubleFreeError, "block", lambda r, c: lambda: c.pool.share(c.pool.free_queue[0])),
    "pool free out of range": (IndexOutOfRangeError, "block", lambda r, c: lambda: c.pool.free(10)),
    "evict negative": (IndexOutOfRangeError, "num_tokens", lambda r, c: lambda: c.evict_tokens(1, -1)),
    "evict more than held": (IndexOutOfRangeError, "num_tokens", lambda r, c: lambda: c.evict_tokens(0, 5)),
    "evict a bool": (IndexOutOfRangeError, "num_tokens", lambda r, c: lambda: c.evict_tokens(1, True)),
    "evict a float": (IndexOutOfRangeError, "num_tokens", lambda r, c: lambda: c.evict_tokens(1, 1.0)),
    "evict released": (UnknownSequenceError, "seq", lambda r, c: lambda: c.evict_tokens(3, 0)),
    "prewarm negative": (IndexOutOfRangeError, "num_blocks", lambda r, c: lambda: c.prewarm(-1)),
    "prewarm more than free": (IndexOutOfRangeError, "num_blocks",
                               lambda r, c: lambda: c.prewarm(c.pool.num_free + 1)),
    "prewarm a float": (IndexOutOfRangeError, "num_blocks", lambda r, c: lambda: c.prewarm(2.0)),
    "prewarm a bool": (IndexOutOfRangeError, "num_blocks", lambda r, c: lambda: c.prewarm(True)),
    "crop below the first held position": (IndexOutOfRangeError, "max_length", lambda r, c: lambda: c.crop(2, seq=0)),
    "crop negative below it": (IndexOutOfRangeError, "max_length", lambda r, c: lambda: c.crop(-5, seq=0)),
    "crop all, one refuses": (IndexOutOfRangeError, "max_length", lambda r, c: lambda: c.crop(1)),
    "crop not an int": (ShapeError, "max_length", lambda r, c: lambda: c.crop(2.0, seq=1)),
    "crop released": (UnknownSequenceError, "seq", lambda r, c: lambda: c.crop(0, seq=3)),
    "reset released": (UnknownSequenceError, "seq", lambda r, c: lambda: c.reset(3)),
    "page table of a released seq": (UnknownSequenceError, "seq_ids", lambda r, c: lambda: c.page_table([3])),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_call_changes_nothing(name):
    error, argument, make = BAD_CALLS[name]
    run = busy("cpu")
    run_bad_call(run.cache, lambda c: make(run, c), error, argument)
    # the written layer 0 survives: finishing the step works and the model agrees
    run.cache.write(run.pending, 1, run.pending_k[1], run.pending_v[1])
    run.cache.advance(run.pending)
    run.model.step([0, 2], run.pending_k, run.pending_v)
    run.check()


def test_bad_calls_on_the_python_backend():
    """A few of the refusals again on the spec backend (the checks are shared host code)."""
    for name in ("k wrong shape", "attend before write", "release twice", "evict more than held",
                 "crop below the first held position", "write a stale step"):
        error, argument, make = BAD_CALLS[name]
        run = busy("python")
        run_bad_call(run.cache, lambda c: make(run, c), error, argument)


def test_rows_full_refuse_add_and_fork():
    run = Run("cpu", num_blocks=4, block_size=2, batch=2, max_seqs=2)
    run.step(1)
    run_bad_call(run.cache, lambda c: c.add_sequence, CacheOverflowError, "max_seqs")
    run_bad_call(run.cache, lambda c: lambda: c.fork(0), CacheOverflowError, "max_seqs")
    for call in (run.model.add, lambda: run.model.fork(0)):
        with pytest.raises(oracle.PoolRefused):
            call()
    run.release(1)
    assert run.fork(0) == 1
    run.check()


@pytest.mark.parametrize("change", ["fork", "release", "add_sequence", "evict_tokens", "prewarm", "crop", "reset",
                                    "advance"])
def test_steps_planned_before_a_change_are_stale(change):
    run = Run("cpu", num_blocks=8, block_size=2, batch=2, max_seqs=3)
    run.step(3)
    step = run.cache.plan(1, [0])
    other = run.cache.plan(1, [1])
    changes = {"fork": lambda c: c.fork(1), "release": lambda c: c.release(1), "add_sequence": lambda c:
               c.add_sequence(), "evict_tokens": lambda c: c.evict_tokens(1, 1), "prewarm": lambda c: c.prewarm(1),
               "crop": lambda c: c.crop(2, seq=1), "reset": lambda c: c.reset(1),
               "advance": lambda c: [c.write(other, layer, arr(c, 1), arr(c, 1)) for layer in range(2)]
               + [c.advance(other)]}
    changes[change](run.cache)
    run_bad_call(run.cache, lambda c: lambda: c.write(step, 0, arr(c, 1), arr(c, 1)), StaleStepError, "step")
    run_bad_call(run.cache, lambda c: lambda: c.slot_mapping(step), StaleStepError, "step")


@pytest.mark.parametrize("kwargs, error, argument", [
    ({"num_blocks": 0}, ShapeError, "num_blocks"),
    ({"block_size": 0}, ShapeError, "block_size"),
    ({"block_size": 2.0}, ShapeError, "block_size"),
    ({"batch": 3, "max_seqs": 2}, ShapeError, "max_seqs"),
    ({"max_tokens": 0}, ShapeError, "max_tokens"),
    ({"evict": "newest"}, ShapeError, "evict"),
])
def test_bad_constructor_arguments(kwargs, error, argument):
    with pytest.raises(error) as info:
        make_cache("cpu", **kwargs)
    assert type(info.value) is error and info.value.argument == argument


# ---------------------------------------------------------------------------------------------------------------
# export: FlashInfer page table, vLLM slot_mapping and block_tables
# ---------------------------------------------------------------------------------------------------------------
def exported(backend="cpu"):
    run = Run(backend, seed=9, num_blocks=16, block_size=4, batch=3, max_seqs=4)
    run.step(5)
    run.step(6, [1])
    run.step(2, [2, 0])
    assert run.fork(1) == 3  # shares seq 1's blocks, the last one partially filled
    return run


def test_page_table_reproduces_lengths_tables_and_tokens(backend):
    run = exported(backend)
    c, m = run.cache, run.model
    table = c.page_table()
    for name in ("kv_indptr", "kv_indices", "kv_last_page_len"):
        assert table[name].dtype == np.int32 and table[name].ndim == 1
    assert table["page_size"] == 4
    lengths = [m.length(s) for s in m.live()]
    got = kvref.validate_page_table(table["kv_indptr"], table["kv_indices"], table["kv_last_page_len"], 4,
                                    num_pages=16, seq_lens=lengths)
    assert got.tolist() == lengths
    pages = np.diff(table["kv_indptr"])
    assert (4 * (pages - 1) + table["kv_last_page_len"]).tolist() == lengths
    for i, s in enumerate(m.live()):
        own = table["kv_indices"][table["kv_indptr"][i]:table["kv_indptr"][i + 1]]
        assert own.tolist() == m.table(s) == c.block_table(s).tolist()
        for layer in range(2):
            keys, values = oracle.gather_page_table(c.kv, layer, table["kv_indptr"], table["kv_indices"],
                                                    table["kv_last_page_len"], i)
            assert np.array_equal(keys, m.keys(layer, s)) and np.array_equal(values, m.values(layer, s))
    sub = c.page_table([3, 0])
    assert sub["kv_indices"].tolist() == m.table(3) + m.table(0)
    assert sub["kv_last_page_len"].tolist() == [table["kv_last_page_len"][3], table["kv_last_page_len"][0]]
    shared = set(m.table(1)) & set(m.table(3))
    assert shared, "a forked sequence lists its parent's full blocks"


def test_page_table_after_eviction_starts_at_the_first_held_block():
    run = exported()
    c, m = run.cache, run.model
    run.evict(1, 5)  # e = 5: block 0 freed, block 1's row 0 evicted
    run.evict(0, 4)  # e = 4: on a block edge
    table = c.page_table([1, 0])
    lengths = kvref.validate_page_table(table["kv_indptr"], table["kv_indices"], table["kv_last_page_len"], 4)
    assert lengths.tolist() == [m.length(1) - 4, m.length(0) - 4]  # the pages hold positions 4 .. L - 1
    for i, s in enumerate((1, 0)):
        keys, _ = oracle.gather_page_table(c.kv, 0, table["kv_indptr"], table["kv_indices"],
                                           table["kv_last_page_len"], i)
        assert np.array_equal(keys[:, m.first(s) - 4:], m.keys(0, s))


def test_page_table_refuses_an_empty_sequence():
    run = exported()
    run.evict(2, 7)  # seq 2 holds no token (its last block stays, for the next one)
    with pytest.raises(ShapeError) as info:
        run.cache.page_table()
    assert info.value.argument == "seq_ids"
    run.cache.page_table([0, 1, 3])  # the others are fine
    run.release(2)
    assert run.cache.add_sequence() == run.model.add() == 2
    with pytest.raises(ShapeError):
        run.cache.page_table([2])


def test_slot_mapping_is_block_times_b_plus_offset(backend):
    run = exported(backend)
    c = run.cache
    B = c.block_size
    ids = [3, 1, 0]
    step = c.plan(6, ids)
    assert step.copies.shape[0] == 2, "seq 3 shares seq 1's partial block: both append, both copy"
    slots = c.slot_mapping(step)
    assert slots.dtype == np.int64 and slots.shape == (len(ids) * 6,)
    lengths = [c.get_seq_length(s) for s in ids]
    for layer in range(2):
        c.write(step, layer, arr(c, 3, 6), arr(c, 3, 6))
    c.advance(step)
    expected = []
    for s, length in zip(ids, lengths):
        table, first = c.block_table(s).tolist(), c.first_position(s)
        expected += [table[p // B - first // B] * B + p % B for p in range(length, length + 6)]
    assert slots.tolist() == expected
    assert len(set(expected)) == len(expected), "no two new tokens share a slot"


def test_block_tables_are_padded_with_minus_one():
    run = exported()
    tables, lens = run.cache.block_tables()
    assert tables.dtype == lens.dtype == np.int32
    assert lens.tolist() == [run.model.length(s) for s in run.model.live()]
    for row, s in zip(tables, run.model.live()):
        own = run.model.table(s)
        assert row[:len(own)].tolist() == own and np.all(row[len(own):] == -1)
    tables, lens = run.cache.block_tables([2])
    assert tables.shape[0] == 1 and lens.tolist() == [run.model.length(2)]


def test_flashinfer_documented_example():
    """FlashInfer's append_paged_kv_cache docstring: lengths [45, 8, 25, 22], page_size 16 -> pages [3, 1, 2, 2],
    kv_last_page_len [13, 8, 9, 6]. A real cache with exactly the 8 pages it needs reproduces it."""
    run = Run("cpu", layers=1, q_heads=2, kv_heads=1, head_dim=4, num_blocks=8, block_size=16, batch=4)
    for s, n in enumerate((45, 8, 25, 22)):
        run.step(n, [s])
    table = run.cache.page_table()
    assert np.diff(table["kv_indptr"]).tolist() == [3, 1, 2, 2]
    assert table["kv_indptr"].tolist() == [0, 3, 4, 6, 8]
    assert table["kv_last_page_len"].tolist() == [13, 8, 9, 6]
    assert sorted(table["kv_indices"].tolist()) == list(range(8))
    lengths = kvref.validate_page_table(table["kv_indptr"], table["kv_indices"], table["kv_last_page_len"], 16,
                                        num_pages=8, seq_lens=[45, 8, 25, 22])
    assert lengths.tolist() == [45, 8, 25, 22]
    assert run.cache.pool.num_free == 0


def good_table():
    return {"kv_indptr": np.array([0, 3, 4, 6], np.int32), "kv_indices": np.array([0, 1, 2, 5, 3, 4], np.int32),
            "kv_last_page_len": np.array([2, 4, 1], np.int32)}


def broken(**changes):
    table = good_table()
    table.update({k: np.array(v, table[k].dtype if isinstance(v, list) else v.dtype) for k, v in changes.items()})
    return table


BROKEN_TABLES = {
    "indptr int64": (broken(kv_indptr=np.array([0, 3, 4, 6], np.int64)), {}, "kv_indptr"),
    "indices int64": (broken(kv_indices=np.array([0, 1, 2, 5, 3, 4], np.int64)), {}, "kv_indices"),
    "last_page_len int64": (broken(kv_last_page_len=np.array([2, 4, 1], np.int64)), {}, "kv_last_page_len"),
    "indices 2-D": (broken(kv_indices=np.zeros((2, 3), np.int32)), {}, "kv_indices"),
    "indptr a list": ({**good_table(), "kv_indptr": [0, 3, 4, 6]}, {}, "kv_indptr"),
    "indptr too short": (broken(kv_indptr=[0, 3, 6]), {}, "kv_indptr"),
    "indptr[0] != 0": (broken(kv_indptr=[1, 3, 4, 6]), {}, "kv_indptr"),
    "decreasing indptr": (broken(kv_indptr=[0, 4, 3, 6]), {}, "kv_indptr"),
    "indptr[-1] != len(indices)": (broken(kv_indptr=[0, 3, 4, 5]), {}, "kv_indptr"),
    "a sequence with 0 pages": (broken(kv_indptr=[0, 3, 3, 6], kv_indices=[0, 1, 2, 5, 3, 4]), {}, "kv_indptr"),
    "last_page_len 0": (broken(kv_last_page_len=[2, 0, 1]), {}, "kv_last_page_len"),
    "last_page_len > page_size": (broken(kv_last_page_len=[2, 5, 1]), {}, "kv_last_page_len"),
    "page id negative": (broken(kv_indices=[0, 1, 2, -1, 3, 4]), {}, "kv_indices"),
    "page id out of range": (broken(kv_indices=[0, 1, 2, 6, 3, 4]), {"num_pages": 6}, "kv_indices"),
    "page repeated in a sequence": (broken(kv_indices=[0, 1, 0, 5, 3, 4]), {}, "kv_indices"),
    "seq_lens mismatch": (good_table(), {"seq_lens": [10, 8, 5]}, "seq_lens"),
    "seq_lens too short": (good_table(), {"seq_lens": [10, 8]}, "seq_lens"),
    "page_size 0": (good_table(), {"page_size": 0}, "page_size"),
}


@pytest.mark.parametrize("name", list(BROKEN_TABLES))
def test_validate_page_table_rejects_each_broken_invariant(name):
    table, extra, field = BROKEN_TABLES[name]
    extra = {"page_size": 4, **extra}
    with pytest.raises(PageTableError) as info:
        kvref.validate_page_table(table["kv_indptr"], table["kv_indices"], table["kv_last_page_len"], **extra)
    assert type(info.value) is PageTableError and info.value.argument == field
    assert str(info.value).startswith(f"{field}: expected ")


def test_validate_page_table_accepts_the_good_table_and_shared_pages():
    table = good_table()
    lengths = kvref.validate_page_table(table["kv_indptr"], table["kv_indices"], table["kv_last_page_len"], 4,
                                        num_pages=6, seq_lens=[10, 4, 5])
    assert lengths.tolist() == [4 * 2 + 2, 4 * 0 + 4, 4 * 1 + 1]
    # the same page in two sequences (a fork) is allowed; only a repeat within one sequence is not
    shared = broken(kv_indices=[0, 1, 2, 2, 3, 4])
    kvref.validate_page_table(shared["kv_indptr"], shared["kv_indices"], shared["kv_last_page_len"], 4)


# ---------------------------------------------------------------------------------------------------------------
# prewarm and stats
# ---------------------------------------------------------------------------------------------------------------
def test_prewarm_counts_hits():
    run = Run("cpu", num_blocks=6, block_size=2, batch=2)
    assert run.cache.prewarm(0) == run.model.prewarm(0) == 0
    assert run.cache.prewarm(2) == run.model.prewarm(2) == 2
    assert run.cache.prewarm(2) == run.model.prewarm(2) == 0, "already warm"
    assert run.cache.stats()["hits"] == 0
    run.step(3, [0])  # blocks 0, 1: both warm
    assert run.cache.stats()["hits"] == 2
    run.step(2, [1])  # block 2: cold
    assert run.cache.stats()["hits"] == 2
    assert run.cache.prewarm() == run.model.prewarm() == 3  # blocks 3, 4, 5
    run.step(4, [1])
    assert run.cache.stats()["hits"] == 4
    run.release(0)
    assert run.cache.prewarm() == 0, "freed blocks are warm already"
    run.step(3, [1])
    st = run.cache.stats()
    assert st["reuses"] == 1 and st["hits"] == 6 and st["allocations"] == 7  # blocks 5 (prewarmed) and 1 (freed)
    run.check()


def test_prewarm_zeroes_untouched_blocks_only():
    run = Run("cpu", num_blocks=4, block_size=2)
    run.step(3)
    data = run.cache.kv[:, :, :2].copy()
    assert run.cache.prewarm() == 2
    assert np.array_equal(run.cache.kv[:, :, :2], data), "blocks in use keep their tokens"
    run.model.prewarm()
    run.step(3)
    run.check()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_stats_are_consistent(dtype):
    run = Run("cpu", dtype=dtype, num_blocks=9, block_size=3, batch=2, max_seqs=3)
    oracle.assert_pooled_stats_consistent(run.cache)
    st = run.cache.stats()
    assert (st["variant"], st["dtype"], st["element_bytes"]) == ("pooled", dtype, 2 if dtype == "float16" else 4)
    assert st["blocks_used"] == 0 and st["tokens_held"] == 0
    run.step(4)
    run.fork(1)
    run.step(1, [0, 2])
    st = run.cache.stats()
    assert st["tokens_held"] == 5 + 4 + 5 and st["live_sequences"] == 3
    # seq 1 and 2 share block 0 (3 tokens): those slots count once
    assert st["slots_filled"] == 5 + 4 + 5 - 3
    run.evict(0, 2)
    run.check()
    assert run.cache.stats()["internal_fragmentation"] == run.cache.stats()["allocated_slots"] - (3 + 4 + 5 - 3)
