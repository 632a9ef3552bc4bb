"""Decode attention over cached K/V: the spec shared by every cache variant.

For one query vector q (one head) and the keys k_j / values v_j it may see:

    s_j = scale * (q . k_j)                     scale = 1 / sqrt(head_dim) by default
    o   = sum_j softmax(s)_j * v_j = sum_j exp(s_j - m) v_j / sum_j exp(s_j - m),   m = max_j s_j

**Online softmax** (Milakov & Gimelshein 2018; the recurrence FlashAttention uses) computes this in one pass over
the keys, a tile of ``TILE`` keys at a time, keeping a running max ``m``, a running sum ``l`` and an unnormalised
output ``acc``:

    m'   = max(m, max_tile s_j)
    c    = exp(m - m')                          rescales what was summed under the old max (c = 0 at the start)
    l'   = c * l   + sum_tile exp(s_j - m')
    acc' = c * acc + sum_tile exp(s_j - m') v_j
    o    = acc / l                              after the last tile

No exp ever sees a positive argument, so nothing overflows for any finite scores (a NaN or infinite score
makes the output NaN, as in the float64 definition).

**GQA.** Query head ``qh`` reads KV head ``qh // G`` with ``G = q_heads // kv_heads``. The loops below take the G query
heads of one KV head together, so each K and V row is loaded once and used G times: that is both the clearest
statement of GQA and the order that is fast (decode attention is memory-bound; reading K G times is not).

**Window rule** (one definition for every variant): key position j is visible from query position i iff

    i - W < j <= i            (W keys, the query's own key included; W <= 0 means no window)
"""

import math

import numpy as np
from numba.extending import register_jitable

from .fp16 import widen

#: keys per tile of the online softmax: small enough that a tile's scores and V rows stay in L1.
TILE = 32
#: columns of attend_group's scratch ``work``: one tile of scores, then the running max m and the running sum l
WORK_COLUMNS = TILE + 2


@register_jitable
def visible(i, j, window):
    """True iff key position j is visible from query position i: ``i - W < j <= i`` (no window when W <= 0)."""
    return j <= i and (window <= 0 or j > i - window)


@register_jitable
def first_visible(i, window):
    """Smallest visible key position for query position i: ``max(0, i - W + 1)`` (0 when there is no window)."""
    if window <= 0:
        return 0
    return max(0, i - window + 1)


@register_jitable
def exp_f32(x):
    """exp(x) in float32. The compiled CPU backend swaps in a vectorisable polynomial (``kvref/cpu/fast_math.py``),
    tested against this function to a stated bound."""
    return np.float32(math.exp(x))


@register_jitable
def attend_group(q, keys, values, n_keys, scale, out, work):
    """Attention of the G query heads of one KV head over ``n_keys`` visible key/value rows.

    q:       (G, D) float32        the G query heads that share this KV head
    keys:    (N, D) float32|uint16  rows 0 .. n_keys-1 are visible (uint16 = fp16 bit patterns)
    values:  (N, D) same dtype as keys
    scale:   float32, usually 1/sqrt(D)
    out:     (G, D) float32        receives the attention output; used as the accumulator ``acc``
    work:    (G, WORK_COLUMNS) float32 scratch: one tile's scores, then m (column TILE) and l (column TILE + 1)
    """
    G = q.shape[0]
    D = q.shape[1]
    # Rows are taken as 1-D views (k_row, q_row, acc_row): Numba then vectorises the d loops without index checks.
    M = TILE  # column of the running max m
    L = TILE + 1  # column of the running sum l
    for g in range(G):
        work[g, M] = -np.inf
        work[g, L] = 0.0
        for d in range(D):
            out[g, d] = 0.0
    for start in range(0, n_keys, TILE):
        n = min(TILE, n_keys - start)
        k_tile = keys[start:start + n]  # (n, D)
        v_tile = values[start:start + n]  # (n, D)
        # 1. scores of the tile: each K row is read once for all G query heads
        for j in range(n):
            k_row = k_tile[j]
            for g in range(G):
                q_row = q[g]
                s = np.float32(0.0)
                for d in range(D):
                    s += q_row[d] * widen(k_row[d])
                work[g, j] = s * scale
        # 2. online softmax: new max, rescale what was summed, probabilities of the tile
        for g in range(G):
            m_old = work[g, M]
            m_new = m_old
            for j in range(n):
                m_new = max(m_new, work[g, j])
            c = exp_f32(m_old - m_new)
            total = work[g, L] * c
            for j in range(n):
                p = exp_f32(work[g, j] - m_new)
                work[g, j] = p
                total += p
            work[g, M] = m_new
            work[g, L] = total
            for d in range(D):
                out[g, d] *= c
        # 3. acc += p_j * v_j: each V row is read once for all G query heads
        for j in range(n):
            v_row = v_tile[j]
            for g in range(G):
                p = work[g, j]
                acc_row = out[g]
                for d in range(D):
                    acc_row[d] += p * widen(v_row[d])
    for g in range(G):
        total = work[g, L]
        inv = np.float32(1.0) / total if total > 0 else np.float32(0.0)
        for d in range(D):
            out[g, d] *= inv


def default_scale(head_dim):
    """The usual softmax scale 1 / sqrt(head_dim), as float32."""
    return np.float32(1.0 / math.sqrt(head_dim))
