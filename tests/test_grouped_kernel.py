"""The grouped kernel's machinery (kvref/attention.py, "Specialisation"): ``local_array``, the per-shape compile, and
shapes beyond the small ones the other tests use.

* ``attention.local_array`` is ``np.empty`` in plain Python; compiled with literal dimensions it is a stack array
  (no heap allocation in the function's LLVM IR), and with dimensions that are not compile-time constants it has no
  compiled form (a typing error, never a silently wrong array).
* ``kvref.lowering.Specialisations`` builds one set of compiled functions per shape, once.
* the compiled attention of the flat cache matches the float64 oracle for head_dim 80 and 256 and G = 3 and 8 (the
  presets' less common shapes); the python backend runs the same spec.
* every variant's compiled specialisation has packed (vector) FMAs in its hot loops (the benchmark's assembly
  check, run here on the shapes the tests compile).
"""

import numba
import numpy as np
import pytest
from numba.core.errors import TypingError

import kvref
import kvref.cpu  # noqa: F401  (registers the CPU forms of the primitives)
from kvref import attention
from kvref.lowering import Specialisations

import oracle


def test_local_array_is_np_empty_in_plain_python():
    a = attention.local_array((3, 5))
    assert a.shape == (3, 5) and a.dtype == np.float32 and a.flags.c_contiguous
    assert attention.local_array((2, 3, 4)).shape == (2, 3, 4)


def _fill(rows, cols):
    """A compiled function that fills local_array((rows, cols)) and returns its sum: rows, cols as closure constants
    (literals)."""

    def fill(x):
        a = attention.local_array((rows, cols))
        for i in range(rows):
            for j in range(cols):
                a[i, j] = x * (i * cols + j)
        total = 0.0
        for i in range(rows):
            for j in range(cols):
                total += a[i, j]
        return total, a.shape[0], a.shape[1], a.strides[0]

    return numba.njit(fill)


def test_local_array_compiled_is_a_stack_array():
    fn = _fill(3, 7)
    total, rows, cols, stride = fn(2.0)
    assert (rows, cols, stride) == (3, 7, 28)
    assert total == pytest.approx(2.0 * sum(range(21)))
    ir = fn.inspect_llvm(fn.signatures[0])
    assert "alloca" in ir
    assert "NRT_MemInfo_alloc" not in ir  # no heap allocation: the array is on the stack


def test_local_array_refuses_sizes_that_are_not_constants():
    @numba.njit
    def runtime_size(n):
        return attention.local_array((n, 4)).shape[0]

    with pytest.raises(TypingError, match="local_array"):
        runtime_size(3)


def test_specialisations_build_once_per_shape():
    built = []
    specs = Specialisations(lambda *shape: built.append(shape) or object())
    first = specs(4, 128)
    assert specs(np.int64(4), 128) is first  # numpy ints name the same shape
    assert specs(8, 128) is not first
    assert built == [(4, 128), (8, 128)]


@pytest.mark.parametrize("group, head_dim", [(3, 80), (8, 256), (1, 96)])
@pytest.mark.parametrize("backend", ["python", "cpu"])
def test_flat_attention_for_less_common_shapes_matches_the_oracle(rng, backend, group, head_dim):
    kv_heads = 2
    n_keys = 70 if backend == "python" else 300  # crosses tiles (TILE = 32) and ends mid-tile
    shape = kvref.CacheShape(layers=1, q_heads=kv_heads * group, kv_heads=kv_heads, head_dim=head_dim)
    cache = kvref.FlatCache(shape, batch=1, max_tokens=n_keys + 4, backend=backend)
    k = rng.standard_normal((1, 1, n_keys, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((1, 1, n_keys, kv_heads, head_dim)).astype(np.float32)
    cache.append(k, v)
    step = cache.plan(1)
    k_new = rng.standard_normal((1, 1, kv_heads, head_dim)).astype(np.float32)
    v_new = rng.standard_normal((1, 1, kv_heads, head_dim)).astype(np.float32)
    cache.write(step, 0, k_new, v_new)
    q = rng.standard_normal((1, 1, kv_heads * group, head_dim)).astype(np.float32)
    out = cache.attend(step, 0, q)
    keys = np.concatenate([k[0, 0], k_new[0]], axis=0).astype(np.float64).transpose(1, 0, 2)  # (kv_heads, n, D)
    values = np.concatenate([v[0, 0], v_new[0]], axis=0).astype(np.float64).transpose(1, 0, 2)
    expected = oracle.decode_attention_gqa(q[0, 0], keys, values, float(kvref.default_scale(head_dim)))
    np.testing.assert_allclose(out[0, 0], expected, rtol=0, atol=2e-5)


def _run_one_step(cache, rng, n_keys=40):
    """Fill ``cache`` with n_keys tokens and run one decode step of layer 0 (compiles its attention)."""
    shape = cache.shape
    k = rng.standard_normal((shape.layers, 1, n_keys, shape.kv_heads, shape.head_dim)).astype(np.float32)
    cache.append(k, k)
    step = cache.plan(1)
    cache.write(step, 0, k[0, :, :1], k[0, :, :1])
    cache.attend(step, 0, rng.standard_normal((1, 1, shape.q_heads, shape.head_dim)).astype(np.float32))


def test_every_variant_compiles_to_packed_fmas(rng):
    from kvref.bench import asm

    shape = kvref.CacheShape(layers=1, q_heads=8, kv_heads=2, head_dim=32)
    _run_one_step(kvref.FlatCache(shape, batch=1, max_tokens=64), rng)
    _run_one_step(kvref.RingCache(shape, batch=1, window=32), rng)
    _run_one_step(kvref.PooledCache(shape, num_blocks=8, block_size=16, batch=1), rng)
    _run_one_step(kvref.TwoTierCache(shape, batch=1, max_tokens=64, tail_tokens=16), rng)
    checked = set()
    for name, dispatcher in asm.attention_dispatchers():
        if "[G=4, D=32" not in name or not name.endswith(".serial"):
            continue
        for report in asm.asm_report(dispatcher):
            assert report.ok and report.packed_fma_loops > 0, (name, report.verdict)
            checked.add(name.split(".")[0])
    assert checked == {"flat", "ring", "pooled", "two_tier"}
