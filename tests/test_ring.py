"""RingCache on the host backends ("python" = the spec as plain Python, "cpu" = numba.njit), against tests/oracle.py.

Every attention output is compared with ``oracle.window_chunk_attention`` over the *full, unwrapped* K/V that the
list model ``oracle.RingModel`` keeps (it never forgets a row, so the oracle knows nothing about slots or wrapping).
For an fp16 cache the oracle gets the fp16-rounded inputs (``oracle.fp16_round``). What the ring holds
(``held_positions``, ``slot_positions``, ``keys()``/``values()``) is compared with ``RingModel.held`` and the slot
formula of the ``kvref/ring.py`` docstring, written out again here::

    slot(p) = p % W                                  (no sinks)
            = p if p < S else S + (p - S) % (W - S)  (S attention sinks)

The second half checks every validation path: the specific kvref.errors class, that the message names the argument,
and that ``cache.state()`` (including a deferred step's held-aside K/V) is exactly what it was before the call.
"""

import dataclasses
import math

import numpy as np
import pytest

import kvref
import kvref.cpu  # noqa: F401  (the compiled primitives the "cpu" backend uses)
from kvref import memory, shapes
from kvref import ring as kvring
from kvref.errors import DTypeError, IndexOutOfRangeError, KVCacheError, ShapeError, StaleStepError

import oracle
from snapshots import assert_state_equal, values_equal, run_bad_call

BACKENDS = ("python", "cpu")  # the same list as the ``backend`` fixture in conftest.py
DTYPES = ("float32", "float16")
#: float32 compute against the float64 oracle; fp16 storage is widened exactly, the looser bound is a safety margin
ATOL = {"float32": 1e-5, "float16": 5e-5}
#: (q_heads, kv_heads): GQA G=2 (the default), MHA, MQA
HEADS = {"gqa2": (4, 2), "mha": (2, 2), "mqa": (4, 1)}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def slot_of(p, window, sinks=0):
    """The docstring's slot formula, written out independently of kvref.ring.ring_slot."""
    if p < sinks:
        return p
    return sinks + (p - sinks) % (window - sinks)


def expected_deferred(lengths, num_tokens, window):
    """kvref/ring.py: a step is deferred iff C >= 2 and L + C - 1 >= W for one of its sequences."""
    return any(num_tokens >= 2 and n + num_tokens - 1 >= window for n in lengths)






def test_state_comparison_helper_notices_changes():
    """The helper the refusal tests rely on must see a change in any part of a snapshot, nested ones included."""
    base = {"kv": np.zeros(3, np.float32), "pending": {0: (np.zeros(2), np.ones(2))}, "written": [0], "v": 1}
    assert values_equal(base, dict(base))
    for key, changed in [("kv", np.array([0, 0, 1], np.float32)), ("kv", np.zeros(3, np.float64)),
                         ("pending", {0: (np.zeros(2), np.zeros(2))}), ("pending", {}), ("written", [0, 1]),
                         ("v", 2)]:
        assert not values_equal(base, {**base, key: changed}), key


class Run:
    """A ring cache and its list-model mirror. ``step`` plans, writes and attends every layer with fresh random
    data, compares each output with the oracle, advances, and checks what the ring holds."""

    def __init__(self, backend, dtype="float32", layers=2, q_heads=4, kv_heads=2, head_dim=8, batch=1, window=4,
                 sinks=0, seed=0):
        self.shape = kvref.CacheShape(layers, q_heads, kv_heads, head_dim, dtype)
        self.cache = kvref.RingCache(self.shape, batch=batch, window=window, sinks=sinks, backend=backend)
        self.model = oracle.RingModel(layers, batch, window, sinks)
        self.rng = np.random.default_rng(seed)
        self.window, self.sinks, self.batch, self.dtype = window, sinks, batch, dtype
        self.scale = float(np.float32(1.0 / math.sqrt(head_dim)))
        self.atol = ATOL[dtype]

    def draw_kv(self, n_seq, num_tokens):
        """(given to the cache, what the oracle sees): fp16 inputs rounded with oracle.fp16_round."""
        s = self.shape
        raw = self.rng.standard_normal((n_seq, num_tokens, s.kv_heads, s.head_dim))
        if self.dtype == "float16":
            return raw.astype(np.float16), oracle.fp16_round(raw)
        given = raw.astype(np.float32)
        return given, given.astype(np.float64)

    def draw_q(self, n_seq, num_tokens):
        s = self.shape
        return self.rng.standard_normal((n_seq, num_tokens, s.q_heads, s.head_dim)).astype(np.float32)

    def step(self, num_tokens, seq_ids=None, data=None, check_held=True):
        """One full step. ``data``: optional per-layer list of (k, v, q) to use instead of random draws.
        Returns (step, [out per layer])."""
        ids = list(range(self.batch)) if seq_ids is None else list(seq_ids)
        before = {s: self.model.length(s) for s in ids}
        step = self.cache.plan(num_tokens, seq_ids)
        positions = np.array([[before[s] + t for t in range(num_tokens)] for s in ids])
        assert step.seq_ids.tolist() == ids
        assert np.array_equal(step.positions, positions)
        assert step.deferred == expected_deferred(before.values(), num_tokens, self.window)
        outs = []
        for layer in range(self.shape.layers):
            if data is None:
                (k, k64), (v, v64) = self.draw_kv(len(ids), num_tokens), self.draw_kv(len(ids), num_tokens)
                q = self.draw_q(len(ids), num_tokens)
            else:
                k, v, q = data[layer]
                k64, v64 = k.astype(np.float64), v.astype(np.float64)
            self.cache.write(step, layer, k, v)
            for i, s in enumerate(ids):
                self.model.append(layer, s, k64[i], v64[i])
            out = self.cache.attend(step, layer, q)
            assert out.shape == q.shape and out.dtype == np.float32
            for i, s in enumerate(ids):
                expected = oracle.window_chunk_attention(q[i], self.model.keys(layer, s), self.model.values(layer, s),
                                                         positions[i], self.window, self.scale, self.sinks)
                np.testing.assert_allclose(out[i], expected, rtol=0, atol=self.atol,
                                           err_msg=f"layer {layer}, seq {s}, positions {positions[i]}")
            outs.append(out)
        self.cache.advance(step)
        assert self.cache.lengths.tolist() == self.model.lengths()
        if check_held:
            self.check_held()
        return step, outs

    def check_held(self):
        """slot_positions, held_positions and keys()/values() of every layer and sequence against the model."""
        W, S = self.window, self.sinks
        sp = self.cache.slot_positions
        assert sp.shape == (self.shape.layers, self.batch, W) and sp.dtype == np.int64
        for s in range(self.batch):
            held = self.model.held(s)
            slots = np.full(W, -1, np.int64)
            for p in held:
                slots[slot_of(p, W, S)] = p
            for layer in range(self.shape.layers):
                assert np.array_equal(sp[layer, s], slots), f"layer {layer} seq {s}: {sp[layer, s]} != {slots}"
                assert self.cache.held_positions(s, layer).tolist() == held
                for got, want in ((self.cache.keys(layer, s), self.model.keys(layer, s, held)),
                                  (self.cache.values(layer, s), self.model.values(layer, s, held))):
                    assert got.dtype == self.shape.public_dtype
                    assert got.shape == (self.shape.kv_heads, len(held), self.shape.head_dim)
                    if held:
                        assert np.array_equal(got.astype(np.float64), want), f"layer {layer}, seq {s}"


def naive_write_first_attention(q, k_all, v_all, positions, window, scale):
    """What a ring that writes a whole chunk *before* attending computes (rasbt/LLMs-from-scratch #1013): once the
    chunk is in, the ring holds only the last W positions up to the chunk's end, so query i sees
    window_keys(i) minus the positions the chunk has already overwritten. Returns (outputs, visible sets)."""
    last = int(positions[-1])
    held = set(range(max(0, last - window + 1), last + 1))
    out = np.zeros(np.asarray(q).shape, np.float64)
    seen = []
    for t, p in enumerate(positions):
        keys = [j for j in oracle.window_keys(int(p), window) if j in held]
        seen.append(keys)
        out[t] = oracle.decode_attention_gqa(q[t], k_all[:, keys], v_all[:, keys], scale)
    return out, seen


# ---------------------------------------------------------------------------------------------------------------
# the window rule and the slot formula, spec against oracle
# ---------------------------------------------------------------------------------------------------------------
def test_visible_matches_oracle_window_keys_with_sinks():
    """kvref.visible(i, j, W, S) is true exactly for the oracle's window_keys(i, W, S); at most W keys."""
    for window, sinks in [(1, 0), (3, 0), (4, 1), (5, 2), (6, 5)]:
        for i in range(3 * window + 2):
            keys = oracle.window_keys(i, window, sinks)
            assert len(keys) == min(window, i + 1)
            got = [j for j in range(-2, i + 4) if kvref.visible(i, j, window, sinks)]
            assert got == keys, (i, window, sinks)


def test_spec_slot_formula():
    """ring_slot is the docstring formula; kept_after_step keeps sinks and the last W - S positions of a step."""
    for window, sinks in [(1, 0), (4, 0), (5, 2), (4, 3)]:
        for p in range(4 * window):
            assert kvring.ring_slot(p, window, sinks) == slot_of(p, window, sinks)
            for last in range(p, p + 2 * window):
                kept = p < sinks or last - p < window - sinks
                assert kvring.kept_after_step(p, last, window, sinks) == kept


# ---------------------------------------------------------------------------------------------------------------
# three-way agreement: each backend vs the oracle, and python vs cpu
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", list(HEADS), ids=list(HEADS))
def test_prefill_chunks_and_decode_match_oracle(backend, dtype, heads):
    q_heads, kv_heads = HEADS[heads]
    run = Run(backend, dtype, q_heads=q_heads, kv_heads=kv_heads, batch=2, window=5, seed=len(heads))
    run.step(3)  # prefill, no wrap
    run.step(4, seq_ids=[1])  # seq 1 wraps inside a deferred chunk
    for _ in range(4):
        run.step(1)  # decode; seq 0 wraps on the way
    run.step(7, seq_ids=[0])  # a chunk longer than the ring
    run.step(2, seq_ids=[1, 0])
    run.step(1)
    assert all(n > 2 * 5 for n in run.cache.lengths.tolist())


@pytest.mark.parametrize("dtype", DTYPES)
def test_python_and_cpu_agree(dtype):
    """The same steps on both backends: identical bytes and slot positions, attention within float32 rounding."""
    runs = {b: Run(b, dtype, batch=2, window=4, sinks=0, seed=11) for b in BACKENDS}
    for num_tokens, ids in [(3, None), (3, None), (1, [1]), (6, [0]), (1, None), (2, [1, 0])]:
        outs = {b: run.step(num_tokens, ids)[1] for b, run in runs.items()}
        for a, b in zip(outs["python"], outs["cpu"]):
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)
        assert runs["python"].cache.kv.tobytes() == runs["cpu"].cache.kv.tobytes()
        assert np.array_equal(runs["python"].cache.slot_positions, runs["cpu"].cache.slot_positions)
    assert runs["python"].cache.stats() | {"backend": "x"} == runs["cpu"].cache.stats() | {"backend": "x"}


# ---------------------------------------------------------------------------------------------------------------
# wrap boundaries
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("last", ["W-1", "W", "W+1", "2W"])
@pytest.mark.parametrize("window", [3, 5])
def test_decode_across_the_wrap(backend, window, last):
    """Decode token by token up to position p = W-1, W, W+1 or 2W: every step's attention matches the oracle, and
    afterwards slot p % W holds p for the last W positions (-1 in slots never written)."""
    p_last = {"W-1": window - 1, "W": window, "W+1": window + 1, "2W": 2 * window}[last]
    run = Run(backend, window=window, seed=p_last)
    for p in range(p_last + 1):
        step, _ = run.step(1)
        assert not step.deferred, "a decode step is never deferred"
        assert step.slots.tolist() == [[p % window]]
    held = list(range(max(0, p_last - window + 1), p_last + 1))
    assert run.cache.held_positions().tolist() == held
    expected = np.full(window, -1)
    for p in held:
        expected[p % window] = p
    assert np.array_equal(run.cache.slot_positions[:, 0], np.broadcast_to(expected, (2, window)))
    assert run.cache.is_full() == (p_last + 1 >= window)
    assert run.cache.remaining_capacity() == max(0, window - p_last - 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", ["W-1", "W", "W+1", "2W", "2W+1"])
def test_prefill_one_chunk_then_decode(backend, dtype, length):
    window = 4
    n = {"W-1": window - 1, "W": window, "W+1": window + 1, "2W": 2 * window, "2W+1": 2 * window + 1}[length]
    run = Run(backend, dtype, window=window, seed=n)
    step, _ = run.step(n)
    assert step.deferred == (n >= window + 1)
    # slots: only the tokens the ring keeps get one, and no two tokens of the step share a slot
    kept = [p >= n - window for p in range(n)]
    assert step.slots[0].tolist() == [p % window if k else -1 for p, k in zip(range(n), kept)]
    used = step.slots[step.slots >= 0].tolist()
    assert len(used) == len(set(used)) == min(n, window)
    for _ in range(window + 1):
        assert not run.step(1)[0].deferred


# ---------------------------------------------------------------------------------------------------------------
# chunked prefill that wraps (rasbt/LLMs-from-scratch #1013)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_wrapping_chunk_is_deferred_and_correct(backend, dtype):
    """W = 4, prefill 3, then a chunk of 3 (positions 3, 4, 5). Writing the chunk first would put 4 and 5 over
    positions 0 and 1, which query 3 still needs. kvref defers the write: the outputs match the oracle, while the
    write-first answer is measurably different, so the bug the deferral prevents is real."""
    window = 4
    run = Run(backend, dtype, batch=1, window=window, seed=1013)
    assert not run.step(3)[0].deferred
    step = run.cache.plan(3)
    assert step.deferred and step.positions.tolist() == [[3, 4, 5]]
    # during the deferred step the ring still holds 0, 1, 2 for every layer until advance
    data = []
    for layer in range(2):
        (k, _), (v, _) = run.draw_kv(1, 3), run.draw_kv(1, 3)
        data.append((k, v, run.draw_q(1, 3)))
    _, outs = run.step(3, data=data)
    for layer in range(2):
        k_all, v_all = run.model.keys(layer, 0), run.model.values(layer, 0)
        q = data[layer][2][0]
        right = oracle.window_chunk_attention(q, k_all, v_all, [3, 4, 5], window, run.scale)
        naive, seen = naive_write_first_attention(q, k_all, v_all, [3, 4, 5], window, run.scale)
        assert seen[0] == [2, 3] and oracle.window_keys(3, window) == [0, 1, 2, 3]
        assert seen[1] == [2, 3, 4] and oracle.window_keys(4, window) == [1, 2, 3, 4]
        np.testing.assert_allclose(outs[layer][0], right, rtol=0, atol=ATOL[dtype])
        assert np.abs(naive[0] - right[0]).max() > 1e-2, "write-first loses keys 0 and 1 for query 3"
        assert np.abs(outs[layer][0, 0] - naive[0]).max() > 1e-2
        np.testing.assert_allclose(naive[2], right[2], atol=1e-12)  # the last query needed nothing overwritten


def test_ring_holds_its_old_keys_until_a_deferred_step_advances(backend):
    run = Run(backend, window=4, seed=3)
    run.step(3)
    step = run.cache.plan(3)
    assert step.deferred
    slots_before = run.cache.slot_positions.copy()
    kv_before = run.cache.kv.copy()
    k = np.ones((1, 3, 2, 8), np.float32)
    for layer in range(2):
        run.cache.write(step, layer, k, k)
        assert np.array_equal(run.cache.slot_positions, slots_before)
        assert np.array_equal(run.cache.kv, kv_before)
    assert run.cache.stats()["pending_bytes"] == 2 * 2 * (3 * 2 * 8 * 4)  # K and V of 3 tokens, 2 layers
    run.cache.advance(step)
    assert run.cache.held_positions().tolist() == [2, 3, 4, 5]
    assert run.cache.stats()["pending_bytes"] == 0
    assert np.array_equal(run.cache.keys(1)[:, 1:], np.ones((2, 3, 8), np.float32))


@pytest.mark.parametrize("length, num_tokens", [(0, 4), (1, 3), (3, 1), (2, 2), (0, 5), (2, 3), (3, 2), (4, 2),
                                                (1, 9), (6, 1), (7, 4)])
def test_deferral_rule(backend, length, num_tokens):
    """Deferred iff C >= 2 and L + C - 1 >= W (W = 4): L + C <= W never is, a decode step never is. Either way the
    outputs match the oracle."""
    run = Run(backend, window=4, seed=length * 10 + num_tokens)
    if length:
        run.step(length)
    step, _ = run.step(num_tokens)
    assert step.deferred == (num_tokens >= 2 and length + num_tokens - 1 >= 4)
    if length + num_tokens <= 4 or num_tokens == 1:
        assert not step.deferred


def test_decode_is_never_deferred(backend):
    cache = Run(backend, window=3).cache
    k = np.zeros((2, 1, 1, 2, 8), np.float32)
    for _ in range(10):
        assert not cache.plan(1).deferred
        cache.append(k, k)


def test_batch_mixing_deferred_and_plain_sequences(backend):
    """One sequence needs the deferral, the other does not: the step is deferred for both, both stay exact."""
    run = Run(backend, batch=2, window=4, seed=5)
    run.step(1, seq_ids=[1])
    run.step(2, seq_ids=[0])  # lengths [2, 1]
    step, _ = run.step(2)  # seq 0: 2 + 2 - 1 = 3 < 4; seq 1: 1 + 2 - 1 = 2: nothing deferred
    assert not step.deferred
    step, _ = run.step(2, seq_ids=[1, 0])  # seq 0: 4 + 1 >= 4 -> deferred; seq 1 (3): 3 + 1 >= 4 -> deferred
    assert step.deferred
    run.step(3, seq_ids=[0])
    step, _ = run.step(1)
    assert not step.deferred


# ---------------------------------------------------------------------------------------------------------------
# attention sinks
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sinks", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sinks_long_decode_and_chunks(backend, dtype, sinks):
    window = 5
    run = Run(backend, dtype, batch=2, window=window, sinks=sinks, seed=sinks)
    run.step(3)
    sink_k = [run.cache.keys(layer, s)[:, :sinks].copy() for layer in range(2) for s in range(2)]
    schedule = [1] * (3 * window) + [4, 1, 7, 2, 1, 3 * window, 1]
    for i, num_tokens in enumerate(schedule):
        run.step(num_tokens, seq_ids=[i % 2] if num_tokens > 1 else None)
        # the sink slots keep positions 0 .. S-1 and their original K forever
        assert np.array_equal(run.cache.slot_positions[:, :, :sinks],
                              np.broadcast_to(np.arange(sinks), (2, 2, sinks)))
        now = [run.cache.keys(layer, s)[:, :sinks] for layer in range(2) for s in range(2)]
        assert all(np.array_equal(a, b) for a, b in zip(sink_k, now))
    assert min(run.cache.lengths.tolist()) > 4 * window


def test_sinks_chunk_from_empty_longer_than_ring(backend):
    """A first chunk of 3W tokens with S = 2: positions 0, 1 keep slots 0, 1 and the last W - S go round the rest."""
    window, sinks = 5, 2
    run = Run(backend, window=window, sinks=sinks, seed=8)
    step, _ = run.step(3 * window)
    assert step.deferred
    kept = [p < sinks or p >= 3 * window - (window - sinks) for p in range(3 * window)]
    assert step.slots[0].tolist() == [slot_of(p, window, sinks) if k else -1 for p, k in enumerate(kept)]
    assert run.cache.held_positions().tolist() == [0, 1, 12, 13, 14]
    run.step(1)
    assert run.cache.held_positions().tolist() == [0, 1, 13, 14, 15]


# ---------------------------------------------------------------------------------------------------------------
# with W >= every length the ring is the flat cache
# ---------------------------------------------------------------------------------------------------------------
def assert_same_arithmetic(backend, got, want):
    """The spec (python backend) runs the very same float32 operations: bit-identical. A compiled backend runs the
    same tiles and arithmetic too, but under fast-math (reassociation, contraction) two compiled functions are not
    bound to round alike: one function's JIT-compiled code and the object code Numba caches on disk for it were
    measured to differ by 1 ulp in 6 of 1,152 outputs, so a ring compiled in this process against a flat kernel
    loaded from the cache (or the reverse: it depends on which ran first) agree to float32 rounding only."""
    if backend == "python":
        assert np.array_equal(got, want), "bit-identical to the flat cache"
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", [[1] * 9, [5, 1, 1, 7, 1, 3]], ids=["decode", "chunks"])
def test_unwrapped_ring_equals_flat_cache_bitwise(backend, dtype, schedule):
    window = sum(schedule) + 2
    shape = kvref.CacheShape(2, 4, 2, 8, dtype)
    ring = kvref.RingCache(shape, batch=2, window=window, backend=backend)
    flat = kvref.FlatCache(shape, batch=2, max_tokens=window, backend=backend)
    rng = np.random.default_rng(len(schedule))
    for num_tokens in schedule:
        sr, sf = ring.plan(num_tokens), flat.plan(num_tokens)
        assert not sr.deferred
        assert np.array_equal(sr.slots, sf.slots) and np.array_equal(sr.positions, sf.positions)
        for layer in range(2):
            k = rng.standard_normal((2, num_tokens, 2, 8)).astype(dtype)
            v = rng.standard_normal((2, num_tokens, 2, 8)).astype(dtype)
            q = rng.standard_normal((2, num_tokens, 4, 8)).astype(np.float32)
            ring.write(sr, layer, k, v)
            flat.write(sf, layer, k, v)
            assert ring.kv.tobytes() == flat.kv.tobytes()
            out_r, out_f = ring.attend(sr, layer, q), flat.attend(sf, layer, q)
            assert_same_arithmetic(backend, out_r, out_f)
        ring.advance(sr)
        flat.advance(sf)
    assert ring.nbytes == flat.nbytes and ring.kv.shape == flat.kv.shape
    for layer in range(2):
        for s in range(2):
            assert np.array_equal(ring.keys(layer, s), flat.keys(layer, s))
            assert np.array_equal(ring.values(layer, s), flat.values(layer, s))


# ---------------------------------------------------------------------------------------------------------------
# slot order does not matter
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sinks", [0, 1])
def test_different_chunkings_reach_the_same_ring_and_answer(backend, sinks):
    """The same 11 (position, key) pairs fed as one chunk, as decode steps and as mixed chunks (some deferred):
    identical ring bytes and slot positions, and a bit-identical next decode step."""
    window, total = 4, 11
    shape = kvref.CacheShape(2, 4, 2, 8)
    rng = np.random.default_rng(99)
    k = rng.standard_normal((2, 1, total + 1, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, 1, total + 1, 2, 8)).astype(np.float32)
    q = rng.standard_normal((1, 1, 4, 8)).astype(np.float32)
    results = []
    for chunks in ([11], [1] * 11, [3, 3, 3, 2], [5, 1, 4, 1], [2, 9]):
        assert sum(chunks) == total
        cache = kvref.RingCache(shape, batch=1, window=window, sinks=sinks, backend=backend)
        start = 0
        for c in chunks:
            cache.append(k[:, :, start:start + c], v[:, :, start:start + c])
            start += c
        step = cache.plan(1)
        for layer in range(2):
            cache.write(step, layer, k[layer, :, total:], v[layer, :, total:])
        out = cache.attend(step, 1, q)
        results.append((cache.kv.copy(), cache.slot_positions.copy(), out))
        expected = oracle.window_chunk_attention(q[0], k[1, 0].transpose(1, 0, 2), v[1, 0].transpose(1, 0, 2),
                                                 [total], window, float(kvref.default_scale(8)), sinks)
        np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-5)
    for kv, slots, out in results[1:]:
        assert kv.tobytes() == results[0][0].tobytes()
        assert np.array_equal(slots, results[0][1])
        assert np.array_equal(out, results[0][2])


def test_spec_attention_is_invariant_under_slot_permutation(rng):
    """Call the spec's attend_tokens on a ring and on the same ring with its slots permuted (K, V and stored
    positions moved together): the same answer up to float32 summation order, and both equal the oracle."""
    W, D, Hq, Hkv = 6, 8, 4, 2
    kv = rng.standard_normal((1, 2, 1, Hkv, W, D)).astype(np.float32)
    slot_positions = np.array([[[12, 7, 8, 9, 10, 11]]], np.int64)  # a ring that wrapped: position p in slot p % 6
    q = rng.standard_normal((1, 1, Hq, D)).astype(np.float32)
    positions = np.array([[12]], np.int64)
    seq_ids = np.array([0], np.int64)
    empty = np.zeros((1, 0, Hkv, D), np.float32)
    scale = kvref.default_scale(D)
    base = np.zeros_like(q)
    kvring.attend_tokens(kv, slot_positions, 0, seq_ids, positions, empty, empty, W, 0, q, scale, base, Hq // Hkv, D)
    order = [p % W for p in range(7, 13)]  # slots in position order
    keys = kv[0, 0, 0][:, order].astype(np.float64)
    values = kv[0, 1, 0][:, order].astype(np.float64)
    expected = oracle.decode_attention_gqa(q[0, 0], keys, values, float(scale))
    np.testing.assert_allclose(base[0, 0], expected, rtol=0, atol=1e-5)
    for perm in ([5, 4, 3, 2, 1, 0], [2, 0, 5, 1, 4, 3], [1, 2, 3, 4, 5, 0]):
        out = np.zeros_like(q)
        kvring.attend_tokens(np.ascontiguousarray(kv[..., perm, :]), np.ascontiguousarray(slot_positions[..., perm]),
                             0, seq_ids, positions, empty, empty, W, 0, q, scale, out, Hq // Hkv, D)
        np.testing.assert_allclose(out, base, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# per-layer addressing and byte offsets
# ---------------------------------------------------------------------------------------------------------------
def test_writes_to_one_layer_never_touch_another(backend, rng):
    layers, window, batch = 4, 3, 2
    shape = kvref.CacheShape(layers, 4, 2, 8)
    cache = kvref.RingCache(shape, batch=batch, window=window, backend=backend)
    for num_tokens in (2, 1, 4, 1):  # wraps, incl. a deferred step
        step = cache.plan(num_tokens)
        for layer in range(layers):
            before = cache.kv.copy()
            slots_before = cache.slot_positions.copy()
            k = (rng.standard_normal((batch, num_tokens, 2, 8)) + 10 * layer).astype(np.float32)
            cache.write(step, layer, k, -k)
            others = [other for other in range(layers) if other != layer]
            assert np.array_equal(cache.kv[others], before[others]), f"writing layer {layer} changed another"
            assert np.array_equal(cache.slot_positions[others], slots_before[others])
        cache.advance(step)
    for layer in range(layers):
        keys = cache.keys(layer, 1)
        assert np.all(np.abs(keys - 10 * layer) < 6), "each layer holds its own data"
        assert np.array_equal(cache.values(layer, 1), -keys)


def test_shapes_offsets_match_ring_storage(rng):
    """kvref.shapes' byte offsets, with max_tokens = W, are the addresses of the ring's own K and V blocks."""
    shape = kvref.CacheShape(3, 4, 2, 8, "float16")
    batch, window = 2, 5
    cache = kvref.RingCache(shape, batch=batch, window=window, backend="python")
    k = rng.standard_normal((3, batch, 7, 2, 8)).astype(np.float16)
    cache.append(k, -k)
    buf = cache.kv
    assert buf.shape == shapes.buffer_dims(shape, batch, window) == (3, 2, batch, 2, window, 8)
    assert buf.flags.c_contiguous
    raw = buf.reshape(-1).view(np.uint8)
    half = shapes.layer_bytes(shape, batch, window) // 2
    assert shapes.layer_bytes(shape, batch, window) == buf.strides[0]
    for layer in range(3):
        assert shapes.layer_offset(shape, batch, window, layer) == layer * buf.strides[0]
        assert shapes.k_offset(shape, batch, window, layer) == layer * buf.strides[0]
        assert shapes.v_offset(shape, batch, window, layer) == layer * buf.strides[0] + buf.strides[1]
        k_block = raw[shapes.k_offset(shape, batch, window, layer):][:half].view(np.uint16)
        v_block = raw[shapes.v_offset(shape, batch, window, layer):][:half].view(np.uint16)
        assert np.array_equal(k_block.reshape(batch, 2, window, 8), buf[layer, 0])
        assert np.array_equal(v_block.reshape(batch, 2, window, 8), buf[layer, 1])
        # position 6 lives in slot 6 % 5 = 1 of every sequence
        for s in range(batch):
            offset = shapes.element_offset(shape, batch, window, layer, 0, s, 1, 1, 0)
            assert raw[offset:offset + 16].view(np.float16).tolist() == k[layer, s, 6, 1].tolist()
    for idx in [(0, 0, 0, 0, 0, 0), (2, 1, 1, 1, 4, 7), (1, 0, 1, 0, 3, 2)]:
        assert shapes.element_offset(shape, batch, window, *idx) == int(np.dot(idx, buf.strides))


# ---------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_nbytes_is_the_formula_and_constant(backend, dtype, rng):
    shape = kvref.CacheShape(2, 8, 2, 8, dtype)
    batch, window = 3, 4
    cache = kvref.RingCache(shape, batch=batch, window=window, backend=backend)
    expected = memory.cache_bytes(shape, batch, window)
    assert expected == 2 * 2 * batch * 2 * window * 8 * shape.element_bytes
    assert cache.nbytes == expected == cache.kv.nbytes
    # sized by KV heads: the query-head formula would be q_heads / kv_heads = 4x larger
    assert cache.kv.shape[3] == 2
    assert memory.wrong_heads_bytes(shape, batch, window) == 4 * cache.nbytes
    for num_tokens in (3, 1, 9, 1, 20):
        k = rng.standard_normal((2, batch, num_tokens, 2, 8)).astype(dtype)
        cache.append(k, k)
        assert cache.nbytes == expected and cache.kv.shape == (2, 2, batch, 2, window, 8)
        assert cache.stats()["nbytes"] == expected
    assert cache.get_seq_length() == 34 and cache.get_max_cache_shape() == window


def test_stats_fields(backend, rng):
    shape = kvref.CacheShape(3, 4, 2, 8, "float16")
    batch, window = 3, 5
    cache = kvref.RingCache(shape, batch=batch, window=window, sinks=1, backend=backend)
    for num_tokens, ids in [(2, None), (6, [1]), (1, [2]), (9, [2])]:
        k = rng.standard_normal((3, len(ids) if ids else batch, num_tokens, 2, 8)).astype(np.float16)
        cache.append(k, k, seq_ids=ids)
    lengths = [2, 8, 12]
    stats = cache.stats()
    token_bytes = 2 * 3 * 2 * 8 * 2
    assert stats["lengths"] == lengths == cache.lengths.tolist()
    assert stats["tokens_held"] == [min(n, window) for n in lengths] == [2, 5, 5]
    assert stats["tokens_overwritten"] == [0, 3, 7]
    assert stats["window"] == window and stats["sinks"] == 1 and stats["batch"] == batch
    assert stats["utilization"] == pytest.approx(12 / 15)
    assert stats["bytes_per_token"] == token_bytes == cache.token_bytes
    assert stats["bytes_used"] == 12 * token_bytes
    assert stats["nbytes"] == cache.nbytes == batch * window * token_bytes
    assert stats["position_bytes"] == 3 * batch * window * 8
    assert stats["element_bytes"] == 2 and stats["dtype"] == "float16" and stats["backend"] == backend
    assert stats["variant"] == "ring" and stats["pending_bytes"] == 0
    for s, n in enumerate(lengths):
        assert len(cache.held_positions(s)) == stats["tokens_held"][s]
        assert cache.remaining_capacity(s) == window - stats["tokens_held"][s]
        assert cache.is_full(s) == (n >= window)


# ---------------------------------------------------------------------------------------------------------------
# batch independence
# ---------------------------------------------------------------------------------------------------------------
def test_batch_sequences_stay_independent(backend):
    run = Run(backend, batch=3, window=4, seed=21)
    plan = [(5, [0, 1, 2]), (3, [1]), (1, [2, 0]), (1, [1]), (6, [2]), (2, [0, 2]), (1, None)]
    for num_tokens, ids in plan:
        run.step(num_tokens, ids)
    assert run.cache.lengths.tolist() == [9, 10, 15]


def test_batch_values_never_mix(backend, rng):
    """V of sequence s is s + 1 everywhere, so each sequence's attention output must be exactly s + 1."""
    cache = kvref.RingCache(kvref.CacheShape(2, 4, 2, 8), batch=3, window=3, backend=backend)
    for num_tokens, ids in [(4, [0, 1, 2]), (2, [1]), (1, [2, 0]), (5, [2]), (1, [0, 1, 2])]:
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
    assert cache.lengths.tolist() == [6, 7, 11]


# ---------------------------------------------------------------------------------------------------------------
# reset and crop
# ---------------------------------------------------------------------------------------------------------------
def test_reset_one_and_all(backend):
    run = Run(backend, batch=2, window=4, seed=4)
    run.step(6)
    kv_before = run.cache.kv.copy()
    slots_seq0 = run.cache.slot_positions[:, 0].copy()
    run.cache.reset(seq=1)
    run.model.reset(seq=1)
    assert run.cache.lengths.tolist() == [6, 0]
    assert np.all(run.cache.slot_positions[:, 1] == -1), "reset clears the sequence's slot positions"
    assert np.array_equal(run.cache.slot_positions[:, 0], slots_seq0), "the other sequence is untouched"
    assert np.array_equal(run.cache.kv, kv_before), "reset does not touch the K/V bytes"
    assert run.cache.stats()["tokens_held"] == [4, 0]
    run.check_held()
    run.step(2)  # seq 1 restarts at position 0 and sees only its new tokens
    run.step(3, seq_ids=[1])
    run.cache.reset()
    run.model.reset()
    assert run.cache.lengths.tolist() == [0, 0]
    assert np.all(run.cache.slot_positions == -1)
    run.step(5)
    run.step(1)


@pytest.mark.parametrize("sinks, fill, max_length, seq", [
    (0, 3, 1, None),  # not wrapped
    (0, 4, -2, None),  # not wrapped (length == W), negative
    (0, 3, 0, 0),  # to empty, one sequence
    (0, 9, 0, None),  # wrapped, keeps nothing: target 0 <= S = 0
    (2, 9, 2, None),  # wrapped, keeps only the sinks
    (2, 9, 1, 1),  # wrapped, keeps one sink
    (0, 9, 9, None),  # wrapped, no change
    (1, 9, 100, None),  # wrapped, a target past the length changes nothing
    (2, 9, -9, 0),  # wrapped, drops everything
])
def test_allowed_crop_matches_model(backend, sinks, fill, max_length, seq):
    run = Run(backend, batch=2, window=4, sinks=sinks, seed=fill)
    run.step(fill)
    seqs = [0, 1] if seq is None else [seq]
    for s in seqs:
        target = max_length if max_length >= 0 else fill + max_length
        assert run.model.crop_allowed(target, s)
    run.cache.crop(max_length, seq=seq)
    for s in seqs:
        target = max_length if max_length >= 0 else fill + max_length
        run.model.crop(min(target, fill), s)
    assert run.cache.lengths.tolist() == run.model.lengths()
    run.check_held()
    run.step(1)  # new tokens land right after the kept ones and see exactly the oracle's window
    run.step(3)
    run.step(1)


def test_crop_accepts_numpy_integers(backend):
    cache = Run(backend, window=8).cache
    k = np.ones((2, 1, 6, 2, 8), np.float32)
    cache.append(k, k)
    cache.crop(np.int8(-1))
    assert cache.lengths.tolist() == [5]
    cache.crop(np.int64(2))
    assert cache.held_positions().tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------------------------
# bad inputs: the specific error, the argument named, the state unchanged
# ---------------------------------------------------------------------------------------------------------------
LAYERS = 2


def filled_ring(backend, dtype="float32"):
    """layers=2, q_heads=4, kv_heads=2, D=8, batch=2, W=4, lengths [6, 2]: sequence 0 has wrapped."""
    cache = kvref.RingCache(kvref.CacheShape(LAYERS, 4, 2, 8, dtype), batch=2, window=4, backend=backend)
    rng = np.random.default_rng(7)
    k = rng.standard_normal((LAYERS, 2, 2, 2, 8)).astype(dtype)
    cache.append(k, -k)
    k = rng.standard_normal((LAYERS, 1, 4, 2, 8)).astype(dtype)
    cache.append(k, -k, seq_ids=[0])
    assert cache.lengths.tolist() == [6, 2]
    return cache


def arr(c, n_seq=2, T=1, heads=None, dtype=None, dim=None):
    s = c.shape
    dims = (n_seq, T, s.kv_heads if heads is None else heads, s.head_dim if dim is None else dim)
    return np.ones(dims, dtype=s.public_dtype if dtype is None else dtype)


def q_arr(c, n_seq=2, T=1, heads=None, dtype=np.float32):
    return arr(c, n_seq, T, c.shape.q_heads if heads is None else heads, dtype)


def five_d(c, n_seq=2, T=1, layers=None, dtype=None):
    s = c.shape
    dims = (s.layers if layers is None else layers, n_seq, T, s.kv_heads, s.head_dim)
    return np.ones(dims, dtype=s.public_dtype if dtype is None else dtype)


def _advanced(c):
    step = c.plan(1)
    for layer in range(LAYERS):
        c.write(step, layer, arr(c), arr(c))
    c.advance(step)
    return step


def _written(c, layers=(0,), T=1, ids=None):
    """A step with only some layers written (for T = 3 on sequence 0, a deferred step)."""
    step = c.plan(T, ids)
    n = step.seq_ids.size
    for layer in layers:
        c.write(step, layer, arr(c, n, T), arr(c, n, T))
    return step


def _deferred(c, layers=(0,)):
    step = _written(c, layers, T=3, ids=[0])
    assert step.deferred
    return step


def _reset_after_plan(c):
    step = c.plan(1, [0])
    c.reset(seq=1)
    return step


def _cropped_after_plan(c):
    step = c.plan(1, [0])
    c.crop(-1, seq=1)
    return step


class Other:
    """Stands in for something that is not a Step."""


# Each case: (id, setup(cache) -> thunk that must raise, error class, argument named).
# setup may change the cache (e.g. write a layer); the snapshot is taken after setup, right before the thunk.
BAD_CALLS = [
    # plan
    ("plan_zero_tokens", lambda c: lambda: c.plan(0), ShapeError, "num_tokens"),
    ("plan_float_tokens", lambda c: lambda: c.plan(2.0), ShapeError, "num_tokens"),
    ("plan_duplicate_seq_ids", lambda c: lambda: c.plan(1, [1, 1]), ShapeError, "seq_ids"),
    ("plan_seq_id_past_batch", lambda c: lambda: c.plan(1, [2]), IndexOutOfRangeError, "seq_ids"),
    ("plan_negative_seq_id", lambda c: lambda: c.plan(1, [0, -1]), IndexOutOfRangeError, "seq_ids"),
    ("plan_empty_seq_ids", lambda c: lambda: c.plan(1, []), ShapeError, "seq_ids"),
    # write: shapes, dtypes, layer
    ("write_k_query_heads", lambda c: (lambda s: lambda: c.write(s, 0, arr(c, heads=4), arr(c)))(c.plan(1)),
     ShapeError, "k_new"),
    ("write_k_wrong_T", lambda c: (lambda s: lambda: c.write(s, 0, arr(c, T=2), arr(c)))(c.plan(1)),
     ShapeError, "k_new"),
    ("write_k_wrong_n_seq", lambda c: (lambda s: lambda: c.write(s, 0, arr(c), arr(c)))(c.plan(1, [1])),
     ShapeError, "k_new"),
    ("write_k_wrong_dim", lambda c: (lambda s: lambda: c.write(s, 0, arr(c, dim=4), arr(c)))(c.plan(1)),
     ShapeError, "k_new"),
    ("write_v_wrong_shape", lambda c: (lambda s: lambda: c.write(s, 0, arr(c), arr(c, T=3)))(c.plan(1)),
     ShapeError, "v_new"),
    ("write_deferred_v_wrong_shape", lambda c: (lambda s: lambda: c.write(s, 1, arr(c, 1, 3), arr(c, 1, 2)))(
        _deferred(c)), ShapeError, "v_new"),
    ("write_k_float64", lambda c: (lambda s: lambda: c.write(s, 0, arr(c, dtype=np.float64), arr(c)))(c.plan(1)),
     DTypeError, "k_new"),
    ("write_v_float16_into_fp32", lambda c: (lambda s: lambda: c.write(s, 0, arr(c), arr(c, dtype=np.float16)))(
        c.plan(1)), DTypeError, "v_new"),
    ("write_deferred_k_float64", lambda c: (lambda s: lambda: c.write(s, 1, arr(c, 1, 3, dtype=np.float64),
                                                                      arr(c, 1, 3)))(_deferred(c)),
     DTypeError, "k_new"),
    ("write_k_list", lambda c: (lambda s: lambda: c.write(s, 0, arr(c).tolist(), arr(c)))(c.plan(1)),
     DTypeError, "k_new"),
    ("write_layer_past_end", lambda c: (lambda s: lambda: c.write(s, LAYERS, arr(c), arr(c)))(c.plan(1)),
     IndexOutOfRangeError, "layer"),
    ("write_layer_negative", lambda c: (lambda s: lambda: c.write(s, -1, arr(c), arr(c)))(c.plan(1)),
     IndexOutOfRangeError, "layer"),
    ("write_deferred_layer_past_end", lambda c: (lambda s: lambda: c.write(s, 5, arr(c, 1, 3), arr(c, 1, 3)))(
        _deferred(c)), IndexOutOfRangeError, "layer"),
    # attend
    ("attend_q_kv_heads", lambda c: (lambda s: lambda: c.attend(s, 0, q_arr(c, heads=2)))(_written(c)),
     ShapeError, "q"),
    ("attend_q_wrong_T", lambda c: (lambda s: lambda: c.attend(s, 0, q_arr(c, 1, T=1)))(_deferred(c)),
     ShapeError, "q"),
    ("attend_q_float64", lambda c: (lambda s: lambda: c.attend(s, 0, q_arr(c, dtype=np.float64)))(_written(c)),
     DTypeError, "q"),
    ("attend_q_float16", lambda c: (lambda s: lambda: c.attend(s, 0, q_arr(c, dtype=np.float16)))(_written(c)),
     DTypeError, "q"),
    ("attend_out_wrong_shape", lambda c: (lambda s: lambda: c.attend(s, 0, q_arr(c), out=q_arr(c, T=2)))(
        _written(c)), ShapeError, "out"),
    ("attend_layer_past_end", lambda c: (lambda s: lambda: c.attend(s, LAYERS, q_arr(c)))(_written(c)),
     IndexOutOfRangeError, "layer"),
    # attend before this layer was written for this step
    ("attend_before_any_write", lambda c: (lambda s: lambda: c.attend(s, 0, q_arr(c)))(c.plan(1)),
     StaleStepError, "step"),
    ("attend_layer_not_written", lambda c: (lambda s: lambda: c.attend(s, 1, q_arr(c)))(_written(c)),
     StaleStepError, "step"),
    ("attend_deferred_layer_not_written", lambda c: (lambda s: lambda: c.attend(s, 1, q_arr(c, 1, 3)))(_deferred(c)),
     StaleStepError, "step"),
    ("attend_other_step_than_written", lambda c: (lambda s: lambda: c.attend(c.plan(1, [1]), 0, q_arr(c, 1)))(
        _written(c)), StaleStepError, "step"),
    # advance before every layer was written
    ("advance_nothing_written", lambda c: (lambda s: lambda: c.advance(s))(c.plan(1)), StaleStepError, "step"),
    ("advance_one_layer_written", lambda c: (lambda s: lambda: c.advance(s))(_written(c)), StaleStepError, "step"),
    ("advance_deferred_one_layer_written", lambda c: (lambda s: lambda: c.advance(s))(_deferred(c)),
     StaleStepError, "step"),
    # stale steps
    ("write_after_advance", lambda c: (lambda s: lambda: c.write(s, 0, arr(c), arr(c)))(_advanced(c)),
     StaleStepError, "step"),
    ("attend_after_advance", lambda c: (lambda s: lambda: c.attend(s, 0, q_arr(c)))(_advanced(c)),
     StaleStepError, "step"),
    ("advance_twice", lambda c: (lambda s: lambda: c.advance(s))(_advanced(c)), StaleStepError, "step"),
    ("write_after_reset", lambda c: (lambda s: lambda: c.write(s, 0, arr(c, 1), arr(c, 1)))(_reset_after_plan(c)),
     StaleStepError, "step"),
    ("advance_after_crop", lambda c: (lambda s: lambda: c.advance(s))(_cropped_after_plan(c)), StaleStepError,
     "step"),
    ("write_not_a_step", lambda c: lambda: c.write(Other(), 0, arr(c), arr(c)), StaleStepError, "step"),
    ("attend_none_step", lambda c: lambda: c.attend(None, 0, q_arr(c)), StaleStepError, "step"),
    ("advance_tuple", lambda c: lambda: c.advance((0, 1)), StaleStepError, "step"),
    # append
    ("append_4d", lambda c: lambda: c.append(arr(c), arr(c)), ShapeError, "k_new"),
    ("append_wrong_layers", lambda c: lambda: c.append(five_d(c, layers=3), five_d(c, layers=3)), ShapeError,
     "k_new"),
    ("append_v_wrong_dtype", lambda c: lambda: c.append(five_d(c), five_d(c, dtype=np.float64)), DTypeError, "v_new"),
    ("append_duplicate_seq_ids", lambda c: lambda: c.append(five_d(c), five_d(c), seq_ids=[0, 0]), ShapeError,
     "seq_ids"),
    ("append_bad_seq_id", lambda c: lambda: c.append(five_d(c, 1), five_d(c, 1), seq_ids=[2]),
     IndexOutOfRangeError, "seq_ids"),
    # crop: not exact once wrapped (seq 0: length 6 > W = 4, no sinks)
    ("crop_after_wrap", lambda c: lambda: c.crop(3), IndexOutOfRangeError, "max_length"),
    ("crop_after_wrap_one_seq", lambda c: lambda: c.crop(5, seq=0), IndexOutOfRangeError, "max_length"),
    ("crop_after_wrap_negative", lambda c: lambda: c.crop(-1), IndexOutOfRangeError, "max_length"),
    ("crop_after_wrap_to_one", lambda c: lambda: c.crop(1, seq=0), IndexOutOfRangeError, "max_length"),
    ("crop_below_minus_length", lambda c: lambda: c.crop(-3, seq=1), IndexOutOfRangeError, "max_length"),
    ("crop_below_minus_length_wrapped", lambda c: lambda: c.crop(-7, seq=0), IndexOutOfRangeError, "max_length"),
    ("crop_float", lambda c: lambda: c.crop(2.0), ShapeError, "max_length"),
    ("crop_bool", lambda c: lambda: c.crop(False), ShapeError, "max_length"),
    ("crop_seq_past_batch", lambda c: lambda: c.crop(1, seq=2), IndexOutOfRangeError, "seq"),
    # reset and read accessors
    ("reset_seq_past_batch", lambda c: lambda: c.reset(seq=2), IndexOutOfRangeError, "seq"),
    ("reset_seq_negative", lambda c: lambda: c.reset(seq=-1), IndexOutOfRangeError, "seq"),
    ("held_positions_layer_past_end", lambda c: lambda: c.held_positions(0, LAYERS), IndexOutOfRangeError, "layer"),
    ("held_positions_seq_past_batch", lambda c: lambda: c.held_positions(2), IndexOutOfRangeError, "seq"),
    ("keys_layer_past_end", lambda c: lambda: c.keys(LAYERS, 0), IndexOutOfRangeError, "layer"),
    ("values_seq_past_batch", lambda c: lambda: c.values(0, 2), IndexOutOfRangeError, "seq"),
    ("remaining_capacity_seq_past_batch", lambda c: lambda: c.remaining_capacity(2), IndexOutOfRangeError, "seq"),
]

BAD_CALLS_FP16 = [
    ("fp16_write_float32", lambda c: (lambda s: lambda: c.write(s, 0, arr(c, dtype=np.float32), arr(c)))(c.plan(1)),
     DTypeError, "k_new"),
    ("fp16_write_uint16_bits", lambda c: (lambda s: lambda: c.write(s, 0, arr(c), arr(c, dtype=np.uint16)))(
        c.plan(1)), DTypeError, "v_new"),
    ("fp16_deferred_write_float32", lambda c: (lambda s: lambda: c.write(s, 1, arr(c, 1, 3, dtype=np.float32),
                                                                         arr(c, 1, 3)))(_deferred(c)),
     DTypeError, "k_new"),
    ("fp16_attend_q_float16", lambda c: (lambda s: lambda: c.attend(s, 0, q_arr(c, dtype=np.float16)))(_written(c)),
     DTypeError, "q"),
]



@pytest.mark.parametrize("setup, error, argument", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_and_changes_nothing(backend, setup, error, argument):
    run_bad_call(filled_ring(backend), setup, error, argument)


@pytest.mark.parametrize("setup, error, argument", [c[1:] for c in BAD_CALLS_FP16],
                         ids=[c[0] for c in BAD_CALLS_FP16])
def test_bad_input_fp16_raises_and_changes_nothing(setup, error, argument):
    run_bad_call(filled_ring("cpu", "float16"), setup, error, argument)


def test_crop_after_wrap_message_says_why(backend):
    exc = run_bad_call(filled_ring(backend), lambda c: lambda: c.crop(3), IndexOutOfRangeError, "max_length")
    assert "wrapped" in str(exc) and "nothing was changed" in str(exc)


def test_refused_calls_keep_a_half_written_deferred_step_usable(backend):
    """A deferred step with layer 0 held aside survives refused calls; then it completes exactly."""
    run = Run(backend, window=4, seed=12)
    run.step(2)
    step = run.cache.plan(4)
    assert step.deferred
    data = []
    for layer in range(2):
        (k, _), (v, _) = run.draw_kv(1, 4), run.draw_kv(1, 4)
        data.append((k, v, run.draw_q(1, 4)))
    run.cache.write(step, 0, data[0][0], data[0][1])
    before = run.cache.state()
    assert before["pending"] and before["written"] == [0]
    for call, error in [(lambda: run.cache.write(step, 1, data[1][0].astype(np.float64), data[1][1]), DTypeError),
                        (lambda: run.cache.attend(step, 1, data[1][2]), StaleStepError),
                        (lambda: run.cache.advance(step), StaleStepError),
                        (lambda: run.cache.crop(-5), IndexOutOfRangeError),
                        (lambda: run.cache.write(step, 2, data[1][0], data[1][1]), IndexOutOfRangeError)]:
        with pytest.raises(error):
            call()
        assert_state_equal(before, run.cache.state())
    # the step then completes exactly: layer 1 written, both layers attend, advance writes the ring
    run.cache.write(step, 1, data[1][0], data[1][1])
    for layer in range(2):
        k, v, q = data[layer]
        run.model.append(layer, 0, k[0].astype(np.float64), v[0].astype(np.float64))
        out = run.cache.attend(step, layer, q)
        expected = oracle.window_chunk_attention(q[0], run.model.keys(layer, 0), run.model.values(layer, 0),
                                                 [2, 3, 4, 5], 4, run.scale)
        np.testing.assert_allclose(out[0], expected, rtol=0, atol=ATOL["float32"])
    run.cache.advance(step)
    assert run.cache.lengths.tolist() == [6]
    run.check_held()


def test_step_arrays_are_read_only(backend):
    cache = filled_ring(backend)
    step = cache.plan(3, [0])
    for array in (step.seq_ids, step.positions, step.slots):
        with pytest.raises(ValueError):
            array[...] = 0


def _hand_built(step, field):
    """A Step built by hand from writable, edited copies of a real step's arrays."""
    ids, positions, slots = step.seq_ids.copy(), step.positions.copy(), step.slots.copy()
    deferred, version = step.deferred, step.version
    if field == "slots_swapped":
        slots[0, [0, 1]] = slots[0, [1, 0]]
    elif field == "slot_kept":
        slots[0, 0] = 0  # a token the ring drops, given a slot a later token of the step also writes
    elif field == "positions_shifted":
        positions = positions + 4
    elif field == "seq_ids_other":
        ids = np.array([1])
    elif field == "deferred_flipped":
        deferred = not deferred
    elif field == "version_other":
        version = version + 1
    return kvref.ring.RingStep(ids, positions, slots, step.cache_id, version, deferred)


@pytest.mark.parametrize("field", ["slots_swapped", "slot_kept", "positions_shifted", "seq_ids_other",
                                   "deferred_flipped", "version_other"])
def test_edited_or_hand_built_step_is_refused(backend, field):
    cache = filled_ring(backend)
    step = cache.plan(5, [0])  # positions 6 .. 10, deferred; position 6 is dropped (slot -1)
    assert step.deferred and step.slots[0, 0] == -1
    bad = _hand_built(step, field)
    bad_replaced = dataclasses.replace(step, **{name: getattr(bad, name) for name in
                                                ("seq_ids", "positions", "slots", "version", "deferred")})
    k = arr(cache, 1, 5)
    q = q_arr(cache, 1, 5)
    before = cache.state()
    for edited in (bad, bad_replaced):
        for call in (lambda: cache.write(edited, 0, k, k), lambda: cache.attend(edited, 0, q),
                     lambda: cache.advance(edited)):
            with pytest.raises(StaleStepError) as info:
                call()
            assert info.value.argument == "step"
            assert_state_equal(before, cache.state())
    for layer in range(LAYERS):  # the genuine step still works
        cache.write(step, layer, k, k)
    cache.advance(step)
    assert cache.lengths.tolist() == [11, 2]


def test_step_from_another_cache_is_refused(backend):
    a = filled_ring(backend)
    b = filled_ring(backend)  # same shape, same lengths: the steps would look alike
    foreign = b.plan(1)
    run_bad_call(a, lambda c: lambda: c.write(foreign, 0, arr(c), arr(c)), StaleStepError, "step")
    step = a.plan(1)
    for layer in range(LAYERS):
        a.write(step, layer, arr(a), arr(a))
    run_bad_call(a, lambda c: lambda: c.advance(foreign), StaleStepError, "step")


GOOD_SHAPE = kvref.CacheShape(layers=2, q_heads=4, kv_heads=2, head_dim=8)


@pytest.mark.parametrize("kwargs, error, argument", [
    ({"window": 0}, ShapeError, "window"),
    ({"window": -3}, ShapeError, "window"),
    ({"window": 4.0}, ShapeError, "window"),
    ({"window": True}, ShapeError, "window"),
    ({"window": None}, ShapeError, "window"),
    ({"sinks": -1}, IndexOutOfRangeError, "sinks"),
    ({"sinks": 4}, IndexOutOfRangeError, "sinks"),
    ({"sinks": 5}, IndexOutOfRangeError, "sinks"),
    ({"window": 1, "sinks": 1}, IndexOutOfRangeError, "sinks"),
    ({"sinks": 1.0}, ShapeError, "sinks"),
    ({"sinks": True}, ShapeError, "sinks"),
    ({"sinks": "1"}, ShapeError, "sinks"),
    ({"sinks": None}, ShapeError, "sinks"),
    ({"batch": 0}, ShapeError, "batch"),
    ({"shape": (2, 4, 2, 8)}, ShapeError, "shape"),
    ({"backend": "gpu"}, kvref.BackendUnavailableError, "backend"),
], ids=lambda p: repr(p) if not isinstance(p, type) else p.__name__)
def test_bad_constructor_arguments(kwargs, error, argument):
    args = {"shape": GOOD_SHAPE, "batch": 1, "window": 4, "sinks": 0, "backend": "python"}
    args.update(kwargs)
    with pytest.raises(error) as info:
        kvref.RingCache(args.pop("shape"), **args)
    assert type(info.value) is error
    assert info.value.argument == argument
    assert str(info.value).startswith(f"{argument}: expected ")


def test_numpy_integer_window_and_sinks_are_accepted():
    cache = kvref.RingCache(GOOD_SHAPE, batch=1, window=np.int64(5), sinks=np.int32(2), backend="python")
    assert (cache.window, cache.sinks) == (5, 2)
    assert type(cache.window) is int and type(cache.sinks) is int


def test_deferred_step_keeps_its_own_copy_of_the_chunk(backend, rng):
    """A deferred step holds its K/V aside until advance: the caller may reuse its arrays meanwhile."""
    run = Run(backend, window=4, seed=31)
    run.step(3)
    step = run.cache.plan(3)
    assert step.deferred
    ks = [rng.standard_normal((1, 3, 2, 8)).astype(np.float32) for _ in range(2)]
    vs = [rng.standard_normal((1, 3, 2, 8)).astype(np.float32) for _ in range(2)]
    for layer in range(2):
        k, v = ks[layer].copy(), vs[layer].copy()
        run.cache.write(step, layer, k, v)
        k[...] = 1e3  # the caller reuses its buffers (e.g. for the next layer's projections)
        v[...] = -1e3
    run.cache.advance(step)
    for layer in range(2):  # the ring holds 2, 3, 4, 5: the chunk is the last three
        assert np.array_equal(run.cache.keys(layer)[:, 1:], ks[layer][0].transpose(1, 0, 2))
        assert np.array_equal(run.cache.values(layer)[:, 1:], vs[layer][0].transpose(1, 0, 2))


# ---------------------------------------------------------------------------------------------------------------
# defects found by review (fixed): an abandoned step, and a step past the position limit
# ---------------------------------------------------------------------------------------------------------------
def test_abandoned_step_stays_invisible(backend):
    """A decode step written for every layer but never advanced (a rejected draft token, or a forward pass that
    failed after its writes) must not change what later steps see: the flat cache never reads past a length."""
    run = Run(backend, window=4, seed=17)
    run.step(5)  # wrapped: the ring holds 1 .. 4
    probe = run.cache.plan(1)  # position 5, never advanced
    junk = np.full((1, 1, 2, 8), 50, np.float32)
    for layer in range(2):
        run.cache.write(probe, layer, junk, junk)
    run.step(2)  # the real positions 5, 6 as one (deferred) chunk: query 6 also sees the junk key at position 5


def test_plan_refuses_a_step_past_int64_positions(backend):
    cache = filled_ring(backend)
    before = cache.state()
    with pytest.raises(KVCacheError) as info:
        cache.plan(2**63 - 1)
    assert info.value.argument == "num_tokens"
    assert_state_equal(before, cache.state())


def test_crop_waits_for_a_written_step_that_overwrote_slots(backend):
    """Found by review: a step written into the ring (not deferred) and not advanced has overwritten the slot of
    position L - W in the layers it wrote; a crop then would keep a ring that misses keys it needs (layer 0 without
    position 0, layer 1 with it). The crop is refused and changes nothing; after an advance it is allowed again."""
    cache = kvref.RingCache(kvref.CacheShape(LAYERS, 4, 2, 8), batch=1, window=4, backend=backend)
    k = np.random.default_rng(3).standard_normal((LAYERS, 1, 4, 2, 8)).astype(np.float32)
    cache.append(k, -k)  # full, not wrapped: a crop to 3 is exact here
    step = cache.plan(1)  # position 4 goes to slot 0, where position 0 is
    cache.write(step, 0, arr(cache, 1, 1), arr(cache, 1, 1))
    before = cache.state()
    with pytest.raises(StaleStepError) as info:
        cache.crop(3)
    assert info.value.argument == "max_length"
    assert_state_equal(before, cache.state())
    cache.write(step, 1, arr(cache, 1, 1), arr(cache, 1, 1))
    cache.advance(step)
    cache.crop(5)  # allowed again (a no-op crop)
    assert cache.get_seq_length(0) == 5
