"""FlatCache (backend "cpu") as a Hypothesis state machine against the list model in tests/oracle.py.

Rules: append (random T, random subset of sequences, through plan/write/attend/advance or through append()),
overflow attempts, reset (all or one), crop (positive, negative, too negative), and a decode probe (write one token
without advancing and compare its attention with the oracle). After every rule the invariants compare lengths,
capacity queries and every stored K/V row with the model. A refused call must leave ``cache.state()`` identical.
"""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvref
from kvref.errors import CacheOverflowError, IndexOutOfRangeError

import oracle
from snapshots import assert_state_equal

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 8
BATCH, MAX_TOKENS = 3, 10
ATOL = 1e-5

seeds = st.integers(0, 2**32 - 1)
seq_subsets = st.lists(st.integers(0, BATCH - 1), min_size=1, max_size=BATCH, unique=True)
one_or_all = st.none() | st.integers(0, BATCH - 1)




class FlatCacheMachine(RuleBasedStateMachine):
    dtype = "float32"

    def __init__(self):
        super().__init__()
        shape = kvref.CacheShape(LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, self.dtype)
        self.cache = kvref.FlatCache(shape, batch=BATCH, max_tokens=MAX_TOKENS, backend="cpu")
        self.model = oracle.FlatModel(LAYERS, BATCH, MAX_TOKENS)
        self.public = shape.public_dtype
        self.scale = float(np.float32(1 / math.sqrt(HEAD_DIM)))

    # --- helpers ----------------------------------------------------------------------------------------------
    def _kv(self, rng, *dims):
        return rng.standard_normal(dims).astype(self.public)

    def _expect_refusal(self, error, call):
        before = self.cache.state()
        with pytest.raises(error):
            call()
        assert_state_equal(before, self.cache.state())

    def _check_attention(self, out, layer, ids, positions, q):
        for i, s in enumerate(ids):
            expected = oracle.causal_chunk_attention(q[i], self.model.keys(layer, s), self.model.values(layer, s),
                                                     positions[i], self.scale)
            np.testing.assert_allclose(out[i], expected, rtol=0, atol=ATOL)

    # --- rules ------------------------------------------------------------------------------------------------
    @rule(num_tokens=st.integers(1, 4), ids=seq_subsets, seed=seeds, use_append=st.booleans())
    def append(self, num_tokens, ids, seed, use_append):
        rng = np.random.default_rng(seed)
        k = self._kv(rng, LAYERS, len(ids), num_tokens, KV_HEADS, HEAD_DIM)
        v = self._kv(rng, LAYERS, len(ids), num_tokens, KV_HEADS, HEAD_DIM)
        if self.model.would_overflow(num_tokens, ids):
            if use_append:
                self._expect_refusal(CacheOverflowError, lambda: self.cache.append(k, v, seq_ids=ids))
            else:
                self._expect_refusal(CacheOverflowError, lambda: self.cache.plan(num_tokens, ids))
            return
        positions = [[self.model.length(s) + t for t in range(num_tokens)] for s in ids]
        if use_append:
            step = self.cache.append(k, v, seq_ids=ids)
            assert step.positions.tolist() == positions
            for layer in range(LAYERS):
                for i, s in enumerate(ids):
                    self.model.append(layer, s, k[layer, i].astype(np.float64), v[layer, i].astype(np.float64))
            return
        step = self.cache.plan(num_tokens, ids)
        assert step.positions.tolist() == positions
        for layer in range(LAYERS):
            self.cache.write(step, layer, k[layer], v[layer])
            for i, s in enumerate(ids):
                self.model.append(layer, s, k[layer, i].astype(np.float64), v[layer, i].astype(np.float64))
            q = rng.standard_normal((len(ids), num_tokens, Q_HEADS, HEAD_DIM)).astype(np.float32)
            self._check_attention(self.cache.attend(step, layer, q), layer, ids, positions, q)
        self.cache.advance(step)

    @rule(data=st.data())
    def overflow(self, data):
        """Ask for more tokens than one sequence has room for (others may come along): must raise, change nothing."""
        target = data.draw(st.integers(0, BATCH - 1), label="seq")
        others = data.draw(st.lists(st.integers(0, BATCH - 1), unique=True, max_size=BATCH), label="others")
        ids = [target] + [s for s in others if s != target]
        ids = data.draw(st.permutations(ids), label="order")
        extra = data.draw(st.integers(1, 3), label="extra")
        num_tokens = MAX_TOKENS - self.model.length(target) + extra
        self._expect_refusal(CacheOverflowError, lambda: self.cache.plan(num_tokens, ids))
        k = np.zeros((LAYERS, len(ids), num_tokens, KV_HEADS, HEAD_DIM), self.public)
        self._expect_refusal(CacheOverflowError, lambda: self.cache.append(k, k, seq_ids=ids))

    @rule(seq=one_or_all)
    def reset(self, seq):
        kv_before = self.cache.kv.copy()
        self.cache.reset(seq)
        self.model.reset(seq)
        assert np.array_equal(self.cache.kv, kv_before), "reset is O(1): the buffer is untouched"

    @rule(max_length=st.integers(-MAX_TOKENS - 2, MAX_TOKENS + 2), seq=one_or_all)
    def crop(self, max_length, seq):
        seqs = range(BATCH) if seq is None else [seq]
        if max_length < 0 and any(self.model.length(s) + max_length < 0 for s in seqs):
            self._expect_refusal(IndexOutOfRangeError, lambda: self.cache.crop(max_length, seq=seq))
            return
        self.cache.crop(max_length, seq=seq)
        self.model.crop(max_length, seq=seq)

    @precondition(lambda self: any(self.model.length(s) < MAX_TOKENS for s in range(BATCH)))
    @rule(data=st.data(), seed=seeds)
    def decode_probe(self, data, seed):
        """Write one token for a sequence with room, attend, compare with the oracle; do not advance.

        The probe's K/V sit past the sequence's length, where nothing may ever read them."""
        room = [s for s in range(BATCH) if self.model.length(s) < MAX_TOKENS]
        s = data.draw(st.sampled_from(room), label="seq")
        rng = np.random.default_rng(seed)
        lengths, version = self.cache.lengths, self.cache.state()["version"]
        step = self.cache.plan(1, [s])
        n = self.model.length(s)
        for layer in range(LAYERS):
            k = self._kv(rng, 1, 1, KV_HEADS, HEAD_DIM)
            v = self._kv(rng, 1, 1, KV_HEADS, HEAD_DIM)
            self.cache.write(step, layer, k, v)
            q = rng.standard_normal((1, 1, Q_HEADS, HEAD_DIM)).astype(np.float32)
            out = self.cache.attend(step, layer, q)
            keys = np.concatenate([self.model.keys(layer, s), k[0].transpose(1, 0, 2).astype(np.float64)], axis=1) \
                if n else k[0].transpose(1, 0, 2).astype(np.float64)
            values = np.concatenate([self.model.values(layer, s), v[0].transpose(1, 0, 2).astype(np.float64)],
                                    axis=1) if n else v[0].transpose(1, 0, 2).astype(np.float64)
            expected = oracle.decode_attention_gqa(q[0, 0], keys, values, self.scale)
            np.testing.assert_allclose(out[0, 0], expected, rtol=0, atol=ATOL)
        assert np.array_equal(self.cache.lengths, lengths) and self.cache.state()["version"] == version

    # --- invariants -------------------------------------------------------------------------------------------
    @invariant()
    def lengths_and_capacity(self):
        lengths = self.model.lengths()
        assert self.cache.lengths.tolist() == lengths
        for s in range(BATCH):
            assert self.cache.get_seq_length(s) == lengths[s]
            assert self.cache.remaining_capacity(s) == MAX_TOKENS - lengths[s]
            assert self.cache.is_full(s) == (lengths[s] == MAX_TOKENS)
        assert self.cache.get_max_cache_shape() == MAX_TOKENS
        assert self.cache.stats()["tokens_used"] == sum(lengths)

    @invariant()
    def stored_rows(self):
        for layer in range(LAYERS):
            for s in range(BATCH):
                n = self.model.length(s)
                got_k, got_v = self.cache.keys(layer, s), self.cache.values(layer, s)
                assert got_k.shape == got_v.shape == (KV_HEADS, n, HEAD_DIM)
                assert got_k.dtype == self.public
                if n:
                    assert np.array_equal(got_k.astype(np.float64), self.model.keys(layer, s))
                    assert np.array_equal(got_v.astype(np.float64), self.model.values(layer, s))


class Fp16FlatCacheMachine(FlatCacheMachine):
    dtype = "float16"


COMMON = dict(deadline=None, stateful_step_count=30, suppress_health_check=[HealthCheck.too_slow])

TestFlatCacheMachine = FlatCacheMachine.TestCase
TestFlatCacheMachine.settings = settings(max_examples=150, **COMMON)

TestFp16FlatCacheMachine = Fp16FlatCacheMachine.TestCase
TestFp16FlatCacheMachine.settings = settings(max_examples=60, **COMMON)
