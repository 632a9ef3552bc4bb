"""kvref.check: the one float64 attention reference, checked against a per-element loop written out here (plain
Python floats, math.exp, the window rule as a comparison per key), and the backend check's row format. The reference
must stay independent of kvref's spec, so its source is read and may not import it."""

import ast
import inspect
import math

import numpy as np
import pytest

import kvref.check as check


def brute_force(q, k, v, positions, scale, window=0, sinks=0):
    """Attention one element at a time: for each token t, query head h (KV head h // G) and key j, the score
    scale * sum_d q[t, h, d] * k[h // G, j, d] if key j is visible, then exp(score - max) / sum and the weighted sum
    of v, in Python floats. Key j is visible from position p iff j <= p and, with a window W > 0, p - j < W - sinks
    or j < sinks."""
    T, q_heads, D = len(q), len(q[0]), len(q[0][0])
    group = q_heads // len(k)
    out = np.zeros((T, q_heads, D))
    for t in range(T):
        p = int(positions[t])
        for h in range(q_heads):
            kh = h // group
            scores = {}
            for j in range(p + 1):
                if window > 0 and not (p - j < window - sinks or j < sinks):
                    continue
                scores[j] = scale * sum(float(q[t][h][d]) * float(k[kh][j][d]) for d in range(D))
            top = max(scores.values())
            weights = {j: math.exp(s - top) for j, s in scores.items()}
            total = sum(weights.values())
            for d in range(D):
                out[t, h, d] = sum(w * float(v[kh][j][d]) for j, w in weights.items()) / total
    return out


CASES = [
    # (q_heads, kv_heads, D, n, positions, window, sinks)
    (2, 2, 4, 5, [0, 2, 4], 0, 0),            # causal, no GQA
    (4, 1, 8, 9, [3, 8], 0, 0),               # GQA: 4 query heads share one KV head
    (6, 2, 4, 12, [0, 3, 5, 9, 11], 4, 0),    # window W = 4: i - W < j <= i
    (4, 2, 4, 12, [1, 6, 10, 11], 5, 2),      # window with 2 sinks
    (2, 1, 4, 7, [6], 1, 0),                  # W = 1: only the query's own key
    (4, 4, 4, 10, [9], 10, 3),                # window as long as the sequence: everything
]


@pytest.mark.parametrize("case", CASES, ids=[f"hq{c[0]}-hkv{c[1]}-W{c[5]}-S{c[6]}" for c in CASES])
def test_reference_matches_the_per_element_loop(case, rng):
    q_heads, kv_heads, D, n, positions, window, sinks = case
    q = rng.standard_normal((len(positions), q_heads, D)) * 2
    k = rng.standard_normal((kv_heads, n, D)) * 2
    v = rng.standard_normal((kv_heads, n, D))
    scale = 1 / math.sqrt(D)
    expected = brute_force(q, k, v, positions, scale, window, sinks)
    got = check.reference_attention(q, k, v, positions, scale, window, sinks)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # the per-token pieces are the same reference
    for t, p in enumerate(positions):
        seen = check.window_keys(p, window, sinks)
        np.testing.assert_allclose(check.decode_attention_gqa(q[t], k[:, seen], v[:, seen], scale), expected[t],
                                   rtol=1e-12, atol=1e-12)
        for h in range(q_heads):
            kh = check.kv_head_of(h, q_heads, kv_heads)
            np.testing.assert_allclose(check.attention(q[t, h], k[kh, seen], v[kh, seen], scale), expected[t, h],
                                       rtol=1e-12, atol=1e-12)


def test_window_keys():
    assert check.window_keys(3) == [0, 1, 2, 3]
    assert check.window_keys(9, 4) == [6, 7, 8, 9]                 # i - W < j <= i
    assert check.window_keys(9, 4, 2) == [0, 1, 8, 9]              # 2 sinks + the last W - S
    assert check.window_keys(2, 4, 2) == [0, 1, 2]                 # shorter than the window: everything


def test_softmax_is_stable_and_attention_of_nothing_is_zero():
    np.testing.assert_allclose(check.softmax([1000.0, 1000.0]), [0.5, 0.5])
    np.testing.assert_allclose(check.softmax([[0.0, math.log(3)]]), [[0.25, 0.75]])
    assert np.array_equal(check.attention(np.ones(4), np.zeros((0, 4)), np.zeros((0, 4)), 0.5), np.zeros(4))


def test_nmse():
    assert check.nmse([1.0, 1.0], [1.0, 1.0]) == 0.0
    assert check.nmse([2.0, 0.0], [1.0, 0.0]) == 0.25


def kvref_imports(source):
    """Every kvref module the source imports (absolute 'kvref.x' or relative '.x'), as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("kvref"))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").startswith("kvref"):
                base = node.module
            elif node.level == 1:
                base = "kvref" + ("." + node.module if node.module else "")
            else:
                continue
            names.add(base)
            if base == "kvref":
                names.update(f"kvref.{a.name}" for a in node.names)
    return names


def test_the_reference_is_independent_of_the_spec():
    imported = kvref_imports(inspect.getsource(check))
    spec = {"kvref.attention", "kvref.flat", "kvref.ring", "kvref.two_tier", "kvref.pooled", "kvref.pool",
            "kvref.cpu", "kvref.cuda", "kvref.cache", "kvref.page_table"}
    assert not imported & spec, imported & spec
    assert "visible" not in {name.split(".")[-1] for name in imported}
    # the reference functions themselves call nothing of kvref at all
    for fn in (check.softmax, check.kv_head_of, check.decode_attention_gqa, check.attention, check.window_keys,
               check.reference_attention, check.nmse):
        names = {n.id for n in ast.walk(ast.parse(inspect.getsource(fn))) if isinstance(n, ast.Name)}
        assert not names & {"kvref", "quant", "backends", "FlatCache", "RingCache", "TwoTierCache", "PooledCache"}


def test_oracle_uses_the_same_reference():
    import oracle

    for name in ("softmax", "attention", "kv_head_of", "decode_attention_gqa", "window_keys"):
        assert getattr(oracle, name) is getattr(check, name)
    source = inspect.getsource(oracle)
    assert "np.exp(" not in source and "def softmax" not in source  # no second softmax


def test_check_backends_rows_and_progress():
    seen = []
    rows = check.check_backends(names=["python", "cuda"] if not check.backends()["cuda"][0] else ["python"],
                                dtypes=("float32",), variants=("flat", "ring"), progress=seen.append)
    assert seen == rows
    keys = {"backend", "variant", "dtype", "available", "reason", "max_error", "tolerance", "ok", "seconds"}
    assert all(set(r) == keys for r in rows)
    python = [r for r in rows if r["backend"] == "python"]
    assert [(r["variant"], r["dtype"]) for r in python] == [("flat", "float32"), ("ring", "float32")]
    assert all(r["ok"] and r["max_error"] <= check.TOLERANCES["python"] for r in python)
    for r in rows:
        if not r["available"]:
            assert r["ok"] is None and r["max_error"] is None and r["reason"]

    class Bar:
        def __init__(self):
            self.n, self.postfix = 0, []

        def update(self, n):
            self.n += n

        def set_postfix_str(self, text):
            self.postfix.append(text)

    bar = Bar()
    check.check_backends(names=["python"], dtypes=("float16",), variants=("pooled",), progress=bar)
    assert bar.n == 1 and bar.postfix == ["python pooled float16"]


def test_check_backends_lists_every_variant():
    rows = check.check_backends(names=["python"])
    assert [(r["variant"], r["dtype"]) for r in rows] == [("flat", "float32"), ("flat", "float16"),
                                                          ("ring", "float32"), ("ring", "float16"),
                                                          ("two_tier", "float32"), ("two_tier", "float16"),
                                                          ("pooled", "float32"), ("pooled", "float16")]
    assert all(r["ok"] for r in rows)
