"""TwoTierCache on the host backends ("python" = the spec as plain Python, "cpu" = numba.njit), against tests/oracle.py.

The model is ``oracle.TwoTierModel``: a per-sequence dict of held tokens. When a token migrates, the model quantizes
it with ``gguf.quants.quantize`` (the independent oracle for ggml's bytes) and keeps the bytes and gguf's
dequantization of them. After every step the cache must agree with it *exactly*: ``store_blocks()`` bytes,
``keys()``/``values()`` (store dequantized + tail), ``tiers()``, lengths and the token counts of ``stats()``.
Every attention output is compared with the float64 oracle over the model's held values under the window rule
``i - M < j <= i``, the step's own tokens taken as given (``TwoTierModel.attention``).

Then: one test per migration boundary (tail length R - 1, R, R + 1; batches of 1, 32 and R; prefill around R and
around M), stored bytes never change while held and each token is quantized exactly once, every refusal leaves
``cache.state()`` bitwise unchanged, ``attend`` vs ``attend_materialized``, memory formulas vs ``nbytes``, and the
error against an fp32 flat (and ring) cache within a derived bound (``attention_error_bound``: from the K/V rounding
errors, which are checked against the formats' per-element bounds, ``oracle.quant_error_bound``).
"""

import dataclasses
import math

import numpy as np
import pytest

import kvref
import kvref.cpu  # noqa: F401  (the compiled primitives the "cpu" backend uses)
from kvref import memory
from kvref import two_tier as kvtt
from kvref.errors import (BackendUnavailableError, DTypeError, IndexOutOfRangeError, NonFiniteError, ShapeError,
                          StaleStepError)

import oracle
from snapshots import run_bad_call

BACKENDS = ("python", "cpu")  # the same list as the ``backend`` fixture in conftest.py
DTYPES = ("float32", "float16")
FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
BLOCK_BYTES = oracle.GGML_BLOCK_BYTES
#: (q_heads, kv_heads): GQA G=2, MHA
HEADS = {"gqa": (4, 2), "mha": (2, 2)}
#: attention vs the float64 oracle over the same (dequantized) values: float32 arithmetic only (observed <= 8e-7
#: over every schedule here; 1e-5 as for the flat and ring caches)
ATOL = 1e-5
#: attend() vs attend_materialized(): the same values, summed in a different order (float32)
ATOL_MATERIALIZED = 2e-6


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def row_bytes(head_dim, fmt):
    return head_dim // 32 * BLOCK_BYTES[fmt]


check_matches_model = oracle.assert_two_tier_matches_model


class Run:
    """A two-tier cache and its model. ``step`` plans, writes and attends every layer, compares each output with
    the oracle, advances both, and checks the whole state against the model."""

    def __init__(self, backend, dtype="float32", fmt="q8_0", tail=4, max_tokens=9, migration=2, layers=2,
                 q_heads=4, kv_heads=2, head_dim=64, batch=2, seed=0):
        self.shape = kvref.CacheShape(layers, q_heads, kv_heads, head_dim, dtype)
        self.cache = kvref.TwoTierCache(self.shape, batch=batch, tail_tokens=tail, max_tokens=max_tokens,
                                        store_format=fmt, migration_batch=migration, backend=backend)
        self.model = oracle.TwoTierModel(layers, batch, tail, max_tokens, migration, fmt)
        self.rng = np.random.default_rng(seed)
        self.batch, self.dtype, self.tail, self.max_tokens, self.migration = batch, dtype, tail, max_tokens, migration
        self.scale = float(np.float32(1.0 / math.sqrt(head_dim)))

    def draw_kv(self, n_seq, num_tokens):
        s = self.shape
        return self.rng.standard_normal((s.layers, n_seq, num_tokens, s.kv_heads, s.head_dim)).astype(s.public_dtype)

    def draw_q(self, n_seq, num_tokens):
        s = self.shape
        return self.rng.standard_normal((s.layers, n_seq, num_tokens, s.q_heads, s.head_dim)).astype(np.float32)

    def step(self, num_tokens, seq_ids=None, k=None, v=None, q=None, check=True):
        """One full step; k, v (layers, n_seq, T, kv_heads, D) and q (layers, n_seq, T, q_heads, D) default to random.
        Returns (step, [out per layer])."""
        ids = list(range(self.batch)) if seq_ids is None else list(seq_ids)
        k = self.draw_kv(len(ids), num_tokens) if k is None else k
        v = self.draw_kv(len(ids), num_tokens) if v is None else v
        q = self.draw_q(len(ids), num_tokens) if q is None else q
        step = self.cache.plan(num_tokens, seq_ids)
        lengths = [self.model.length(s) for s in ids]
        assert step.seq_ids.tolist() == ids
        assert step.positions.tolist() == [[n + t for t in range(num_tokens)] for n in lengths]
        expected_tiers = []
        for s, n in zip(ids, lengths):
            m = self.model.migrated[s]
            expected_tiers.append([m, oracle.migrate_to(n + num_tokens, m, self.tail, self.migration),
                                   max(0, n + num_tokens - self.max_tokens)])
        assert step.tiers.tolist() == expected_tiers
        # a token ends the step in the tail (slot p % R) iff p >= m'; the others get no tail slot
        assert step.slots.tolist() == [[p % self.tail if p >= tiers[1] else -1 for p in row]
                                       for row, tiers in zip(step.positions.tolist(), expected_tiers)]
        outs = []
        for layer in range(self.shape.layers):
            self.cache.write(step, layer, k[layer], v[layer])
            out = self.cache.attend(step, layer, q[layer])
            assert out.shape == q[layer].shape and out.dtype == np.float32
            for i, s in enumerate(ids):
                expected = self.model.attention(layer, s, q[layer, i], k[layer, i], v[layer, i], self.scale)
                np.testing.assert_allclose(out[i], expected, rtol=0, atol=ATOL,
                                           err_msg=f"layer {layer}, seq {s}, positions {step.positions[i]}")
            outs.append(out)
        self.cache.advance(step)
        for i, s in enumerate(ids):
            self.model.advance(s, k[:, i], v[:, i])
        if check:
            check_matches_model(self.cache, self.model)
        return step, outs


#: a schedule through every regime with R = 4, M = 9, B = 2: prefill below R, a chunk that migrates, decode across
#: migrations and into eviction, a chunk longer than M (tokens evicted inside the step), uneven sequences
SCHEDULE = [(3, None), (5, [1]), (1, None), (1, [0]), (2, None), (1, None), (12, [0]), (1, None), (3, [1, 0]),
            (1, None), (1, None)]


# ---------------------------------------------------------------------------------------------------------------
# the oracle's own pieces: gguf round trips within the derived bounds, and the tier counters
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_error_bound_holds_for_gguf_round_trips(fmt, rng):
    """oracle.quant_error_bound (derived from the formulas) bounds gguf's round trip on normal, scaled, one-signed,
    tiny and clamp-case blocks, and is tight: the worst element uses more than half of it."""
    blocks = [rng.standard_normal((64, 32)),
              rng.standard_normal((64, 32)) * np.logspace(-3, 3, 64)[:, None],
              np.abs(rng.standard_normal((16, 32))) + 5,
              rng.standard_normal((4, 32)) * 1e-6]
    clamp = np.zeros((2, 32))
    clamp[:, 0], clamp[:, 1] = 3.0, -3.0  # q4_0/q5_0: the opposite extreme can only reach (h - 1) d
    x = np.concatenate(blocks + [clamp]).astype(np.float32)
    err = np.abs(oracle.gguf_dequantize(oracle.gguf_quantize(x, fmt), fmt).astype(np.float64) - x)
    bound = oracle.quant_error_bound(x, fmt)
    assert np.all(err <= bound), float((err / bound).max())
    assert (err / bound).max() > 0.5
    amax = np.abs(x).max(axis=1, keepdims=True)
    ideal = {"q8_0": 1 / 254, "q4_0": 1 / 8, "q4_1": 2 / 30, "q5_0": 1 / 16, "q5_1": 2 / 62}[fmt]
    # no looser than the ideal bound plus fp16's rounding of the scale (2^-11 relative: 12% of amax/254 for q8_0,
    # as measured in the facts: 0.00426 amax) and the subnormal floor of tiny blocks
    assert np.all(bound <= amax * ideal * 1.15 + 1e-5)


def test_tier_counters_match_the_rule():
    """migrate_to and store_capacity of the spec against the rule restated in the oracle, over a grid."""
    for tail, migration in [(1, 1), (4, 1), (4, 2), (4, 3), (4, 4), (5, 3)]:
        for max_tokens in (tail, tail + 3):
            assert kvtt.store_capacity(tail, max_tokens, migration) == max_tokens - tail + migration - 1
            for length in range(0, 3 * max_tokens):
                for migrated in range(0, length + 1):
                    if length - migrated > tail:
                        continue  # never a state: the tail holds at most R tokens
                    for n in range(1, 2 * max_tokens):
                        got = kvtt.migrate_to(length, migrated, n, tail, migration)
                        want = oracle.migrate_to(length + n, migrated, tail, migration)
                        assert got == want
                        assert (got - migrated) % migration == 0
                        if got > migrated:
                            assert tail - migration + 1 <= length + n - got <= tail


# ---------------------------------------------------------------------------------------------------------------
# attention and state against the model: every backend, dtype, format, GQA and MHA, decode and chunks
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_schedule_matches_model_and_oracle(backend, dtype, fmt, heads):
    q_heads, kv_heads = HEADS[heads]
    run = Run(backend, dtype, fmt, q_heads=q_heads, kv_heads=kv_heads, seed=FORMATS.index(fmt))
    saw = set()
    for num_tokens, ids in SCHEDULE:
        step, _ = run.step(num_tokens, ids)
        tiers = step.tiers
        saw |= {"migrate" for m, m2, e in tiers.tolist() if m2 > m}
        saw |= {"evict" for m, m2, e in tiers.tolist() if e > 0}
        saw |= {"prefill-to-store" for (m, m2, e), row in zip(tiers.tolist(), step.positions.tolist()) if m2 > row[0]}
        saw |= {"evicted-in-step" for (m, m2, e), row in zip(tiers.tolist(), step.positions.tolist()) if e > row[0]}
    assert saw == {"migrate", "evict", "prefill-to-store", "evicted-in-step"}
    assert run.cache.lengths.tolist() == [sum(n for n, ids in SCHEDULE if ids is None or s in ids) for s in (0, 1)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_attend_matches_attend_materialized(backend, fmt):
    """The block-by-block attention and the materializing path agree to float32 rounding, in every regime."""
    run = Run(backend, "float16", fmt, seed=7)
    for num_tokens, ids in SCHEDULE:
        step = run.cache.plan(num_tokens, ids)
        n_seq = step.seq_ids.size
        k, v, q = run.draw_kv(n_seq, num_tokens), run.draw_kv(n_seq, num_tokens), run.draw_q(n_seq, num_tokens)
        for layer in range(run.shape.layers):
            run.cache.write(step, layer, k[layer], v[layer])
            a = run.cache.attend(step, layer, q[layer])
            b = run.cache.attend_materialized(step, layer, q[layer])
            np.testing.assert_allclose(a, b, rtol=0, atol=ATOL_MATERIALIZED)
            keys, values, positions = run.cache.materialize(step, layer)
            for i, s in enumerate(step.seq_ids.tolist()):
                n = int((positions[i] >= 0).sum())
                assert positions[i, :n].tolist() == list(range(run.model.evicted(s), int(step.positions[i, -1]) + 1))
                held = len(run.model.positions(s))
                if held:
                    assert np.array_equal(keys[i, :, :held].astype(np.float64), run.model.keys(layer, s))
                step_k = k[layer, i].astype(np.float32).transpose(1, 0, 2)
                assert np.array_equal(keys[i, :, held:n], step_k)
        run.cache.advance(step)
        for i, s in enumerate(step.seq_ids.tolist()):
            run.model.advance(s, k[:, i], v[:, i])


@pytest.mark.parametrize("dtype", DTYPES)
def test_python_and_cpu_agree(dtype):
    """The same steps on both backends: identical tail and store bytes, identical stats, attention within float32
    rounding (the cpu backend uses a polynomial exp)."""
    runs = {b: Run(b, dtype, "q4_1", seed=11) for b in BACKENDS}
    for num_tokens, ids in SCHEDULE:
        outs = {b: run.step(num_tokens, ids, check=False)[1] for b, run in runs.items()}
        for a, b in zip(outs["python"], outs["cpu"]):
            np.testing.assert_allclose(a, b, rtol=0, atol=4e-6)
        assert runs["python"].cache.kv.tobytes() == runs["cpu"].cache.kv.tobytes()
        assert runs["python"].cache.store.tobytes() == runs["cpu"].cache.store.tobytes()
    assert runs["python"].cache.stats() | {"backend": "x"} == runs["cpu"].cache.stats() | {"backend": "x"}
    check_matches_model(runs["cpu"].cache, runs["cpu"].model)


# ---------------------------------------------------------------------------------------------------------------
# migration boundaries (a refactor of Hugging Face's quantized cache broke because no test went past the residual)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", ["R-1", "R", "R+1"])
def test_decode_to_tail_length_boundary(backend, length):
    """Decode one token at a time to L = R - 1, R, R + 1 (R = 5, B = 3): nothing migrates while L <= R; the token
    that makes L = R + 1 migrates one whole batch, the B oldest, leaving R + 1 - B in the tail."""
    tail, migration = 5, 3
    n = {"R-1": tail - 1, "R": tail, "R+1": tail + 1}[length]
    run = Run(backend, tail=tail, max_tokens=12, migration=migration, batch=1, seed=n)
    for p in range(n):
        step, _ = run.step(1)
        assert step.tiers.tolist() == [[0, migration if p == tail else 0, 0]]
    expected_store = (0, migration) if n == tail + 1 else (0, 0)
    assert run.cache.tiers() == {"evicted": (0, 0), "store": expected_store, "tail": (expected_store[1], n)}
    assert run.cache.stats()["tokens_in_tail"] == [n - expected_store[1]]


@pytest.mark.parametrize("migration", [1, 32, "R"])
def test_migration_batch_sizes(backend, migration):
    """Batches of 1, 32 and R (R = 40): decoding past R migrates exactly B tokens each time the tail would exceed R,
    so the tail always holds between R - B + 1 and R tokens; the bytes equal gguf's at every step."""
    tail = 40
    migration = tail if migration == "R" else migration
    run = Run(backend, tail=tail, max_tokens=48, migration=migration, layers=1, q_heads=2, kv_heads=1, head_dim=32,
              batch=1, seed=migration)
    run.step(tail - 2)
    migrated = [0]
    for _ in range(tail + 6 if backend == "cpu" else 12):
        step, _ = run.step(1)
        m, m2, e = step.tiers[0].tolist()
        assert m2 - m in (0, migration)
        migrated.append(m2)
        length = run.cache.get_seq_length()
        in_tail = length - m2
        assert in_tail <= tail
        if m2 > 0:
            assert in_tail >= tail - migration + 1
    assert migrated[-1] > 0, "the schedule went past R"
    first = migrated.index(migration)
    assert first == 3, "the first migration comes with the token that makes L = R + 1"


@pytest.mark.parametrize("prefill", ["R-1", "R", "R+1", "M-1", "M", "M+1", "M+R+1", "2M+3"])
def test_prefill_lengths_around_R_and_M(backend, prefill):
    """One prefill chunk of n tokens (R = 4, M = 9, B = 3), then decode: tokens below m' go straight into the store
    (quantized from the chunk as given), tokens below e' are never stored, and m' = ceil((n - R) / B) * B."""
    tail, max_tokens, migration = 4, 9, 3
    n = {"R-1": tail - 1, "R": tail, "R+1": tail + 1, "M-1": max_tokens - 1, "M": max_tokens,
         "M+1": max_tokens + 1, "M+R+1": max_tokens + tail + 1, "2M+3": 2 * max_tokens + 3}[prefill]
    run = Run(backend, tail=tail, max_tokens=max_tokens, migration=migration, batch=2, seed=n)
    step, _ = run.step(n, [1])
    migrated = max(0, math.ceil((n - tail) / migration) * migration)
    evicted = max(0, n - max_tokens)
    assert step.tiers.tolist() == [[0, migrated, evicted]]
    assert run.cache.tiers(1) == {"evicted": (0, evicted), "store": (evicted, max(evicted, migrated)),
                                  "tail": (migrated, n)}
    assert run.model.quantized_count == 2 * max(0, migrated - evicted)  # 2 layers
    for _ in range(3):
        run.step(1)


def test_each_token_is_quantized_exactly_once(monkeypatch):
    """Count every head row the python backend quantizes: it is 2 (K, V) x kv_heads x (layer-tokens that entered
    the store), never more, over steps that migrate, prefill into the store, evict and crop. Hugging Face's
    QuantizedCache re-quantizes its whole store on every flush; a re-quantization here would raise the count."""
    calls = []
    original = kvref.quant.quantize_row

    def counting(row, fmt, blocks, scratch, lane, lanes):
        assert (lane, lanes) == (0, 1)  # the spec quantizes with one lane
        calls.append(1)
        return original(row, fmt, blocks, scratch, lane, lanes)

    monkeypatch.setattr(kvref.quant, "quantize_row", counting)
    run = Run("python", seed=3)
    for num_tokens, ids in SCHEDULE[:6]:
        run.step(num_tokens, ids)
    run.cache.crop(3, seq=0)  # into the store (seq 0 holds 8 tokens, none evicted)
    run.model.crop(3, 0)
    for num_tokens, ids in SCHEDULE[6:]:
        run.step(num_tokens, ids)
    assert run.model.quantized_count > 10
    assert len(calls) == 2 * run.shape.kv_heads * run.model.quantized_count


def test_stored_bytes_never_change_while_held(backend):
    """Snapshot the bytes of every stored (layer, seq, position) after each step: while a position stays held its
    bytes never change, through migrations, more prefill chunks and eviction (until the position is evicted)."""
    run = Run(backend, "float16", "q4_0", tail=4, max_tokens=11, migration=3, seed=5)
    snapshots = {}
    checked = 0
    for num_tokens, ids in SCHEDULE + [(2, None), (1, [1]), (5, None), (1, None)]:
        run.step(num_tokens, ids, check=False)
        for seq in range(run.batch):
            lo, hi = run.cache.tiers(seq)["store"]
            for layer in range(run.shape.layers):
                blocks = run.cache.store_blocks(layer, seq)
                for p in range(lo, hi):
                    now = blocks[:, :, p - lo].tobytes()
                    key = (layer, seq, p)
                    if key in snapshots:
                        assert snapshots[key] == now, f"stored token {key} changed"
                        checked += 1
                    snapshots[key] = now
            for key in [key for key in snapshots if key[1] == seq and key[2] < lo]:
                del snapshots[key]  # evicted
    assert checked > 50


# ---------------------------------------------------------------------------------------------------------------
# reset, crop, abandoned steps, held-aside copies
# ---------------------------------------------------------------------------------------------------------------
def test_crop_and_reset_then_continue(backend):
    """Crop inside the tail, into the store (the tail empties, kept store bytes stay as they were), to 0, and reset
    of one sequence; after each, further steps still match the model."""
    run = Run(backend, "float16", "q5_0", tail=4, max_tokens=12, migration=2, seed=9)
    run.step(7)
    run.step(2, [0])  # lengths 9, 7; seq 0: store [0, 6), tail [6, 9)
    assert run.cache.tiers(0) == {"evicted": (0, 0), "store": (0, 6), "tail": (6, 9)}
    kept = run.cache.store_blocks(1, 0)[:, :, :4].copy()
    for target, seq in [(8, 0), (-1, 1), (4, 0)]:  # in the tail; negative; into the store
        run.cache.crop(target, seq=seq)
        run.model.crop(target if target >= 0 else run.model.length(seq) + target, seq)
        check_matches_model(run.cache, run.model)
    assert run.cache.tiers(0) == {"evicted": (0, 0), "store": (0, 4), "tail": (4, 4)}
    assert np.array_equal(run.cache.store_blocks(1, 0), kept), "kept store tokens are not re-quantized"
    run.step(3)
    run.step(1)
    run.cache.reset(seq=1)
    run.model.reset(1)
    check_matches_model(run.cache, run.model)
    run.step(4)  # lengths 12 (= M, nothing evicted yet), 4
    run.cache.crop(0)
    run.model.crop(0, 0)
    run.model.crop(0, 1)
    check_matches_model(run.cache, run.model)
    run.step(6)
    run.cache.reset()
    run.model.reset()
    run.step(2)


def test_crop_after_eviction_refused_and_no_op_allowed(backend):
    run = Run(backend, tail=4, max_tokens=9, migration=2, seed=2)
    run.step(12, [0])
    run.step(3, [1])
    exc = run_bad_call(run.cache, lambda c: lambda: c.crop(10), IndexOutOfRangeError, "max_length")
    assert "evicted" in str(exc)
    run_bad_call(run.cache, lambda c: lambda: c.crop(-1, seq=0), IndexOutOfRangeError, "max_length")
    run_bad_call(run.cache, lambda c: lambda: c.crop(-4, seq=1), IndexOutOfRangeError, "max_length")
    run.cache.crop(12, seq=0)  # no change: allowed
    run.cache.crop(20)  # beyond every length: no change for either
    run.cache.crop(2, seq=1)  # seq 1 has evicted nothing
    run.model.crop(2, 1)
    check_matches_model(run.cache, run.model)
    run.step(2)


def test_abandoned_step_changes_nothing(backend):
    """A step written for every layer (and attended) but never advanced leaves the tail, the store and the counters
    as they were; the next step sees none of its tokens."""
    run = Run(backend, tail=4, max_tokens=9, migration=2, seed=4)
    run.step(6)
    before = run.cache.state()
    step = run.cache.plan(4)
    assert step.tiers[0, 1] > step.tiers[0, 0], "the abandoned step would have migrated"
    junk = np.full((2, 4, 2, 64), 50, np.float32)
    for layer in range(2):
        run.cache.write(step, layer, junk, junk)
        run.cache.attend(step, layer, np.ones((2, 4, 4, 64), np.float32))
    after = run.cache.state()
    for key in ("tail", "store", "lengths", "migrated", "version"):
        assert np.array_equal(after[key], before[key]), key
    run.step(3)  # replaces the abandoned step; the oracle knows nothing of the junk


def test_write_keeps_its_own_copy(backend, rng):
    """write() holds the step aside until advance: the caller may reuse its arrays meanwhile."""
    run = Run(backend, tail=4, max_tokens=9, migration=2, batch=1, seed=8)
    run.step(3)
    k = run.draw_kv(1, 3)
    v = run.draw_kv(1, 3)
    q = run.draw_q(1, 3)
    step = run.cache.plan(3)
    for layer in range(2):
        kk, vv = k[layer].copy(), v[layer].copy()
        run.cache.write(step, layer, kk, vv)
        kk[...] = 1e3
        vv[...] = -1e3
        out = run.cache.attend(step, layer, q[layer])
        np.testing.assert_allclose(out[0], run.model.attention(layer, 0, q[layer, 0], k[layer, 0], v[layer, 0],
                                                               run.scale), rtol=0, atol=ATOL)
    run.cache.advance(step)
    run.model.advance(0, k[:, 0], v[:, 0])
    check_matches_model(run.cache, run.model)


# ---------------------------------------------------------------------------------------------------------------
# refusals: the specific error, naming the argument, and state() bitwise unchanged (with a layer held aside)
# ---------------------------------------------------------------------------------------------------------------
LAYERS = 2


def filled(backend, dtype="float32"):
    """A cache with stored, tail and evicted tokens, a step planned and layer 0 of it written (held aside)."""
    run = Run(backend, dtype, tail=4, max_tokens=9, migration=2, seed=12)
    run.step(11, [0])
    run.step(3, [1])
    return run.cache


def arr(cache, n_seq=2, num_tokens=1, heads=None, dtype=None):
    s = cache.shape
    return np.zeros((n_seq, num_tokens, heads or s.kv_heads, s.head_dim), dtype or s.public_dtype)


def with_pending(cache):
    step = cache.plan(1)
    cache.write(step, 0, arr(cache) + 1, arr(cache) + 2)
    return step


def nonfinite(cache, bad, index=(1, 0, 1, 5)):
    a = arr(cache) + 1
    a[index] = bad
    return a


BAD_CALLS = {
    "k wrong shape": (ShapeError, "k_new", lambda c, st: lambda: c.write(st, 1, arr(c, num_tokens=2), arr(c))),
    "v wrong heads": (ShapeError, "v_new", lambda c, st: lambda: c.write(st, 1, arr(c), arr(c, heads=4))),
    "k wrong dtype": (DTypeError, "k_new", lambda c, st: lambda: c.write(st, 1, arr(c, dtype=np.float64), arr(c))),
    "k not an array": (DTypeError, "k_new", lambda c, st: lambda: c.write(st, 1, arr(c).tolist(), arr(c))),
    "k NaN": (NonFiniteError, "k_new", lambda c, st: lambda: c.write(st, 1, nonfinite(c, np.nan), arr(c))),
    "v +inf": (NonFiniteError, "v_new", lambda c, st: lambda: c.write(st, 1, arr(c), nonfinite(c, np.inf))),
    "v -inf at the end": (NonFiniteError, "v_new",
                          lambda c, st: lambda: c.write(st, 1, arr(c), nonfinite(c, -np.inf, (1, 0, 1, 63)))),
    "layer out of range": (IndexOutOfRangeError, "layer", lambda c, st: lambda: c.write(st, LAYERS, arr(c), arr(c))),
    "negative layer": (IndexOutOfRangeError, "layer", lambda c, st: lambda: c.write(st, -1, arr(c), arr(c))),
    "attend layer": (IndexOutOfRangeError, "layer",
                     lambda c, st: lambda: c.attend(st, LAYERS, np.zeros((2, 1, 4, 64), np.float32))),
    "q dtype": (DTypeError, "q", lambda c, st: lambda: c.attend(st, 0, np.zeros((2, 1, 4, 64), np.float16))),
    "q shape": (ShapeError, "q", lambda c, st: lambda: c.attend(st, 0, np.zeros((2, 1, 2, 64), np.float32))),
    "attend before write": (StaleStepError, "step",
                            lambda c, st: lambda: c.attend(st, 1, np.zeros((2, 1, 4, 64), np.float32))),
    "advance before every layer": (StaleStepError, "step", lambda c, st: lambda: c.advance(st)),
    "materialize before write": (StaleStepError, "step", lambda c, st: lambda: c.materialize(st, 1)),
    "seq out of range": (IndexOutOfRangeError, "seq_ids", lambda c, st: lambda: c.plan(1, [0, 2])),
    "duplicate seq": (ShapeError, "seq_ids", lambda c, st: lambda: c.plan(1, [1, 1])),
    "zero tokens": (ShapeError, "num_tokens", lambda c, st: lambda: c.plan(0)),
    "store_blocks layer": (IndexOutOfRangeError, "layer", lambda c, st: lambda: c.store_blocks(LAYERS)),
    "store_blocks seq": (IndexOutOfRangeError, "seq", lambda c, st: lambda: c.store_blocks(0, 2)),
    "keys layer": (IndexOutOfRangeError, "layer", lambda c, st: lambda: c.keys(-1)),
    "values seq": (IndexOutOfRangeError, "seq", lambda c, st: lambda: c.values(0, 5)),
    "tiers seq": (IndexOutOfRangeError, "seq", lambda c, st: lambda: c.tiers(2)),
    "reset seq": (IndexOutOfRangeError, "seq", lambda c, st: lambda: c.reset(seq=2)),
    "crop not an int": (ShapeError, "max_length", lambda c, st: lambda: c.crop(2.0)),
    "crop after eviction": (IndexOutOfRangeError, "max_length", lambda c, st: lambda: c.crop(5)),
    "crop below zero": (IndexOutOfRangeError, "max_length", lambda c, st: lambda: c.crop(-4, seq=1)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_call_changes_nothing(backend, dtype, name):
    error, argument, make = BAD_CALLS[name]
    cache = filled(backend, dtype)
    step = with_pending(cache)
    exc = run_bad_call(cache, lambda c: make(c, step), error, argument)
    if error is NonFiniteError:
        assert "index" in str(exc)
    # the held-aside layer 0 survives: finishing the step still works
    cache.write(step, 1, arr(cache) + 3, arr(cache) + 4)
    cache.advance(step)
    assert cache.lengths.tolist() == [12, 4]


def test_nonfinite_input_names_argument_and_index(backend):
    cache = filled(backend)
    step = cache.plan(1)
    k = arr(cache)
    k[1, 0, 1, 5] = np.nan
    with pytest.raises(NonFiniteError) as info:
        cache.write(step, 0, k, arr(cache))
    assert info.value.argument == "k_new"
    assert "(1, 0, 1, 5)" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_stale_and_foreign_steps_are_refused(backend):
    cache = filled(backend)
    old = cache.plan(1)
    for layer in range(LAYERS):
        cache.write(old, layer, arr(cache), arr(cache))
    cache.advance(old)
    run_bad_call(cache, lambda c: lambda: c.write(old, 0, arr(c), arr(c)), StaleStepError, "step")
    run_bad_call(cache, lambda c: lambda: c.advance(old), StaleStepError, "step")
    other = filled(backend)
    foreign = other.plan(1)
    run_bad_call(cache, lambda c: lambda: c.write(foreign, 0, arr(c), arr(c)), StaleStepError, "step")
    # a step whose tiers were edited (Step is frozen and its arrays read-only: edit a copy)
    step = cache.plan(1)
    tiers = step.tiers.copy()
    tiers[0, 1] += 2
    edited = dataclasses.replace(step, tiers=tiers)
    run_bad_call(cache, lambda c: lambda: c.write(edited, 0, arr(c), arr(c)), StaleStepError, "step")
    for layer in range(LAYERS):
        cache.write(step, layer, arr(cache), arr(cache))
    run_bad_call(cache, lambda c: lambda: c.advance(edited), StaleStepError, "step")
    cache.advance(step)
    # a step planned before a crop or reset is stale afterwards
    step = cache.plan(1)
    cache.reset(seq=1)
    run_bad_call(cache, lambda c: lambda: c.write(step, 0, arr(c), arr(c)), StaleStepError, "step")


GOOD_SHAPE = kvref.CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=64)


@pytest.mark.parametrize("kwargs, error, argument", [
    ({"migration_batch": 5}, ShapeError, "migration_batch"),
    ({"migration_batch": 0}, ShapeError, "migration_batch"),
    ({"migration_batch": 2.0}, ShapeError, "migration_batch"),
    ({"max_tokens": 3}, ShapeError, "max_tokens"),
    ({"max_tokens": 0}, ShapeError, "max_tokens"),
    ({"tail_tokens": 0}, ShapeError, "tail_tokens"),
    ({"tail_tokens": True}, ShapeError, "tail_tokens"),
    ({"shape": kvref.CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=48)}, ShapeError, "shape.head_dim"),
    ({"shape": kvref.CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=16)}, ShapeError, "shape.head_dim"),
    ({"shape": (2, 4, 2, 64)}, ShapeError, "shape"),
    ({"store_format": "q3_k"}, DTypeError, "store_format"),
    ({"store_format": "Q8_0"}, DTypeError, "store_format"),
    ({"store_format": None}, DTypeError, "store_format"),
    ({"batch": 0}, ShapeError, "batch"),
    ({"backend": "gpu"}, BackendUnavailableError, "backend"),
], ids=lambda p: repr(p) if not isinstance(p, type) else p.__name__)
def test_bad_constructor_arguments(kwargs, error, argument):
    args = {"shape": GOOD_SHAPE, "batch": 1, "tail_tokens": 4, "max_tokens": 9, "store_format": "q8_0",
            "migration_batch": 2, "backend": "python"}
    args.update(kwargs)
    with pytest.raises(error) as info:
        kvref.TwoTierCache(args.pop("shape"), **args)
    assert type(info.value) is error
    assert info.value.argument == argument
    assert str(info.value).startswith(f"{argument}: expected ")


def test_constructor_defaults_and_limits():
    """migration_batch defaults to min(64, R); B = R and M = R are allowed (the smallest store: S = B - 1)."""
    assert kvref.TwoTierCache(GOOD_SHAPE, tail_tokens=100, max_tokens=200, backend="python").migration_batch == 64
    assert kvref.TwoTierCache(GOOD_SHAPE, tail_tokens=8, max_tokens=20, backend="python").migration_batch == 8
    cache = kvref.TwoTierCache(GOOD_SHAPE, tail_tokens=4, max_tokens=4, migration_batch=4, backend="python")
    assert cache.store_tokens == 3
    assert cache.get_max_cache_shape() == 4


@pytest.mark.parametrize("migration", [1, 4])
def test_smallest_caches(backend, migration):
    """M = R (everything past the tail is evicted or migrates in passing) and B = 1 or B = R still match the model,
    through chunks longer than M."""
    run = Run(backend, "float16", "q8_0", tail=4, max_tokens=4, migration=migration, seed=migration)
    for num_tokens, ids in [(3, None), (2, None), (1, [0]), (9, [1]), (1, None), (5, None), (1, None)]:
        run.step(num_tokens, ids)


# ---------------------------------------------------------------------------------------------------------------
# memory: formulas vs the real arrays
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_memory_formula_equals_nbytes(dtype, fmt):
    for shape, batch, tail, max_tokens, migration in [
            (kvref.CacheShape(2, 4, 2, 64, dtype), 2, 4, 9, 2),
            (kvref.CacheShape(3, 8, 1, 128, dtype), 1, 16, 100, 16),
            (kvref.CacheShape(1, 2, 2, 32, dtype), 3, 5, 5, 1)]:
        cache = kvref.TwoTierCache(shape, batch=batch, tail_tokens=tail, max_tokens=max_tokens, store_format=fmt,
                                   migration_batch=migration, backend="python")
        slots = max_tokens - tail + migration - 1
        tail_bytes = 2 * shape.layers * batch * shape.kv_heads * tail * shape.head_dim * shape.element_bytes
        store_bytes = 2 * shape.layers * batch * shape.kv_heads * slots * row_bytes(shape.head_dim, fmt)
        assert cache.nbytes == tail_bytes + store_bytes == cache.kv.nbytes + cache.store.nbytes
        assert memory.two_tier_bytes(shape, batch, tail, max_tokens, fmt, migration) == cache.nbytes
        assert cache.store.dtype == np.uint8
        assert cache.store.shape == (shape.layers, 2, batch, shape.kv_heads, slots, row_bytes(shape.head_dim, fmt))
        stats = cache.stats()
        assert stats["nbytes"] == cache.nbytes and stats["store_slots"] == slots
        assert stats["tail_bytes"] == tail_bytes and stats["store_bytes"] == store_bytes


def test_held_bytes_formula_equals_stats(backend):
    run = Run(backend, "float16", "q4_0", tail=4, max_tokens=9, migration=3, batch=1, seed=6)
    for n in (3, 4, 1, 6, 2):
        run.step(n)
        stats = run.cache.stats()
        held, tail = stats["tokens_held"][0], stats["tokens_in_tail"][0]
        assert memory.two_tier_held_bytes(run.shape, held, tail, "q4_0") == stats["bytes_used"]
        fp16 = held * 2 * 2 * 2 * 64 * 2
        assert stats["compression_vs_fp16"] == pytest.approx(fp16 / stats["bytes_used"])


# ---------------------------------------------------------------------------------------------------------------
# error against an fp32 flat cache, within a bound derived from the formats' error bounds
# ---------------------------------------------------------------------------------------------------------------
def attention_error_bound(q, k, v, dk, dv, scale):
    """A bound on |o~ - o| (per output element d) for one query head q (D,) over keys/values k, v (n, D) when the
    cache holds k + dk, v + dv instead. Scores s_j = scale q.k_j, p = softmax(s) (float64, from the original values),
    score errors e_j = scale q.dk_j, spread w = max_j e_j - min_j e_j. Split o~ - o into the values' part and the
    scores' part:

      values:  |sum_j p~_j dv_jd| <= e^w sum_j p_j |dv_jd|        (p~_j / p_j = e^(e_j) / sum_k p_k e^(e_k) <= e^w)
      scores:  g(t) = o_d(s + t e) has g'(t) = sum_j p_j(t) (v_jd - g(t)) (e_j - c) for any c (the weights
               p_j(t) (v_jd - g(t)) sum to 0); with c the midrange of e, |e_j - c| <= w/2, and the mean absolute
               deviation of values in [min_j v_jd, max_j v_jd] is at most half that range, so by the mean value
               theorem |o_d(s + e) - o_d(s)| <= (w / 2) (max_j v_jd - min_j v_jd) / 2

    plus the float32 rounding of both caches (ATOL). The inputs dk, dv are each within the format's per-element
    bound (oracle.quant_error_bound; fp16 rounding for an fp16 tail), which the test checks too. (Bounding e_j by
    scale * sum_d |q_d| * bound_d instead, from the format bounds alone, is rigorous but assumes every rounding
    error lines up with q: for 4-bit formats it exceeds the whole output range, so it would test nothing.)"""
    p = oracle.softmax(scale * (k @ q))
    e = scale * (dk @ q)
    w = e.max() - e.min()
    return math.exp(w) * (p @ np.abs(dv)) + w / 2 * (v.max(axis=0) - v.min(axis=0)) / 2 + ATOL


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_error_vs_fp32_flat_cache_within_derived_bound(backend, dtype, fmt, rng):
    """Decode 20 tokens (R = 4, M = 20, B = 2) into a two-tier cache and an fp32 FlatCache fed the same float32 K/V.
    While nothing has migrated (fp32 tail) the outputs are equal to float32 rounding. Afterwards every output is
    within ``attention_error_bound`` of the flat cache's, where dk, dv (what the two-tier cache holds minus the
    original float32 values) come from gguf's round trip (store tokens) and NumPy's fp16 rounding (an fp16 tail), not
    from kvref; they are checked against the formats' per-element bounds first."""
    shape32 = kvref.CacheShape(1, 4, 2, 64, "float32")
    shape = kvref.CacheShape(1, 4, 2, 64, dtype)
    tail, max_tokens = 4, 20
    cache = kvref.TwoTierCache(shape, batch=1, tail_tokens=tail, max_tokens=max_tokens, store_format=fmt,
                               migration_batch=2, backend=backend)
    flat = kvref.FlatCache(shape32, batch=1, max_tokens=max_tokens, backend=backend)
    scale = float(kvref.default_scale(64))
    k_all = rng.standard_normal((max_tokens, 2, 64)).astype(np.float32)
    v_all = rng.standard_normal((max_tokens, 2, 64)).astype(np.float32)
    held = {}  # (n, Hkv, D) float64: what the two-tier cache holds of k_all / v_all, tail as given, store round-tripped
    for name, x in (("k", k_all), ("v", v_all)):
        given = x.astype(shape.public_dtype).astype(np.float32)
        stored = oracle.gguf_dequantize(oracle.gguf_quantize(given, fmt), fmt)
        assert np.all(np.abs(stored.astype(np.float64) - given) <= oracle.quant_error_bound(given, fmt))
        if dtype == "float16":
            assert np.all(np.abs(given.astype(np.float64) - x) <= oracle.FP16_REL * np.abs(x) + oracle.FP16_ABS)
        held[name] = (given.astype(np.float64), stored.astype(np.float64))
    ratios, worst = [], 0.0
    for p in range(max_tokens):
        q = rng.standard_normal((1, 1, 4, 64)).astype(np.float32)
        migrated = cache.tiers()["store"][1]  # what this step's query sees in the store
        outs = []
        for c, kk, vv in ((cache, k_all[None, p:p + 1].astype(shape.public_dtype),
                           v_all[None, p:p + 1].astype(shape.public_dtype)),
                          (flat, k_all[None, p:p + 1], v_all[None, p:p + 1])):
            step = c.plan(1)
            c.write(step, 0, kk, vv)
            outs.append(c.attend(step, 0, q)[0, 0])
            c.advance(step)
        err = np.abs(outs[0].astype(np.float64) - outs[1])
        if migrated == 0 and dtype == "float32":
            np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-6, err_msg=f"tail only, p={p}")
            continue
        dk, dv = (np.concatenate([held[n][1][:migrated], held[n][0][migrated:p + 1]]) - x[:p + 1]
                  for n, x in (("k", k_all), ("v", v_all)))
        for qh in range(4):
            h = qh // 2
            limit = attention_error_bound(q[0, 0, qh].astype(np.float64), k_all[:p + 1, h], v_all[:p + 1, h],
                                          dk[:, h], dv[:, h], scale)
            assert np.all(err[qh] <= limit), (p, qh, float((err[qh] - limit).max()))
            ratios.append(float((err[qh] / limit).max()))
            worst = max(worst, float(err[qh].max()) if migrated else 0.0)
    assert cache.tiers()["store"] == (0, max_tokens - tail), "most tokens ended in the store"
    assert max(ratios) > 0.2, "the bound is not vacuous: some output comes within 5x of it"
    assert worst > 1e-4, "the store's quantization shows in the output (else this compares equal things)"


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_error_vs_fp32_ring_cache_after_eviction(backend, fmt, rng):
    """Past M the two-tier cache is a sliding window of M tokens, as a RingCache with window M: decoding 24 tokens
    (R = 3, M = 8, B = 2) the outputs stay within ``attention_error_bound`` of the fp32 ring's, over the window's
    keys."""
    shape = kvref.CacheShape(1, 4, 2, 32, "float32")
    tail, max_tokens, n = 3, 8, 24
    cache = kvref.TwoTierCache(shape, batch=1, tail_tokens=tail, max_tokens=max_tokens, store_format=fmt,
                               migration_batch=2, backend=backend)
    ring = kvref.RingCache(shape, batch=1, window=max_tokens, backend=backend)
    scale = float(kvref.default_scale(32))
    k_all = rng.standard_normal((n, 2, 32)).astype(np.float32)
    v_all = rng.standard_normal((n, 2, 32)).astype(np.float32)
    stored = {name: oracle.gguf_dequantize(oracle.gguf_quantize(x, fmt), fmt).astype(np.float64)
              for name, x in (("k", k_all), ("v", v_all))}
    for p in range(n):
        q = rng.standard_normal((1, 1, 4, 32)).astype(np.float32)
        lo, migrated = cache.tiers()["store"]
        outs = []
        for c in (cache, ring):
            step = c.plan(1)
            c.write(step, 0, k_all[None, p:p + 1], v_all[None, p:p + 1])
            outs.append(c.attend(step, 0, q)[0, 0])
            c.advance(step)
        err = np.abs(outs[0].astype(np.float64) - outs[1])
        window = oracle.window_keys(p, max_tokens)
        assert window[0] >= lo
        in_store = np.array([j < migrated for j in window])[:, None, None]
        dk = np.where(in_store, stored["k"][window] - k_all[window], 0.0)
        dv = np.where(in_store, stored["v"][window] - v_all[window], 0.0)
        for qh in range(4):
            h = qh // 2
            limit = attention_error_bound(q[0, 0, qh].astype(np.float64), k_all[window, h], v_all[window, h],
                                          dk[:, h], dv[:, h], scale)
            assert np.all(err[qh] <= limit), (p, qh)
    assert cache.tiers()["evicted"] == (0, n - max_tokens)
