"""PooledCache (backend "cpu") as a Hypothesis state machine against the list model ``oracle.PooledModel``.

The pool is small, so steps regularly run it dry. Rules: add a sequence, append (random T, a random subset of the
live sequences in random order, random K/V, through plan/write/attend/advance with every attention output checked
against the float64 oracle over the model's tokens e'..p, or through append()), fork, release (live, released or
never-added rows), evict_tokens (valid and too many), crop (positive, negative, below the first held position),
reset (one or all) and prewarm. A refused call must raise the named error and leave ``cache.state()`` bitwise
unchanged, and the model refuses it too (``PoolRefused``), unchanged.

After every rule: the pool's invariants from the block tables alone (``oracle.assert_pool_invariants``: a block is
free exactly once with ref 0 or has ref >= 1, ref counts equal table entries, shared blocks have ref >= 2), and the
whole cache against the model (``oracle.assert_pooled_matches_model``: tables, free queue, ref counts, counters,
stats, every held K/V row read back bitwise through keys()/values() and through a raw gather).

The second machine runs with ``evict="oldest"``: sliding windows of max_tokens and reclaiming blocks when the pool
runs dry; the third stores fp16.
"""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvref
from kvref.errors import (CacheOverflowError, DoubleFreeError, IndexOutOfRangeError, PoolExhaustedError,
                          UnknownSequenceError)

import oracle
from snapshots import assert_state_equal

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 8
MAX_SEQS = 4
ATOL = 1e-5

seeds = st.integers(0, 2**32 - 1)

#: the cache's error for each of the model's refusals
ERRORS = {"overflow": CacheOverflowError, "exhausted": PoolExhaustedError, "max_seqs": CacheOverflowError,
          "unknown": UnknownSequenceError, "released": DoubleFreeError, "range": IndexOutOfRangeError}


class PooledCacheMachine(RuleBasedStateMachine):
    dtype = "float32"
    evict = None
    num_blocks = 6
    block_size = 2
    max_tokens = 8
    batch = 2

    def __init__(self):
        super().__init__()
        shape = kvref.CacheShape(LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, self.dtype)
        self.cache = kvref.PooledCache(shape, num_blocks=self.num_blocks, block_size=self.block_size,
                                       batch=self.batch, max_seqs=MAX_SEQS, max_tokens=self.max_tokens,
                                       evict=self.evict, backend="cpu")
        self.model = oracle.PooledModel(LAYERS, self.num_blocks, self.block_size, batch=self.batch,
                                        max_seqs=MAX_SEQS, max_tokens=self.max_tokens, evict=self.evict)
        self.public = shape.public_dtype
        self.scale = float(np.float32(1 / math.sqrt(HEAD_DIM)))

    # --- helpers ----------------------------------------------------------------------------------------------
    def _refused(self, model_call, cache_call, argument):
        """The model refuses (PoolRefused, books unchanged); the cache must raise the matching error naming
        ``argument`` and keep its state bitwise. Returns the refusal's kind, or None when the model accepted."""
        books = self.model.books()
        try:
            result = model_call()
        except oracle.PoolRefused as refusal:
            assert self.model.books() == books, "a refused model call changed the model"
            before = self.cache.state()
            error = ERRORS[refusal.kind]
            with pytest.raises(error) as info:
                cache_call()
            assert type(info.value) is error and info.value.argument == argument, str(info.value)
            assert_state_equal(before, self.cache.state())
            event(f"refused: {refusal.kind}")
            return refusal.kind
        self.result = result
        return None

    def _kv(self, rng, *dims):
        return rng.standard_normal(dims).astype(self.public)

    # --- rules ------------------------------------------------------------------------------------------------
    @rule()
    def add(self):
        if self._refused(self.model.add, self.cache.add_sequence, "max_seqs") is None:
            assert self.cache.add_sequence() == self.result

    @precondition(lambda self: self.model.live())
    @rule(data=st.data(), num_tokens=st.integers(1, 5), seed=seeds, use_append=st.booleans())
    def append(self, data, num_tokens, seed, use_append):
        ids = data.draw(st.lists(st.sampled_from(self.model.live()), min_size=1, max_size=MAX_SEQS, unique=True))
        self._step(ids, num_tokens, seed, use_append)

    @precondition(lambda self: self.model.live())
    @rule(data=st.data(), num_tokens=st.integers(1, 3), seed=seeds, both=st.booleans(), child_first=st.booleans())
    def fork_and_diverge(self, data, num_tokens, seed, both, child_first):
        """Parallel sampling: fork a sequence, then append to the child (and the parent, in either order)."""
        parent = data.draw(st.sampled_from(self.model.live()))
        if self._refused(lambda: self.model.fork(parent), lambda: self.cache.fork(parent), "max_seqs") is not None:
            return
        child = self.cache.fork(parent)
        assert child == self.result
        ids = ([child, parent] if child_first else [parent, child]) if both else [child]
        self._step(ids, num_tokens, seed, False)

    def _step(self, ids, num_tokens, seed, use_append):
        rng = np.random.default_rng(seed)
        k = self._kv(rng, LAYERS, len(ids), num_tokens, KV_HEADS, HEAD_DIM)
        v = self._kv(rng, LAYERS, len(ids), num_tokens, KV_HEADS, HEAD_DIM)
        lengths = [self.model.length(s) for s in ids]
        reclaims = self.model.reclaims
        if use_append:
            cache_call = lambda: self.cache.append(k, v, seq_ids=ids)  # noqa: E731
        else:
            cache_call = lambda: self.cache.plan(num_tokens, ids)  # noqa: E731
        if self._refused(lambda: self.model.step(ids, k, v), cache_call, "num_tokens"):
            return
        info = self.result
        event("copy-on-write" if info["copies"] else "no copy")
        event("evicts" if any(info["first"][s] > 0 for s in ids) else "no eviction")
        if self.model.reclaims > reclaims:
            event("reclaims a block")
        step = cache_call()
        assert step.positions.tolist() == [[n + t for t in range(num_tokens)] for n in lengths]
        assert [tuple(c) for c in step.copies.tolist()] == info["copies"]  # (source, target) blocks, in order
        assert step.starts.tolist() == [info["first"][s] for s in ids]
        if use_append:
            return
        for layer in range(LAYERS):
            self.cache.write(step, layer, k[layer], v[layer])
            q = rng.standard_normal((len(ids), num_tokens, Q_HEADS, HEAD_DIM)).astype(np.float32)
            out = self.cache.attend(step, layer, q)
            for i, s in enumerate(ids):
                expected = self.model.attention(layer, s, q[i], step.positions[i], self.scale)
                np.testing.assert_allclose(out[i], expected, rtol=0, atol=ATOL)
        self.cache.advance(step)

    @precondition(lambda self: self.model.live())
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.model.live()))
        if self._refused(lambda: self.model.fork(parent), lambda: self.cache.fork(parent), "max_seqs") is None:
            assert self.cache.fork(parent) == self.result
            event("fork mid-block" if self.model.length(parent) % self.block_size else "fork at a block edge")

    @rule(seq=st.integers(0, MAX_SEQS - 1))
    def release(self, seq):
        if self._refused(lambda: self.model.release(seq), lambda: self.cache.release(seq), "seq") is None:
            self.cache.release(seq)

    @precondition(lambda self: self.model.live())
    @rule(data=st.data(), extra=st.integers(-1, 1))
    def evict_tokens(self, data, extra):
        seq = data.draw(st.sampled_from(self.model.live()))
        held = self.model.held(seq)
        n = data.draw(st.integers(0, held)) if extra == 0 else (held + 1 if extra > 0 else -1)
        if self._refused(lambda: self.model.evict(seq, n), lambda: self.cache.evict_tokens(seq, n),
                         "num_tokens") is None:
            assert self.cache.evict_tokens(seq, n) == self.result

    @rule(data=st.data(), max_length=st.integers(-6, 12), all_seqs=st.booleans())
    def crop(self, data, max_length, all_seqs):
        live = self.model.live()
        if not live:
            return
        seq = None if all_seqs else data.draw(st.sampled_from(live))
        if self._refused(lambda: self.model.crop(max_length, seq), lambda: self.cache.crop(max_length, seq=seq),
                         "max_length") is None:
            self.cache.crop(max_length, seq=seq)

    @rule(data=st.data(), all_seqs=st.booleans())
    def reset(self, data, all_seqs):
        live = self.model.live()
        seq = None if all_seqs or not live else data.draw(st.sampled_from(live))
        self.model.reset(seq)
        self.cache.reset(seq)

    @rule(data=st.data(), everything=st.booleans())
    def prewarm(self, data, everything):
        n = None if everything else data.draw(st.integers(-1, len(self.model.free) + 1))
        if self._refused(lambda: self.model.prewarm(n), lambda: self.cache.prewarm(n), "num_blocks") is None:
            assert self.cache.prewarm(n) == self.result

    # --- invariants -------------------------------------------------------------------------------------------
    @invariant()
    def pool_invariants(self):
        oracle.assert_pool_invariants(self.cache)

    @invariant()
    def cache_matches_model(self):
        oracle.assert_pooled_matches_model(self.cache, self.model)


class EvictingPooledCacheMachine(PooledCacheMachine):
    """evict="oldest": windows of max_tokens = 5 (not a multiple of B) and block reclaim in a pool of 5 blocks."""
    evict = "oldest"
    num_blocks = 5
    block_size = 2
    max_tokens = 5


class Fp16PooledCacheMachine(PooledCacheMachine):
    """fp16 storage, blocks of 3 tokens, eviction on."""
    dtype = "float16"
    evict = "oldest"
    num_blocks = 6
    block_size = 3
    max_tokens = 7
    batch = 1


COMMON = dict(deadline=None, stateful_step_count=40, suppress_health_check=[HealthCheck.too_slow])

TestPooledCacheMachine = PooledCacheMachine.TestCase
TestPooledCacheMachine.settings = settings(max_examples=200, **COMMON)

TestEvictingPooledCacheMachine = EvictingPooledCacheMachine.TestCase
TestEvictingPooledCacheMachine.settings = settings(max_examples=200, **COMMON)

TestFp16PooledCacheMachine = Fp16PooledCacheMachine.TestCase
TestFp16PooledCacheMachine.settings = settings(max_examples=80, **COMMON)
