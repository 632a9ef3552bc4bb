"""TwoTierCache as a Hypothesis state machine against the list model ``oracle.TwoTierModel``.

The model holds, per sequence, the held tokens: the tail's as given, the store's as the bytes ``gguf.quants.quantize``
made of them when they migrated, and gguf's dequantization of those bytes. Rules: steps of random size (1 token up to
more than M, so some migrate in several batches, some go straight into the store and some are evicted inside the
step) on random subsets of sequences, through plan/write/attend/advance (every attention output against the float64
oracle over the model's values, window ``i - M < j <= i``, the step's own tokens as given) or through append();
decode steps; reset (all or one); crop (valid ones must match the model, invalid ones must raise and leave
``cache.state()`` identical); bad calls (NaN/inf, wrong dtype or shape, layer out of range, stale step, attend or
advance before the writes), each leaving ``cache.state()`` bitwise unchanged. After every rule the invariant compares
the whole cache with the model (``oracle.assert_two_tier_matches_model``: tiers, store bytes, held values exactly,
stats counts) and checks that no stored token's bytes changed while it stayed held.
"""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import kvref
from kvref.errors import DTypeError, IndexOutOfRangeError, NonFiniteError, ShapeError, StaleStepError

import oracle
from snapshots import assert_state_equal

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 32
BATCH = 3
ATOL = 1e-5

seeds = st.integers(0, 2**32 - 1)
seq_subsets = st.lists(st.integers(0, BATCH - 1), min_size=1, max_size=BATCH, unique=True)
one_or_all = st.none() | st.integers(0, BATCH - 1)
BAD_KINDS = ("nan_k", "inf_v", "dtype", "shape", "layer", "stale", "attend_first", "advance_early", "bad_seq")


class TwoTierCacheMachine(RuleBasedStateMachine):
    backend = "cpu"
    dtype = "float32"
    fmt = "q8_0"
    tail = 4
    max_tokens = 9
    migration = 3

    def __init__(self):
        super().__init__()
        shape = kvref.CacheShape(LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, self.dtype)
        self.cache = kvref.TwoTierCache(shape, batch=BATCH, tail_tokens=self.tail, max_tokens=self.max_tokens,
                                        store_format=self.fmt, migration_batch=self.migration, backend=self.backend)
        self.model = oracle.TwoTierModel(LAYERS, BATCH, self.tail, self.max_tokens, self.migration, self.fmt)
        self.public = shape.public_dtype
        self.scale = float(np.float32(1 / math.sqrt(HEAD_DIM)))
        self.old_step = None  # a step that has been advanced: stale from then on
        self.stored = {}  # (layer, seq, position) -> bytes of a stored token, while it is held

    # --- helpers ----------------------------------------------------------------------------------------------
    def _expect_refusal(self, error, argument, call):
        before = self.cache.state()
        with pytest.raises(error) as info:
            call()
        assert type(info.value) is error
        assert info.value.argument == argument, str(info.value)
        assert_state_equal(before, self.cache.state())

    def _kv(self, rng, *dims):
        return rng.standard_normal(dims).astype(self.public)

    def _run_step(self, num_tokens, ids, seed, use_append=False):
        rng = np.random.default_rng(seed)
        lengths = [self.model.length(s) for s in ids]
        k = self._kv(rng, LAYERS, len(ids), num_tokens, KV_HEADS, HEAD_DIM)
        v = self._kv(rng, LAYERS, len(ids), num_tokens, KV_HEADS, HEAD_DIM)
        if use_append:
            step = self.cache.append(k, v, seq_ids=ids)
        else:
            step = self.cache.plan(num_tokens, ids)
        assert step.positions.tolist() == [[n + t for t in range(num_tokens)] for n in lengths]
        tiers = [[self.model.migrated[s],
                  oracle.migrate_to(n + num_tokens, self.model.migrated[s], self.tail, self.migration),
                  max(0, n + num_tokens - self.max_tokens)] for s, n in zip(ids, lengths)]
        assert step.tiers.tolist() == tiers
        for (m, m2, e), n in zip(tiers, lengths):  # shown by pytest --hypothesis-show-statistics
            event("migrates" if m2 > m else "no migration")
            event("into the store directly" if m2 > n else "tail only")
            event("evicts inside the step" if e > n else ("evicts" if e > 0 else "no eviction"))
        if not use_append:
            for layer in range(LAYERS):
                self.cache.write(step, layer, k[layer], v[layer])
                q = rng.standard_normal((len(ids), num_tokens, Q_HEADS, HEAD_DIM)).astype(np.float32)
                out = self.cache.attend(step, layer, q)
                for i, s in enumerate(ids):
                    expected = self.model.attention(layer, s, q[i], k[layer, i], v[layer, i], self.scale)
                    np.testing.assert_allclose(out[i], expected, rtol=0, atol=ATOL)
            self.cache.advance(step)
        for i, s in enumerate(ids):
            self.model.advance(s, k[:, i], v[:, i])
        self.old_step = step

    # --- rules ------------------------------------------------------------------------------------------------
    @rule(num_tokens=st.integers(1, 20), ids=seq_subsets, seed=seeds, use_append=st.booleans())
    def step(self, num_tokens, ids, seed, use_append):
        self._run_step(num_tokens, ids, seed, use_append)

    @rule(ids=seq_subsets, seed=seeds, repeat=st.integers(1, 4))
    def decode(self, ids, seed, repeat):
        for r in range(repeat):
            self._run_step(1, ids, seed + r)

    @rule(seq=one_or_all)
    def reset(self, seq):
        self.cache.reset(seq)
        self.model.reset(seq)
        for key in [key for key in self.stored if seq is None or key[1] == seq]:
            del self.stored[key]

    @rule(max_length=st.integers(-12, 22), seq=one_or_all)
    def crop(self, max_length, seq):
        seqs = range(BATCH) if seq is None else [seq]
        targets = {s: max_length if max_length >= 0 else self.model.length(s) + max_length for s in seqs}
        if not all(self.model.crop_allowed(t, s) for s, t in targets.items()):
            self._expect_refusal(IndexOutOfRangeError, "max_length", lambda: self.cache.crop(max_length, seq=seq))
            event("crop refused")
            return
        event("crop into the store" if any(t < self.model.migrated[s] for s, t in targets.items()) else "crop")
        self.cache.crop(max_length, seq=seq)
        for s, t in targets.items():
            self.model.crop(t, s)
            for key in [key for key in self.stored if key[1] == s and key[2] >= t]:
                del self.stored[key]

    @rule(seq=st.integers(0, BATCH - 1), fraction=st.floats(0, 1))
    def crop_to_fraction(self, seq, fraction):
        """Crop one sequence to a fraction of its length: reaches crops into the store far more often than random
        targets do (refused, changing nothing, once the sequence has evicted tokens)."""
        self.crop(int(fraction * self.model.length(seq)), seq)

    @rule(num_tokens=st.integers(1, 12), ids=seq_subsets, kind=st.sampled_from(BAD_KINDS),
          write_first=st.booleans(), where=seeds)
    def bad_call(self, num_tokens, ids, kind, write_first, where):
        """A refused call, with or without layer 0 of the planned step already held aside: nothing may change."""
        step = self.cache.plan(num_tokens, ids)
        good = np.ones((len(ids), num_tokens, KV_HEADS, HEAD_DIM), self.public)
        q = np.zeros((len(ids), num_tokens, Q_HEADS, HEAD_DIM), np.float32)
        if write_first:
            self.cache.write(step, 0, good, good)
        bad = good.copy()
        index = np.unravel_index(where % bad.size, bad.shape)
        if kind == "nan_k":
            bad[index] = np.nan
            self._expect_refusal(NonFiniteError, "k_new", lambda: self.cache.write(step, 1, bad, good))
        elif kind == "inf_v":
            bad[index] = -np.inf if where % 2 else np.inf
            self._expect_refusal(NonFiniteError, "v_new", lambda: self.cache.write(step, 1, good, bad))
        elif kind == "dtype":
            self._expect_refusal(DTypeError, "k_new", lambda: self.cache.write(step, 1, good.astype(np.float64), good))
        elif kind == "shape":
            self._expect_refusal(ShapeError, "v_new", lambda: self.cache.write(step, 1, good, good[:, :, :1]))
        elif kind == "layer":
            self._expect_refusal(IndexOutOfRangeError, "layer", lambda: self.cache.write(step, LAYERS, good, good))
        elif kind == "stale" and self.old_step is not None:
            old = self.old_step
            kv = np.ones((old.seq_ids.size, old.num_tokens, KV_HEADS, HEAD_DIM), self.public)
            self._expect_refusal(StaleStepError, "step", lambda: self.cache.write(old, 0, kv, kv))
        elif kind == "attend_first":
            self._expect_refusal(StaleStepError, "step", lambda: self.cache.attend(step, 1, q))
        elif kind == "advance_early":
            self._expect_refusal(StaleStepError, "step", lambda: self.cache.advance(step))
        elif kind == "bad_seq":
            self._expect_refusal(IndexOutOfRangeError, "seq_ids", lambda: self.cache.plan(num_tokens, [BATCH]))

    # --- invariants -------------------------------------------------------------------------------------------
    @invariant()
    def cache_matches_model(self):
        oracle.assert_two_tier_matches_model(self.cache, self.model)

    @invariant()
    def stored_bytes_never_change_while_held(self):
        for seq in range(BATCH):
            lo, hi = self.cache.tiers(seq)["store"]
            for key in [key for key in self.stored if key[1] == seq and key[2] < lo]:
                del self.stored[key]  # evicted
            for layer in range(LAYERS):
                blocks = self.cache.store_blocks(layer, seq)
                for p in range(lo, hi):
                    now = blocks[:, :, p - lo].tobytes()
                    assert self.stored.setdefault((layer, seq, p), now) == now, f"token {(layer, seq, p)} changed"


class Fp16Q4TwoTierCacheMachine(TwoTierCacheMachine):
    """fp16 tail, q4_0 store, migration one token at a time."""
    dtype = "float16"
    fmt = "q4_0"
    tail = 3
    max_tokens = 7
    migration = 1


class SmallestTwoTierCacheMachine(TwoTierCacheMachine):
    """M = R (the store only ever holds what a batch migrates past the tail) and B = R; q4_1's affine blocks."""
    fmt = "q4_1"
    tail = 4
    max_tokens = 4
    migration = 4


class PythonTwoTierCacheMachine(TwoTierCacheMachine):
    """The spec as plain Python: fp16 tail, q5_1 store."""
    backend = "python"
    dtype = "float16"
    fmt = "q5_1"
    tail = 4
    max_tokens = 8
    migration = 2


class PythonQ5TwoTierCacheMachine(TwoTierCacheMachine):
    backend = "python"
    fmt = "q5_0"
    tail = 2
    max_tokens = 6
    migration = 2


COMMON = dict(deadline=None, stateful_step_count=15, suppress_health_check=[HealthCheck.too_slow])

TestTwoTierCacheMachine = TwoTierCacheMachine.TestCase
TestTwoTierCacheMachine.settings = settings(max_examples=40, **COMMON)

TestFp16Q4TwoTierCacheMachine = Fp16Q4TwoTierCacheMachine.TestCase
TestFp16Q4TwoTierCacheMachine.settings = settings(max_examples=25, **COMMON)

TestSmallestTwoTierCacheMachine = SmallestTwoTierCacheMachine.TestCase
TestSmallestTwoTierCacheMachine.settings = settings(max_examples=20, **COMMON)

TestPythonTwoTierCacheMachine = PythonTwoTierCacheMachine.TestCase
TestPythonTwoTierCacheMachine.settings = settings(max_examples=20, **COMMON)

TestPythonQ5TwoTierCacheMachine = PythonQ5TwoTierCacheMachine.TestCase
TestPythonQ5TwoTierCacheMachine.settings = settings(max_examples=15, **COMMON)
