"""Flash-decoding pieces on the CUDA backend (kvref/cuda/__init__.py): the chunk and lane choices, the lane sum, the
merge kernel against the spec's merge and the float64 rule, and a forced split of the flat attend against the python
backend run with the same split. Tiny shapes: the simulator runs one Python thread per CUDA thread."""

import numpy as np
import pytest
from numba import cuda

import kvref.cuda as kvref_cuda
from kvref import attention, flat
from kvref.cuda import flat as cuda_flat


@pytest.mark.parametrize("head_dim, lanes", [(32, 32), (64, 32), (128, 32), (256, 32), (16, 16), (48, 16), (24, 8),
                                             (33, 1)])
def test_lanes_for(head_dim, lanes):
    """The largest power of two <= 32 that divides head_dim: lane j holds columns j, j + L, ... (on a GPU)."""
    assert kvref_cuda.lanes_for(head_dim, most=kvref_cuda.MAX_LANES) == lanes


def test_lanes_in_this_process():
    """The simulator caps the lanes (one Python thread per CUDA thread) and still runs more than one."""
    from conftest import ON_SIMULATOR

    most = kvref_cuda.SIMULATOR_MAX_LANES if ON_SIMULATOR else kvref_cuda.MAX_LANES
    assert kvref_cuda.lanes_for(128) == most and most > 1


@pytest.mark.parametrize("n_keys, items, sms, chunks", [
    (32768, 8, 132, 128),    # batch 1, 8 KV heads, H100: wants 264 chunks, capped at 256 keys per chunk
    (131072, 8, 132, 264),   # enough keys: 132 SMs x 16 blocks / 8 items
    (131072, 1, 132, 512),   # one KV head (Gemma): 512 chunks of 256 keys
    (4096, 64 * 8, 132, 5),  # a batch of 64 already fills the SMs: ceil(2112 / 512) = 5
    (100, 8, 132, 1),        # under one chunk's worth of keys: no split
    (0, 8, 132, 1),
])
def test_choose_chunks(n_keys, items, sms, chunks):
    assert kvref_cuda.choose_chunks(n_keys, items, sms=sms) == chunks


@cuda.jit
def _lane_sum_kernel(x, out):
    out[cuda.threadIdx.x] = attention.lane_sum(x[cuda.threadIdx.x])


@pytest.mark.parametrize("lanes", [1, 8, 32])
def test_lane_sum_gives_every_lane_the_total(lanes):
    x = (np.arange(lanes, dtype=np.float32) + 1) / 8  # exact in float32 in any order
    out = np.zeros(lanes, np.float32)
    _lane_sum_kernel[1, lanes](x, out)
    np.testing.assert_array_equal(out, np.full(lanes, x.sum(), np.float32))


def _random_states(rng, dims, empty=()):
    """Partial states as a real split leaves them: m = a max of scores, l >= 1 (the max term weighs 1), acc of that
    size; parts listed in ``empty`` saw no key (m = -inf, l = 0, acc = 0)."""
    part_acc = rng.standard_normal(dims + (16,)).astype(np.float32)
    part_m_l = np.empty(dims + (2,), np.float32)
    part_m_l[..., 0] = rng.standard_normal(dims) * 4
    part_m_l[..., 1] = 1 + rng.random(dims) * 30
    for p in empty:
        part_acc[:, :, :, p] = 0
        part_m_l[:, :, :, p, :, 0] = -np.inf
        part_m_l[:, :, :, p, :, 1] = 0
    return part_acc, part_m_l


@pytest.mark.parametrize("lanes", [1, 16])
def test_merge_kernel_matches_the_spec_and_the_rule(rng, lanes):
    """The merge kernel (each lane merging its own columns) against ``attention.merge_tokens`` run as Python, and
    against the merge rule in float64: m = max m_p, l = sum l_p e^(m_p - m), out = sum acc_p e^(m_p - m) / l. Part 1
    is empty: it must weigh nothing and make no NaN."""
    group, head_dim, parts = 2, 16, 4
    dims = (2, 1, 2, parts, group)
    part_acc, part_m_l = _random_states(rng, dims, empty=(1,))
    expected = np.empty((2, 1, 2 * group, head_dim), np.float32)
    attention.merge_tokens(part_acc, part_m_l, expected, group, head_dim)
    got = np.full(expected.shape, np.nan, np.float32)
    kvref_cuda._merge_kernels(group, head_dim, lanes)[2 * 1 * 2, lanes](part_acc, part_m_l, got)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    m = part_m_l[..., 0].astype(np.float64).max(axis=3, keepdims=True)
    weight = np.exp(part_m_l[..., 0].astype(np.float64) - m)  # (2, 1, 2, P, G); empty parts: exp(-inf) = 0
    rule = (part_acc * weight[..., None]).sum(axis=3) / (part_m_l[..., 1] * weight).sum(axis=3)[..., None]
    np.testing.assert_allclose(got, rule.reshape(expected.shape), rtol=1e-5, atol=1e-6)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("parts", [2, 3])
def test_forced_flat_split_matches_the_python_split(rng, parts):
    """The flat attend kernel with P chunks (L lanes, shared q rows) then the merge kernel, against the spec's own
    split run as Python (``flat.attend_part`` for each part, ``attention.merge_tokens``), and the unsplit python
    backend: float32 rounding apart (the lanes add a dot product in another order)."""
    n_seq, kv_heads, group, head_dim, slots = 2, 1, 2, 32, 70
    kv = rng.standard_normal((1, 2, n_seq, kv_heads, slots, head_dim)).astype(np.float32)
    seq_ids = np.array([1, 0], np.int64)
    positions = np.array([[69], [40]], np.int64)  # 70 and 41 visible keys: 3 and 2 tiles of 32
    q = rng.standard_normal((n_seq, 1, kv_heads * group, head_dim)).astype(np.float32)
    scale = np.float32(head_dim ** -0.5)
    dims = (n_seq, 1, kv_heads, parts, group)
    part_acc, part_m_l = np.zeros(dims + (head_dim,), np.float32), np.zeros(dims + (2,), np.float32)
    for i in range(n_seq):
        for h in range(kv_heads):
            for part in range(parts):
                flat.attend_part(kv, 0, seq_ids, positions, q[i, 0, h * group:(h + 1) * group], scale,
                                 part_acc[i, 0, h, part], part_m_l[i, 0, h, part], i, 0, h, part, parts, group,
                                 head_dim)
    spec_split = np.empty(q.shape, np.float32)
    attention.merge_tokens(part_acc, part_m_l, spec_split, group, head_dim)
    unsplit = np.empty(q.shape, np.float32)
    flat.attend_tokens(kv, 0, seq_ids, positions, q, scale, unsplit, group, head_dim)
    got = np.full(q.shape, np.nan, np.float32)
    cuda_flat.attend_tokens(cuda.to_device(kv), 0, seq_ids, positions, q, scale, got, group, head_dim, parts=parts)
    np.testing.assert_allclose(got, spec_split, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(got, unsplit, rtol=1e-5, atol=2e-6)
