"""Split-K (flash-decoding): partial softmax states over disjoint key sets, merged by the spec's one merge rule
(``kvref.attention.merge_state``), and the CPU schedule that uses it (``kvref.cpu.choose_parts``, each variant's
``split``).

* The merge rule in float64: any split of the keys into parts (empty parts included), each part's state computed
  independently in NumPy, merged by the spec, gives the unsplit float64 softmax within 1e-12.
* Empty parts never make NaN; a NaN key still makes the output NaN, as unsplit.
* The spec run as plain Python: every variant's ``attend_part`` over any number of parts, merged, equals its unsplit
  ``attend_one`` to float32 rounding, and the float64 oracle.
* The CPU key split, forced on every variant, equals the python backend; ``choose_parts`` picks the documented shape.
"""

import math

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvref
import kvref.cpu
import kvref.cpu.flat
import kvref.cpu.pooled
import kvref.cpu.ring
import kvref.cpu.two_tier
from kvref import attention, flat
import oracle


# ---------------------------------------------------------------------------------------------------------------
# the merge rule, in float64
# ---------------------------------------------------------------------------------------------------------------
def numpy_state(scores, values):
    """(acc (G, D), m_l (G, 2)) of one part in float64, computed directly: m = max s, l = sum e^(s-m), acc =
    sum e^(s-m) v; an empty part is m = -inf, l = 0, acc = 0."""
    G, D = scores.shape[0], values.shape[1]
    acc = np.zeros((G, D))
    m_l = np.zeros((G, 2))
    m_l[:, 0] = -np.inf
    if scores.shape[1]:
        m = scores.max(axis=1)
        p = np.exp(scores - m[:, None])
        acc = p @ values
        m_l[:, 0], m_l[:, 1] = m, p.sum(axis=1)
    return acc, m_l


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 200), group=st.integers(1, 4), cuts=st.lists(st.integers(0, 200), max_size=6),
       spread=st.sampled_from([1.0, 10.0, 80.0]), seed=st.integers(0, 2**31 - 1))
def test_merge_of_any_split_is_the_unsplit_softmax_in_float64(n, group, cuts, spread, seed):
    rng = np.random.default_rng(seed)
    D = 5
    scores = rng.standard_normal((group, n)) * spread  # a spread of 80 makes e^(s - m) underflow in some parts
    values = rng.standard_normal((n, D))
    bounds = [0] + sorted(min(c, n) for c in cuts) + [n]  # repeated cuts give empty parts
    acc, m_l = numpy_state(scores[:, :0], values[:0])  # start from the empty state
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part_acc, part_m_l = numpy_state(scores[:, lo:hi], values[lo:hi])
        attention.merge_state(acc, m_l, part_acc, part_m_l)
    got = acc / m_l[:, 1:2]
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    expected = (p / p.sum(axis=1, keepdims=True)) @ values
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m_l[:, 0], scores.max(axis=1), rtol=0, atol=0)


def test_merge_grouping_does_not_matter_in_float64():
    """Associativity: ((a + b) + c) and (a + (b + c)) agree within 1e-12 (a tree merge, as a GPU does, is fine)."""
    rng = np.random.default_rng(1)
    scores, values = rng.standard_normal((2, 90)) * 20, rng.standard_normal((90, 4))
    a, b, c = (numpy_state(scores[:, lo:hi], values[lo:hi]) for lo, hi in ((0, 30), (30, 31), (31, 90)))
    left = [x.copy() for x in a]
    attention.merge_state(*left, *b)
    attention.merge_state(*left, *c)
    right = [x.copy() for x in b]
    attention.merge_state(*right, *c)
    attention.merge_state(a[0], a[1], *right)
    np.testing.assert_allclose(left[0] / left[1][:, 1:2], a[0] / a[1][:, 1:2], rtol=0, atol=1e-12)


def test_empty_parts_give_no_nan_and_zeros():
    part_acc = np.zeros((3, 2, 4), np.float32)
    part_m_l = np.zeros((3, 2, 2), np.float32)
    part_m_l[:, :, 0] = -np.inf
    out = np.full((2, 4), 7.0, np.float32)
    with np.errstate(all="raise"):  # not even an invalid-operation warning
        attention.merge_parts(part_acc, part_m_l, out, 2, 4)
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out, 0.0)
    assert (part_m_l[:, :, 0] == -np.inf).all() and (part_m_l[:, :, 1] == 0).all()  # the parts are only read


def test_an_empty_part_merged_with_a_full_one_changes_nothing_bitwise():
    rng = np.random.default_rng(2)
    acc, m_l = numpy_state(rng.standard_normal((2, 9)), rng.standard_normal((9, 3)))
    acc, m_l = acc.astype(np.float32), m_l.astype(np.float32)
    parts_acc = np.stack([np.zeros_like(acc), acc, np.zeros_like(acc)])
    parts_m_l = np.stack([np.array([[-np.inf, 0]] * 2, np.float32), m_l, np.array([[-np.inf, 0]] * 2, np.float32)])
    out = np.empty_like(acc)
    attention.merge_parts(parts_acc, parts_m_l, out, 2, 3)
    alone = np.empty_like(acc)
    attention.normalise(acc, m_l[:, 1], alone)
    np.testing.assert_array_equal(out, alone)


def test_a_nan_in_one_part_makes_the_output_nan():
    rng = np.random.default_rng(3)
    scores, values = rng.standard_normal((1, 20)), rng.standard_normal((20, 3))
    values[15, 1] = np.nan
    acc, m_l = numpy_state(scores[:, :10], values[:10])
    attention.merge_state(acc, m_l, *numpy_state(scores[:, 10:], values[10:]))
    assert np.isnan(acc[0, 1]) and not np.isnan(acc[0, 0])


# ---------------------------------------------------------------------------------------------------------------
# the spec run as plain Python: attend_part over any number of parts, merged
# ---------------------------------------------------------------------------------------------------------------
def test_key_share_cuts_whole_tiles_and_covers_every_key():
    T = attention.TILE
    for n in (0, 1, T - 1, T, T + 1, 5 * T + 3, 1000):
        for parts in (1, 2, 3, 7, 40):
            shares = [attention.key_share(n, part, parts) for part in range(parts)]
            assert shares[0][0] == 0 and shares[-1][1] == n
            for (lo, hi), (next_lo, _) in zip(shares, shares[1:]):
                assert hi == next_lo and lo <= hi
            assert all(lo % T == 0 or lo == n for lo, _ in shares)
            tiles = [-(-(hi - lo) // T) for lo, hi in shares]  # whole or partial tiles per share
            assert max(tiles) - min(tiles) <= 1


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), parts=st.integers(1, 6), group=st.sampled_from([1, 2, 4]), seed=st.integers(0, 999))
def test_flat_spec_split_equals_unsplit_and_the_oracle(n, parts, group, seed):
    rng = np.random.default_rng(seed)
    D, kv_heads = 8, 2
    kv = rng.standard_normal((1, 2, 1, kv_heads, n, D)).astype(np.float32)
    seq_ids, positions = np.array([0]), np.array([[n - 1]])
    q = rng.standard_normal((1, 1, kv_heads * group, D)).astype(np.float32)
    scale = attention.default_scale(D)
    unsplit = np.empty_like(q)
    flat.attend_tokens(kv, 0, seq_ids, positions, q, scale, unsplit, group, D)
    part_acc = np.empty((1, 1, kv_heads, parts, group, D), np.float32)
    part_m_l = np.empty((1, 1, kv_heads, parts, group, 2), np.float32)
    for h in range(kv_heads):
        for part in range(parts):
            flat.attend_part(kv, 0, seq_ids, positions, q[0, 0, h * group:(h + 1) * group], scale,
                             part_acc[0, 0, h, part], part_m_l[0, 0, h, part], 0, 0, h, part, parts, group, D)
    split = np.empty_like(q)
    attention.merge_tokens(part_acc, part_m_l, split, group, D)
    np.testing.assert_allclose(split, unsplit, rtol=0, atol=3e-6)
    expected = oracle.decode_attention_gqa(q[0, 0].astype(np.float64), kv[0, 0, 0].astype(np.float64),
                                           kv[0, 1, 0].astype(np.float64), float(scale))
    np.testing.assert_allclose(split[0, 0], expected, rtol=0, atol=2e-5)
    if parts == 1:
        np.testing.assert_array_equal(split, unsplit)  # one part: the very same arithmetic


# ---------------------------------------------------------------------------------------------------------------
# the CPU key split, forced, on every variant, against the python backend
# ---------------------------------------------------------------------------------------------------------------
SHAPE = kvref.CacheShape(layers=1, q_heads=4, kv_heads=2, head_dim=32)
MAKERS = {
    "flat": lambda backend: kvref.FlatCache(SHAPE, batch=2, max_tokens=200, backend=backend),
    "ring": lambda backend: kvref.RingCache(SHAPE, batch=2, window=70, sinks=3, backend=backend),
    "two_tier": lambda backend: kvref.TwoTierCache(SHAPE, batch=2, tail_tokens=40, max_tokens=150,
                                                   store_format="q8_0", migration_batch=8, backend=backend),
    "pooled": lambda backend: kvref.PooledCache(SHAPE, num_blocks=40, block_size=8, batch=2, max_seqs=2,
                                                backend=backend),
}
#: (tokens, sequences) per step: a long prefill, a deferred ring chunk, decode steps
STEPS = [(120, [0, 1]), (9, [1]), (1, [0, 1]), (1, [1]), (30, [0])]


@pytest.mark.parametrize("parts", [2, 3, 5])
@pytest.mark.parametrize("variant", list(MAKERS))
def test_cpu_key_split_matches_the_spec(variant, parts, monkeypatch):
    chosen = []

    def choose(rows, work_items, threads=None):
        chosen.append(parts)
        return parts

    monkeypatch.setattr(kvref.cpu, "choose_parts", choose)
    monkeypatch.setattr(getattr(kvref.cpu, variant), "choose_parts", choose, raising=False)
    rng = np.random.default_rng(parts)
    spec, cpu = MAKERS[variant]("python"), MAKERS[variant]("cpu")
    for num_tokens, ids in STEPS:
        steps = [cache.plan(num_tokens, ids) for cache in (spec, cpu)]
        k, v = rng.standard_normal((2, len(ids), num_tokens, SHAPE.kv_heads, SHAPE.head_dim), dtype=np.float32)
        q = rng.standard_normal((len(ids), num_tokens, SHAPE.q_heads, SHAPE.head_dim), dtype=np.float32)
        outs = []
        for cache, step in zip((spec, cpu), steps):
            cache.write(step, 0, k, v)
            outs.append(cache.attend(step, 0, q))
        np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=3e-5)
        for cache, step in zip((spec, cpu), steps):
            cache.advance(step)
    assert len(chosen) == len(STEPS), "every attend asked for the key split"


# ---------------------------------------------------------------------------------------------------------------
# the choice rule
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, items, threads, expected", [
    (65536, 1, 2, 2),  # Gemma-2B decode, batch 1: 1 KV head -> the keys are split in 2
    (65536, 1, 64, 32),  # ... on 64 threads, as far as MIN_PART_ROWS allows (65536 / 2048 = 32 parts)
    (32 * 65536, 32, 2, 1),  # MHA, 32 KV heads: the head split fills 2 threads
    (8 * 65536, 8, 64, 8),  # 8 KV heads on 64 threads: 8 parts each
    (3 * 65536, 3, 2, 2),  # 3 items on 2 threads: 6 parts, balanced
    (65536, 1, 1, 0),  # one thread: serial
    (100, 4, 2, 0),  # too little work: serial
    (6000, 3, 2, 1),  # a part would be under MIN_PART_ROWS: no key split, the head split
])
def test_choose_parts(rows, items, threads, expected):
    assert kvref.cpu.choose_parts(rows, items, threads) == expected


def test_choose_parts_fills_the_threads():
    for items in range(1, 40):
        for threads in (2, 3, 4, 8, 16):
            parts = kvref.cpu.choose_parts(1 << 30, items, threads)
            if parts > 1:
                assert items * parts % threads == 0
            else:
                assert items / (math.ceil(items / threads) * threads) >= kvref.cpu.HEAD_SPLIT_BALANCE


def test_gemma_decode_runs_the_key_split_and_matches_the_oracle(monkeypatch):
    """The shape the schedule exists for: 8 query heads on 1 KV head, head_dim 256, one sequence (n small here)."""
    monkeypatch.setattr(numba, "get_num_threads", lambda: 2)
    shape = kvref.CacheShape(layers=1, q_heads=8, kv_heads=1, head_dim=256)
    cache = kvref.FlatCache(shape, batch=1, max_tokens=8200, backend="cpu")
    rng = np.random.default_rng(4)
    k, v = rng.standard_normal((2, 1, 1, 8192, 1, 256), dtype=np.float32)
    cache.append(k, v)
    step = cache.plan(1)
    k1, v1 = rng.standard_normal((2, 1, 1, 1, 256), dtype=np.float32)
    cache.write(step, 0, k1, v1)
    q = rng.standard_normal((1, 1, 8, 256), dtype=np.float32)
    split = []
    real_state = kvref.cpu.split_state
    monkeypatch.setattr(kvref.cpu, "split_state", lambda *dims: split.append(dims[3]) or real_state(*dims))
    out = cache.attend(step, 0, q)
    assert split == [2]
    keys = np.concatenate([k[0, 0, :, 0], k1[0, 0]]).astype(np.float64)
    values = np.concatenate([v[0, 0, :, 0], v1[0, 0]]).astype(np.float64)
    expected = oracle.decode_attention_gqa(q[0, 0].astype(np.float64), keys[None], values[None],
                                           float(kvref.default_scale(256)))
    np.testing.assert_allclose(out[0, 0], expected, rtol=0, atol=2e-5)
