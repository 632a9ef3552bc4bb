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

**Window rule** (one definition for every variant, :func:`visible`): key position j is visible from query position i iff

    i - W < j <= i            W keys, the query's own key included (W <= 0: no window, plain causal)

and with S attention sinks (StreamingLLM) the first S positions stay visible as well:

    j < S  or  i - (W - S) < j,   and  0 <= j <= i      still W keys at most: S sinks + the last W - S

How this maps onto FlashAttention's ``window_size_left``, Hugging Face's, llama.cpp's and Mistral's windows is
tabulated in ``kvref/ring.py``, the cache built on it.

A segment of key rows enters the softmax in one of three ways, sharing the tile update (:func:`softmax_weights`,
then the value rows):

* :func:`attend_rows`: rows 0 .. n-1 are all visible (the flat cache: positions 0 .. p in order);
* :func:`attend_quantized_rows`: rows 0 .. n-1 are all visible and stored as ggml blocks (the two-tier cache's
  store); each block is decoded inside the loop, never into a float copy of the row;
* :func:`attend_slots`: each row carries its own absolute position and takes part iff :func:`visible` says so. The
  rows can be in any order (a ring's slots; -1 marks an empty slot). Order does not matter because the online
  softmax is a sum, and the keys were rotated (RoPE) at their absolute positions before they were stored.

Several segments can feed one softmax: :func:`softmax_start`, any number of segments, :func:`softmax_finish`.

The tile functions are marked ``forceinline``: compiled, an array view handed to a function that is not inlined
costs two atomic reference-count updates (and an atomic is a memory fence on x86), which the paged cache, calling
:func:`attend_rows` once per block of 16 keys, would pay per block. Inlined, Numba drops them.
"""

import math

import numpy as np
from numba.extending import register_jitable

from . import quant
from .fp16 import widen

#: keys per tile of the online softmax: small enough that a tile's scores and V rows stay in L1.
TILE = 32
#: columns of attend_group's scratch ``work``: one tile of scores, then the running max m and the running sum l
WORK_COLUMNS = TILE + 2


@register_jitable
def visible(i, j, window, sinks=0):
    """True iff key position j is visible from query position i: ``i - W < j <= i``.

    window: W, the number of keys a query sees, itself included; W <= 0 means no window (every j <= i).
    sinks:  S, the first S positions stay visible forever (attention sinks); the rest of the window is the last
            W - S positions, so a query still sees at most W keys. Requires 0 <= S < W when W > 0.
    j < 0 is never visible (an empty slot stores position -1).
    """
    if j < 0 or j > i:
        return False
    if window <= 0 or j < sinks:
        return True
    return j > i - (window - sinks)


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
def softmax_start(out, work):
    """Begin an online softmax for G query heads: m = -inf, l = 0, acc (``out``) = 0."""
    for g in range(out.shape[0]):
        work[g, TILE] = -np.inf  # running max m
        work[g, TILE + 1] = 0.0  # running sum l
        for d in range(out.shape[1]):
            out[g, d] = 0.0


@register_jitable(forceinline=True)
def score_tile(q, k_tile, n, scale, work):
    """Scores of a tile of n key rows for the G query heads: ``work[g, j] = scale * (q[g] . k_tile[j])``. Each K row
    is read once and used for all G heads (GQA)."""
    G = q.shape[0]
    D = q.shape[1]
    for j in range(n):
        k_row = k_tile[j]
        for g in range(G):
            q_row = q[g]
            s = np.float32(0.0)
            for d in range(D):
                s += q_row[d] * widen(k_row[d])
            work[g, j] = s * scale


@register_jitable(forceinline=True)
def softmax_weights(n, out, work):
    """The softmax half of a tile update: turn the tile's n scores (``work[:, :n]``, -inf for a masked key) into
    weights p_j = exp(s_j - m') in place, update the running max and sum, and rescale the accumulator ``out``.

    m' = max(m, max_j s_j);  c = exp(m - m');  l' = c l + sum_j p_j;  acc = c acc
    At least one score of the tile must be finite (callers skip fully masked tiles).
    """
    M = TILE  # column of the running max m
    L = TILE + 1  # column of the running sum l
    G = out.shape[0]
    D = out.shape[1]
    for g in range(G):
        m_old = work[g, M]
        m_new = m_old
        for j in range(n):
            m_new = max(m_new, work[g, j])
        c = exp_f32(m_old - m_new)
        total = work[g, L] * c
        for j in range(n):
            p = exp_f32(work[g, j] - m_new)  # a masked key: exp(-inf) = 0
            work[g, j] = p
            total += p
        work[g, M] = m_new
        work[g, L] = total
        for d in range(D):
            out[g, d] *= c


@register_jitable(forceinline=True)
def accumulate_rows(v_tile, n, out, work):
    """The value half of a tile update: ``acc[g] += p_j * v_j`` for the tile's n value rows (weights in ``work``).

    Each V row is read once for all G query heads. As in fused attention kernels, a masked row is multiplied by
    p = 0, so every stored value must be finite (a stored inf or NaN would poison the output even while masked).
    """
    G = out.shape[0]
    D = out.shape[1]
    for j in range(n):
        v_row = v_tile[j]
        for g in range(G):
            p = work[g, j]
            acc_row = out[g]
            for d in range(D):
                acc_row[d] += p * widen(v_row[d])


@register_jitable(forceinline=True)
def softmax_tile(v_tile, n, out, work):
    """Fold one tile of n scores (``work[:, :n]``) and its n value rows into the running softmax of G heads."""
    softmax_weights(n, out, work)
    accumulate_rows(v_tile, n, out, work)


@register_jitable(forceinline=True)
def attend_rows(q, keys, values, n_keys, scale, out, work):
    """Fold key/value rows 0 .. n_keys-1, all visible, into the running softmax (a tile of TILE rows at a time)."""
    for start in range(0, n_keys, TILE):
        n = min(TILE, n_keys - start)
        score_tile(q, keys[start:start + n], n, scale, work)
        softmax_tile(values[start:start + n], n, out, work)


@register_jitable
def attend_slots(q, keys, values, key_positions, end, query_position, window, sinks, scale, out, work):
    """Fold the rows of ``keys``/``values`` whose stored position is visible from ``query_position`` (any row order).

    key_positions: (N,) int64, the absolute position held by each row (-1: empty). Row r takes part iff
    ``key_positions[r] < end`` and ``visible(query_position, key_positions[r], window, sinks)``; the others get
    score -inf. (``end`` lets a caller ignore positions it knows are not committed; ``query_position + 1`` ignores
    nothing.) A tile is cut after
    its last visible row, so rows 0 .. p of an unwrapped ring go through exactly the tiles :func:`attend_rows` uses
    for the flat cache (the same arithmetic, hence bit-identical results).
    """
    n_rows = keys.shape[0]
    for start in range(0, n_rows, TILE):
        n = 0  # the tile is used up to its last visible row (a fully masked tile is skipped)
        n_visible = 0
        for j in range(min(TILE, n_rows - start)):
            position = key_positions[start + j]
            if position < end and visible(query_position, position, window, sinks):
                n = j + 1
                n_visible += 1
        if n == 0:
            continue
        score_tile(q, keys[start:start + n], n, scale, work)
        if n_visible < n:  # some rows before the last visible one are masked
            for j in range(n):
                position = key_positions[start + j]
                if not (position < end and visible(query_position, position, window, sinks)):
                    for g in range(q.shape[0]):
                        work[g, j] = -np.inf  # masked: whatever the slot holds, its weight is exp(-inf) = 0
        softmax_tile(values[start:start + n], n, out, work)


@register_jitable(forceinline=True)
def score_quantized_tile(q, k_tile, n, fmt, scale, work, scratch):
    """Scores of a tile of n quantized key rows for the G query heads: each row is decoded once (into ``scratch``,
    head_dim + 32 floats) and used for all G heads (GQA), as :func:`score_tile` widens an fp16 row."""
    G = q.shape[0]
    D = q.shape[1]
    row = scratch[:D]
    for j in range(n):
        quant.dequantize_row(k_tile[j], fmt, scratch)
        for g in range(G):
            q_row = q[g]
            s = np.float32(0.0)
            for d in range(D):
                s += q_row[d] * row[d]
            work[g, j] = s * scale


@register_jitable(forceinline=True)
def accumulate_quantized_rows(v_tile, n, fmt, out, work, scratch):
    """``acc[g] += p_j * v~_j`` for n quantized value rows, each decoded once (into ``scratch``) for all G heads."""
    G = out.shape[0]
    D = out.shape[1]
    row = scratch[:D]
    for j in range(n):
        quant.dequantize_row(v_tile[j], fmt, scratch)
        for g in range(G):
            p = work[g, j]
            acc_row = out[g]
            for d in range(D):
                acc_row[d] += p * row[d]


@register_jitable
def attend_quantized_rows(q, keys, values, n_keys, fmt, scale, out, work, scratch):
    """Fold quantized key/value rows 0 .. n_keys-1 (all visible; uint8 ggml blocks of format ``fmt``) into the
    running softmax, a tile at a time: the quantized twin of :func:`attend_rows`. ``scratch``: head_dim + 32 floats."""
    for start in range(0, n_keys, TILE):
        n = min(TILE, n_keys - start)
        score_quantized_tile(q, keys[start:start + n], n, fmt, scale, work, scratch)
        softmax_weights(n, out, work)
        accumulate_quantized_rows(values[start:start + n], n, fmt, out, work, scratch)


@register_jitable
def softmax_finish(out, work):
    """End the online softmax: ``out = acc / l`` (zeros when no key was visible)."""
    for g in range(out.shape[0]):
        total = work[g, TILE + 1]
        inv = np.float32(1.0) / total if total > 0 else np.float32(0.0)
        for d in range(out.shape[1]):
            out[g, d] *= inv


@register_jitable
def attend_group(q, keys, values, n_keys, scale, out, work):
    """Attention of the G query heads of one KV head over ``n_keys`` visible key/value rows (rows 0 .. n_keys-1).

    q:       (G, D) float32        the G query heads that share this KV head
    keys:    (N, D) float32|uint16  rows 0 .. n_keys-1 are visible (uint16 = fp16 bit patterns)
    values:  (N, D) same dtype as keys
    scale:   float32, usually 1/sqrt(D)
    out:     (G, D) float32        receives the attention output; used as the accumulator ``acc``
    work:    (G, WORK_COLUMNS) float32 scratch: one tile's scores, then m (column TILE) and l (column TILE + 1)
    """
    softmax_start(out, work)
    attend_rows(q, keys, values, n_keys, scale, out, work)
    softmax_finish(out, work)


@register_jitable
def ring_run(lo, hi, capacity):
    """Position range [lo, hi) of a ring of ``capacity`` slots (slot p % capacity) as at most two runs of slots:
    returns (start, n_first, n_second): slots start .. start+n_first-1, then 0 .. n_second-1."""
    start = lo % capacity
    n_first = min(hi - lo, capacity - start)
    return start, n_first, hi - lo - n_first


@register_jitable
def attend_gathered_tokens(keys, values, key_positions, positions, window, sinks, q, scale, out):
    """Attention over gathered float32 K/V rows that carry their positions (a dense reference layout: the two-tier
    cache's materializing path builds it from both tiers and the step's rows; the golden suite's dense attention
    cases), masked by the window rule :func:`visible` (W = ``window``, S = ``sinks``).

    keys, values: (n_seq, kv_heads, N, D) float32;  key_positions: (n_seq, N) int64, -1 for padding
    positions: (n_seq, T) query positions;  q, out: (n_seq, T, q_heads, D) float32
    """
    n_seq, n_tokens, q_heads, _ = q.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    work = np.empty((group, WORK_COLUMNS), np.float32)
    for i in range(n_seq):
        for t in range(n_tokens):
            p = positions[i, t]
            for h in range(kv_heads):
                q_heads_h = q[i, t, h * group:(h + 1) * group]
                out_heads = out[i, t, h * group:(h + 1) * group]
                softmax_start(out_heads, work)
                attend_slots(q_heads_h, keys[i, h], values[i, h], key_positions[i], p + 1, p, window, sinks, scale,
                             out_heads, work)
                softmax_finish(out_heads, work)


def default_scale(head_dim):
    """The usual softmax scale 1 / sqrt(head_dim), as float32."""
    return np.float32(1.0 / math.sqrt(head_dim))
