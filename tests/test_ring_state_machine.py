"""RingCache as a Hypothesis state machine against the list model ``oracle.RingModel``.

Rules: steps of random T (also T > W, so some are deferred and some drop tokens inside the step) on random subsets of
sequences, through plan/write/attend/advance (every attention output checked against the float64 oracle over the
full, unwrapped K/V) or through append(); decode steps checked the same way; reset (all or one); crop (allowed ones
must match the model, refused ones must raise and leave ``cache.state()`` identical); refused calls on a planned
step (wrong dtype, attend or advance before the write), and a deferred step left half written and abandoned, which
must not touch the ring. After every rule the invariants compare lengths, the positions each layer holds, the slot
each position occupies, and every held K/V row (bitwise) with the model.
"""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import kvref
from kvref.errors import DTypeError, IndexOutOfRangeError, StaleStepError

import oracle
from snapshots import values_equal

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 8
BATCH = 3
ATOL = 1e-5

seeds = st.integers(0, 2**32 - 1)
seq_subsets = st.lists(st.integers(0, BATCH - 1), min_size=1, max_size=BATCH, unique=True)
one_or_all = st.none() | st.integers(0, BATCH - 1)




def slot_of(p, window, sinks):
    """The docstring's slot formula (kvref/ring.py), written out again."""
    return p if p < sinks else sinks + (p - sinks) % (window - sinks)


class RingCacheMachine(RuleBasedStateMachine):
    backend = "cpu"
    dtype = "float32"
    window = 4
    sinks = 0

    def __init__(self):
        super().__init__()
        shape = kvref.CacheShape(LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, self.dtype)
        self.cache = kvref.RingCache(shape, batch=BATCH, window=self.window, sinks=self.sinks, backend=self.backend)
        self.model = oracle.RingModel(LAYERS, BATCH, self.window, self.sinks)
        self.public = shape.public_dtype
        self.scale = float(np.float32(1 / math.sqrt(HEAD_DIM)))

    # --- helpers ----------------------------------------------------------------------------------------------
    def _kv(self, rng, *dims):
        raw = rng.standard_normal(dims)
        return raw.astype(self.public), (oracle.fp16_round(raw) if self.dtype == "float16"
                                         else raw.astype(np.float32).astype(np.float64))

    def _expect_refusal(self, error, call):
        before = self.cache.state()
        with pytest.raises(error):
            call()
        after = self.cache.state()
        assert before.keys() == after.keys()
        for key in before:
            assert values_equal(before[key], after[key]), key

    def _run_step(self, num_tokens, ids, seed, use_append=False):
        rng = np.random.default_rng(seed)
        lengths = [self.model.length(s) for s in ids]
        positions = [[n + t for t in range(num_tokens)] for n in lengths]
        k, k64 = self._kv(rng, LAYERS, len(ids), num_tokens, KV_HEADS, HEAD_DIM)
        v, v64 = self._kv(rng, LAYERS, len(ids), num_tokens, KV_HEADS, HEAD_DIM)
        deferred = any(num_tokens >= 2 and n + num_tokens - 1 >= self.window for n in lengths)
        if use_append:
            step = self.cache.append(k, v, seq_ids=ids)
        else:
            step = self.cache.plan(num_tokens, ids)
        assert step.positions.tolist() == positions
        assert step.deferred == deferred
        # only the tokens the ring keeps get a slot (sinks and the last W - S of the step), so no two share one
        keep = self.window - self.sinks
        assert step.slots.tolist() == [[slot_of(p, self.window, self.sinks) if p < self.sinks or p > row[-1] - keep
                                        else -1 for p in row] for row in positions]
        for layer in range(LAYERS):
            if not use_append:
                self.cache.write(step, layer, k[layer], v[layer])
            for i, s in enumerate(ids):
                self.model.append(layer, s, k64[layer, i], v64[layer, i])
            if use_append:
                continue
            q = rng.standard_normal((len(ids), num_tokens, Q_HEADS, HEAD_DIM)).astype(np.float32)
            out = self.cache.attend(step, layer, q)
            for i, s in enumerate(ids):
                expected = oracle.window_chunk_attention(q[i], self.model.keys(layer, s), self.model.values(layer, s),
                                                         positions[i], self.window, self.scale, self.sinks)
                np.testing.assert_allclose(out[i], expected, rtol=0, atol=ATOL)
        if not use_append:
            self.cache.advance(step)

    # --- rules ------------------------------------------------------------------------------------------------
    @rule(num_tokens=st.integers(1, 12), ids=seq_subsets, seed=seeds, use_append=st.booleans())
    def step(self, num_tokens, ids, seed, use_append):
        self._run_step(num_tokens, ids, seed, use_append)

    @rule(ids=seq_subsets, seed=seeds)
    def decode(self, ids, seed):
        self._run_step(1, ids, seed)

    @rule(seq=one_or_all)
    def reset(self, seq):
        kv_before = self.cache.kv.copy()
        self.cache.reset(seq)
        self.model.reset(seq)
        assert np.array_equal(self.cache.kv, kv_before), "reset clears positions, never the K/V bytes"

    @rule(max_length=st.integers(-14, 14), seq=one_or_all)
    def crop(self, max_length, seq):
        seqs = range(BATCH) if seq is None else [seq]
        targets = {s: max_length if max_length >= 0 else self.model.length(s) + max_length for s in seqs}
        if any(t < 0 for t in targets.values()) or not all(self.model.crop_allowed(t, s) for s, t in targets.items()):
            self._expect_refusal(IndexOutOfRangeError, lambda: self.cache.crop(max_length, seq=seq))
            return
        self.cache.crop(max_length, seq=seq)
        for s, t in targets.items():
            self.model.crop(min(t, self.model.length(s)), s)

    @rule(num_tokens=st.integers(1, 12), ids=seq_subsets)
    def refused_calls(self, num_tokens, ids):
        """Calls a planned step refuses: nothing may change, whether or not the step would be deferred."""
        step = self.cache.plan(num_tokens, ids)
        good = np.zeros((len(ids), num_tokens, KV_HEADS, HEAD_DIM), self.public)
        q = np.zeros((len(ids), num_tokens, Q_HEADS, HEAD_DIM), np.float32)
        self._expect_refusal(DTypeError, lambda: self.cache.write(step, 0, good.astype(np.float64), good))
        self._expect_refusal(StaleStepError, lambda: self.cache.attend(step, 1, q))
        self._expect_refusal(StaleStepError, lambda: self.cache.advance(step))
        self._expect_refusal(IndexOutOfRangeError, lambda: self.cache.write(step, LAYERS, good, good))

    @rule(ids=seq_subsets, seed=seeds)
    def abandoned_deferred_step(self, ids, seed):
        """A deferred step holds its K/V aside: writing one layer and then abandoning it leaves the ring as it was."""
        num_tokens = self.window + 1  # always deferred
        step = self.cache.plan(num_tokens, ids)
        assert step.deferred
        slots_before, kv_before = self.cache.slot_positions.copy(), self.cache.kv.copy()
        k, _ = self._kv(np.random.default_rng(seed), len(ids), num_tokens, KV_HEADS, HEAD_DIM)
        self.cache.write(step, 0, k, k)
        self._expect_refusal(StaleStepError, lambda: self.cache.advance(step))
        assert np.array_equal(self.cache.slot_positions, slots_before)
        assert self.cache.kv.tobytes() == kv_before.tobytes()

    # --- invariants -------------------------------------------------------------------------------------------
    @invariant()
    def lengths_match(self):
        lengths = self.model.lengths()
        assert self.cache.lengths.tolist() == lengths
        stats = self.cache.stats()
        assert stats["tokens_held"] == [min(n, self.window) for n in lengths]
        assert stats["tokens_overwritten"] == [n - min(n, self.window) for n in lengths]
        for s in range(BATCH):
            assert self.cache.remaining_capacity(s) == max(0, self.window - lengths[s])

    @invariant()
    def held_positions_and_rows_match(self):
        sp = self.cache.slot_positions
        for s in range(BATCH):
            held = self.model.held(s)
            slots = np.full(self.window, -1, np.int64)
            for p in held:
                slots[slot_of(p, self.window, self.sinks)] = p
            for layer in range(LAYERS):
                assert np.array_equal(sp[layer, s], slots), (layer, s, sp[layer, s], slots)
                assert self.cache.held_positions(s, layer).tolist() == held
                got_k, got_v = self.cache.keys(layer, s), self.cache.values(layer, s)
                assert got_k.shape == got_v.shape == (KV_HEADS, len(held), HEAD_DIM)
                if held:
                    assert np.array_equal(got_k.astype(np.float64), self.model.keys(layer, s, held))
                    assert np.array_equal(got_v.astype(np.float64), self.model.values(layer, s, held))


class SinksRingCacheMachine(RingCacheMachine):
    window = 5
    sinks = 2


class Fp16RingCacheMachine(RingCacheMachine):
    dtype = "float16"
    window = 4
    sinks = 1


class PythonRingCacheMachine(RingCacheMachine):
    backend = "python"
    window = 3
    sinks = 1


COMMON = dict(deadline=None, stateful_step_count=20, suppress_health_check=[HealthCheck.too_slow])

TestRingCacheMachine = RingCacheMachine.TestCase
TestRingCacheMachine.settings = settings(max_examples=40, **COMMON)

TestSinksRingCacheMachine = SinksRingCacheMachine.TestCase
TestSinksRingCacheMachine.settings = settings(max_examples=40, **COMMON)

TestFp16RingCacheMachine = Fp16RingCacheMachine.TestCase
TestFp16RingCacheMachine.settings = settings(max_examples=15, **COMMON)

TestPythonRingCacheMachine = PythonRingCacheMachine.TestCase
TestPythonRingCacheMachine.settings = settings(max_examples=25, **COMMON)
