"""The CPU backend's prange schedules (each shape's ``parallel`` in kvref/cpu/<variant>.py) against the spec.

A cpu cache picks its parallel schedule only for steps with enough work and more than one thread, which the small
shapes of the other tests never reach. Here ``kvref.cpu.choose_parts`` is made to answer 1 (the head split), so
every attend of a cpu cache runs the parallel schedule (tests/test_split_k.py does the same for the key split) (with however many threads this machine really has), and its
outputs are compared with the same cache on the python backend (the spec run as plain Python).
"""

import numba
import numpy as np
import pytest

import kvref
import kvref.cpu.flat
import kvref.cpu.pooled
import kvref.cpu.ring
import kvref.cpu.two_tier

SHAPE = kvref.CacheShape(layers=2, q_heads=8, kv_heads=2, head_dim=32)
MAKERS = {
    "flat": lambda backend: kvref.FlatCache(SHAPE, batch=2, max_tokens=64, backend=backend),
    "ring": lambda backend: kvref.RingCache(SHAPE, batch=2, window=16, sinks=2, backend=backend),
    "two_tier": lambda backend: kvref.TwoTierCache(SHAPE, batch=2, tail_tokens=8, max_tokens=40, store_format="q4_0",
                                                   migration_batch=4, backend=backend),
    "pooled": lambda backend: kvref.PooledCache(SHAPE, num_blocks=24, block_size=4, batch=2, max_seqs=3,
                                                backend=backend),
}
STEPS = [(13, [0, 1]), (9, [1]), (1, [0, 1]), (1, [1, 0]), (3, [0])]


@pytest.mark.parametrize("variant", list(MAKERS))
def test_parallel_schedule_matches_the_spec(variant, monkeypatch):
    module = getattr(kvref.cpu, variant)
    monkeypatch.setattr(kvref.cpu, "PARALLEL_MIN_ROWS", 0)
    monkeypatch.setattr(numba, "get_num_threads", lambda: 2)
    calls = []

    def choose(rows, work_items, threads=None):  # the head split, every time, counted
        calls.append(1)
        return 1

    monkeypatch.setattr(kvref.cpu, "choose_parts", choose)
    monkeypatch.setattr(module, "choose_parts", choose, raising=False)
    rng = np.random.default_rng(0)
    spec, cpu = MAKERS[variant]("python"), MAKERS[variant]("cpu")
    if variant == "pooled":
        for cache in (spec, cpu):
            cache.fork(0)  # a shared partial block: copy-on-write in the steps below
    for num_tokens, ids in STEPS:
        steps = [cache.plan(num_tokens, ids) for cache in (spec, cpu)]
        for layer in range(SHAPE.layers):
            k, v = rng.standard_normal((2, len(ids), num_tokens, SHAPE.kv_heads, SHAPE.head_dim), dtype=np.float32)
            q = rng.standard_normal((len(ids), num_tokens, SHAPE.q_heads, SHAPE.head_dim), dtype=np.float32)
            outs = []
            for cache, step in zip((spec, cpu), steps):
                cache.write(step, layer, k, v)
                outs.append(cache.attend(step, layer, q))
            np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=2e-5)
        for cache, step in zip((spec, cpu), steps):
            cache.advance(step)
    assert len(calls) == len(STEPS) * SHAPE.layers, "every attend ran the parallel schedule"
