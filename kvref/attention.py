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
  store); a few rows at a time are decoded into a small scratch (never into a float copy of the store);
* :func:`attend_slots`: each row carries its own absolute position and takes part iff :func:`visible` says so. The
  rows can be in any order (a ring's slots; -1 marks an empty slot). Order does not matter because the online
  softmax is a sum, and the keys were rotated (RoPE) at their absolute positions before they were stored.

Several segments can feed one softmax: :func:`softmax_start`, any number of segments, :func:`softmax_finish`.
Every variant (flat, ring, pooled, two-tier) feeds its segments to these same functions.

**The grouped kernel: a tile in three phases** (``../shared/reference/grouped_attention_facts.md``):

1. scores (:func:`score_rows`): KEYS key rows x G heads per pass over d (:func:`score_block`); each K element is
   loaded once and used G times, and the KEYS x G sums stay in registers;
2. softmax (:func:`softmax_weights`): the online-softmax update above, once per tile;
3. values (:func:`accumulate_rows`): d outer, ROWS value rows x G heads inner (:func:`accumulate_block`); each V
   element is loaded once for G heads and each accumulator element once per ROWS rows.

Every sum still runs in the plain order (a dot product over d = 0 .. D-1; the values over the keys in order), so
run as plain Python the results are those of the textbook loops, bit for bit.

**Specialisation.** The scratch (accumulators ``acc`` (G, D), a tile's scores and m, l ``work`` (G, TILE + 2), the
score sums ``block`` (KEYS, G)) comes from :func:`local_array`, called once at the top of each variant's
``attend_one``: ``np.empty`` in plain Python, a stack array compiled for the CPU, CUDA local memory on a GPU. For
that, G and D must be compile-time constants: every variant's ``attend_tokens`` / ``attend_one`` takes them as its
last arguments (``group``, ``head_dim``), and the compiled backends call it from a closure per shape whose free
variables hold them (:class:`kvref.lowering.Specialisations`), which Numba passes on as integer literals. With G
and D constant, LLVM unrolls the loops over G and keys, keeps the blocks in registers, and knows the scratch aliases
nothing. Each shape compiles on first use (a few seconds; then cached on disk), for any G and head_dim.

The phase functions are marked :func:`inlined`: they are always inlined into their caller, so no array view is ever
passed to a separate function (which would cost two atomic reference-count updates per call), and on the CPU they
are compiled as part of the caller: with its fast-math flags (re-association lets the sums use SIMD lanes), its
constant G and D and its stack arrays in sight.
"""

import math

import numpy as np
from numba.extending import register_jitable

from . import quant
from .fp16 import widen

#: keys per tile of the online softmax: small enough that a tile's scores and V rows stay in L1.
TILE = 32
#: columns of the scratch ``work``: one tile of scores (columns 0 .. TILE-1), then the running max m and sum l
WORK_COLUMNS = TILE + 2
M_COLUMN = TILE
L_COLUMN = TILE + 1
#: KEYS, the key rows one score pass takes (:func:`score_block`): the rows of the scratch ``block``. A pass keeps
#: KEYS x G sums in vector registers, loads each K element once for G heads and each q element once for KEYS keys.
#: Measured on this machine (AVX2: 16 vector registers; BENCHMARKS.md), one key per pass is best for every G: the G
#: sums of one key already fill the registers. (With AVX-512's 32 registers, 2-4 keys were best:
#: ``grouped_attention_facts.md``; set it here, it is read nowhere else.)
SCORE_KEYS = 1
#: the most value rows one pass adds (:func:`rows_per_pass`), rows of the decoded-row scratch of quantized attention
MAX_ROWS = 8


#: the spec functions of the kernel's inner loops (marked :func:`inlined`), for the compiled backends
INLINED = []


def inlined(fn):
    """Mark a spec function of the kernel's inner loops: a ``register_jitable`` function that is always inlined into
    its caller (for CUDA by LLVM; for the CPU by Numba, before it compiles the caller: ``kvref/cpu/fast_math.py``)."""
    register_jitable(forceinline=True)(fn)
    INLINED.append(fn)
    return fn


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


# ---------------------------------------------------------------------------------------------------------------
# The grouped kernel: scratch, then the three phases of a tile (scores, softmax, values)
# ---------------------------------------------------------------------------------------------------------------
def local_array(shape):
    """A float32 scratch array of ``shape`` (a tuple), private to one call: ``np.empty`` here, in plain Python.

    Compiled, every dimension must be a compile-time constant (Numba literals: G and D are passed down from a
    specialised entry point, see "Specialisation" above), and the array lives on the stack or in CUDA local memory
    (``kvref/lowering.py``; registered by ``kvref/cpu/fast_math.py`` and ``kvref/cuda/__init__.py``). Its contents
    start undefined, as ``np.empty``'s. Call it at the top of a function that is *not* force-inlined, once, never inside a loop or an inlined helper.
    """
    return np.empty(shape, np.float32)


@inlined
def rows_per_pass(group):
    """ROWS: value rows added together in one pass over d (ROWS x G weights stay in registers; each accumulator
    element is loaded and stored once per ROWS rows instead of once per row). Measured best here: 8 rows for G <= 4,
    4 for G <= 7, 2 for G >= 8."""
    if group >= 8:
        return 2
    if group >= 5:
        return 4
    return MAX_ROWS


@inlined
def softmax_start(acc, work):
    """Begin an online softmax for G query heads: m = -inf, l = 0, acc = 0."""
    G, D = acc.shape
    for g in range(G):
        work[g, M_COLUMN] = -np.inf
        work[g, L_COLUMN] = 0.0
        for d in range(D):
            acc[g, d] = 0.0


@register_jitable
def lane_sum(x):
    """The sum of ``x`` over the lanes that share one dot product: the identity here, and on the CPU.

    A CUDA flash-decoding block cuts head_dim over L lanes (threads), lane j holding columns j, j + L, j + 2L, ...
    (kvref/cuda/__init__.py, "Flash-decoding"); each lane's :func:`score_block` then sums its own columns, and
    this adds the L partial sums, so every lane gets the whole score. On a GPU it is a butterfly of warp shuffles
    (``cuda.shfl_xor_sync``, log2 L steps; each step adds the same two numbers in every lane, so all lanes get the
    same bits); in the CUDA simulator, which has no shuffles, the same butterfly through the block's barrier. With
    one lane, as everywhere outside those kernels, there is nothing to add."""
    return x


@inlined
def score_block(q, keys, first, n, scale, work, column, block):
    """Scores of n key rows (n a small constant: KEYS, or 1 at the end of a run) for the G query heads, in one
    pass over d:

        block[k, g] = sum_d q[g, d] * k_{first+k}[d];     work[g, column + k] = scale * block[k, g]

    Each K element is loaded once and used for all G heads; the n x G sums stay in registers (``block`` is a stack
    array indexed by constants only). Every sum runs over d in order, as a plain dot product does."""
    G, D = work.shape[0], q.shape[1]
    for k in range(n):
        for g in range(G):
            block[k, g] = 0.0
    for d in range(D):
        for k in range(n):
            key = widen(keys[first + k, d])
            for g in range(G):
                block[k, g] += q[g, d] * key
    for k in range(n):
        for g in range(G):
            work[g, column + k] = lane_sum(block[k, g]) * scale


@inlined
def score_rows(q, keys, first, n, scale, work, column, block):
    """Scores of key rows first .. first+n-1 into ``work[:, column:column+n]``, SCORE_KEYS rows per pass
    (:func:`score_block`), then single rows."""
    if SCORE_KEYS == 1:  # (a constant: Numba compiles only the branch taken)
        for j in range(n):
            score_block(q, keys, first + j, 1, scale, work, column + j, block)
    else:
        j = 0
        while j + SCORE_KEYS <= n:
            score_block(q, keys, first + j, SCORE_KEYS, scale, work, column + j, block)
            j += SCORE_KEYS
        while j < n:
            score_block(q, keys, first + j, 1, scale, work, column + j, block)
            j += 1


@inlined
def softmax_weights(n, acc, work):
    """The softmax half of a tile update: turn the tile's n scores (``work[:, :n]``, -inf for a masked key) into
    weights p_j = exp(s_j - m') in place, update the running max and sum, and rescale the accumulator.

    m' = max(m, max_j s_j);  c = exp(m - m');  l' = c l + sum_j p_j;  acc = c acc
    At least one score of the tile must be finite (callers skip fully masked tiles).

    A short tile (n < TILE) is padded with scores -inf, whose weights are 0: so the loops always run over TILE
    columns, a constant trip count that compiles to whole vectors (max(m, -inf) = m and l + 0 = l exactly).
    """
    G, D = acc.shape
    for g in range(G):
        for j in range(n, TILE):
            work[g, j] = -np.inf
        m_old = work[g, M_COLUMN]
        m_new = m_old
        for j in range(TILE):
            m_new = max(m_new, work[g, j])
        c = exp_f32(m_old - m_new)
        total = work[g, L_COLUMN] * c
        for j in range(TILE):
            p = exp_f32(work[g, j] - m_new)  # a masked key: exp(-inf) = 0
            work[g, j] = p
            total += p
        work[g, M_COLUMN] = m_new
        work[g, L_COLUMN] = total
        for d in range(D):
            acc[g, d] *= c


@inlined
def accumulate_block(values, first, n, acc, work, column):
    """The value half for n value rows (n a small constant: ROWS, or 1), d outer:

        acc[g, d] += sum_r p_{column+r} * v_{first+r}[d]        (r = 0 .. n-1 in order, for every g and d)

    Each V element is loaded once for all G heads, and each accumulator element is loaded and stored once per n
    rows. As in fused attention kernels a masked row is multiplied by p = 0, so every stored value must be finite."""
    G, D = acc.shape
    for d in range(D):
        for g in range(G):
            for r in range(n):
                acc[g, d] += work[g, column + r] * widen(values[first + r, d])


@inlined
def accumulate_rows(values, first, n, acc, work, column):
    """Add value rows first .. first+n-1, weighted by ``work[:, column:column+n]``: ROWS rows per pass, then single
    rows (:func:`accumulate_block`)."""
    step = rows_per_pass(work.shape[0])
    r = 0
    while r + step <= n:
        accumulate_block(values, first + r, step, acc, work, column + r)
        r += step
    while r < n:
        accumulate_block(values, first + r, 1, acc, work, column + r)
        r += 1


@inlined
def attend_rows(q, keys, values, n_keys, scale, acc, work, block):
    """Fold key/value rows 0 .. n_keys-1, all visible, into the running softmax, a tile of TILE rows at a time."""
    for start in range(0, n_keys, TILE):
        n = min(TILE, n_keys - start)
        score_rows(q, keys, start, n, scale, work, 0, block)
        softmax_weights(n, acc, work)
        accumulate_rows(values, start, n, acc, work, 0)


@inlined
def attend_slots(q, keys, values, key_positions, end, query_position, window, sinks, scale, acc, work, block):
    """Fold the rows of ``keys``/``values`` whose stored position is visible from ``query_position`` (any row order).

    key_positions: (N,) int64, the absolute position held by each row (-1: empty). Row r takes part iff
    ``key_positions[r] < end`` and ``visible(query_position, key_positions[r], window, sinks)``; the others get
    score -inf. (``end`` lets a caller ignore positions it knows are not committed; ``query_position + 1`` ignores
    nothing.) A tile is cut after its last visible row, so rows 0 .. p of an unwrapped ring go through exactly the
    tiles :func:`attend_rows` uses for the flat cache (the same arithmetic, hence bit-identical results).
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
        score_rows(q, keys, start, n, scale, work, 0, block)
        if n_visible < n:  # some rows before the last visible one are masked
            for j in range(n):
                position = key_positions[start + j]
                if not (position < end and visible(query_position, position, window, sinks)):
                    for g in range(work.shape[0]):
                        work[g, j] = -np.inf  # masked: whatever the slot holds, its weight is exp(-inf) = 0
        softmax_weights(n, acc, work)
        accumulate_rows(values, start, n, acc, work, 0)


@inlined
def decode_rows(rows, first, n, fmt, decoded, codes):
    """Decode quantized rows first .. first+n-1 (uint8 ggml blocks of format ``fmt``) into ``decoded[0:n]``
    (``decoded``: (MAX_ROWS, D) float32; ``codes``: (1, 32) float32 scratch for one block's codes)."""
    for r in range(n):
        quant.dequantize_row(rows[first + r], fmt, decoded[r], codes[0])


@inlined
def attend_quantized_rows(q, keys, values, n_keys, fmt, scale, acc, work, block, decoded, codes):
    """Fold quantized key/value rows 0 .. n_keys-1 (all visible; uint8 ggml blocks of format ``fmt``) into the
    running softmax: :func:`attend_rows`, with each group of rows decoded once into ``decoded`` (a stack array that
    stays in L1; there is never a float copy of the store) and then used for all G heads."""
    key_step = SCORE_KEYS
    row_step = rows_per_pass(work.shape[0])
    for start in range(0, n_keys, TILE):
        n = min(TILE, n_keys - start)
        for j in range(0, n, key_step):
            count = min(key_step, n - j)
            decode_rows(keys, start + j, count, fmt, decoded, codes)
            score_rows(q, decoded, 0, count, scale, work, j, block)
        softmax_weights(n, acc, work)
        for r in range(0, n, row_step):
            count = min(row_step, n - r)
            decode_rows(values, start + r, count, fmt, decoded, codes)
            accumulate_rows(decoded, 0, count, acc, work, r)


@inlined
def normalise(acc, totals, out):
    """``out[g] = acc[g] / l_g`` with ``l_g = totals[g]`` (zeros when no key was visible: l = 0)."""
    G, D = acc.shape
    for g in range(G):
        total = totals[g]
        inv = np.float32(1.0) / total if total > 0 else np.float32(0.0)
        for d in range(D):
            out[g, d] = acc[g, d] * inv


@inlined
def softmax_finish(acc, work, out):
    """End the online softmax: ``out = acc / l`` (zeros when no key was visible)."""
    normalise(acc, work[:, L_COLUMN], out)


# ---------------------------------------------------------------------------------------------------------------
# Split-K (flash-decoding): partial softmax states over disjoint key sets, and their merge
# ---------------------------------------------------------------------------------------------------------------
@register_jitable
def key_share(n_keys, part, parts):
    """Keys [lo, hi) of part ``part`` of ``parts`` (0 <= part < parts) of n keys: whole tiles, as equal as can be.

        tiles = ceil(n / TILE);     lo = min(n, floor(tiles * part / parts) * TILE)
                                    hi = min(n, floor(tiles * (part + 1) / parts) * TILE)

    Every share starts on a tile boundary, so each part cuts its keys into the very tiles one unsplit pass would;
    shares differ by at most one tile (the last one may hold a partial tile); with fewer tiles than parts some
    shares are empty (lo = hi)."""
    tiles = (n_keys + TILE - 1) // TILE
    lo = min(n_keys, tiles * part // parts * TILE)
    return lo, min(n_keys, tiles * (part + 1) // parts * TILE)


@inlined
def save_state(acc, work, part_acc, part_m_l):
    """Store a running softmax as a partial state: ``part_acc = acc`` (G, D), ``part_m_l[g] = (m_g, l_g)`` (G, 2).
    A part that saw no key keeps m = -inf, l = 0, acc = 0."""
    G, D = acc.shape
    for g in range(G):
        part_m_l[g, 0] = work[g, M_COLUMN]
        part_m_l[g, 1] = work[g, L_COLUMN]
        for d in range(D):
            part_acc[g, d] = acc[g, d]


@register_jitable
def merge_weight(m_part, m):
    """exp(m_part - m), the factor that rescales a part's sums from its own max to the merged max m. An empty part
    (m_part = -inf) weighs 0: computed as exp(-inf - m) it would be NaN when every part is empty (m = -inf)."""
    if m_part == -np.inf:
        return 0.0
    return math.exp(m_part - m)


@inlined
def merge_state(acc, m_l, part_acc, part_m_l):
    """Merge partial state 2 (``part_acc``, ``part_m_l``) into partial state 1 (``acc``, ``m_l``), in place. The two
    parts saw disjoint sets of keys; the result is the state of their union (Milakov & Gimelshein 2018):

        m   = max(m1, m2)
        l   = l1 exp(m1 - m)   + l2 exp(m2 - m)
        acc = acc1 exp(m1 - m) + acc2 exp(m2 - m)

    An empty part (m = -inf) has weight 0 (:func:`merge_weight`), so merging it changes nothing, and two empty parts
    give an empty part, never NaN. The merge is associative: any split of the keys, merged in any grouping, gives
    the unsplit sums up to rounding (exactly, in exact arithmetic). Works in any float dtype."""
    G, D = acc.shape
    for g in range(G):
        m1 = m_l[g, 0]
        m2 = part_m_l[g, 0]
        m = max(m1, m2)
        c1 = merge_weight(m1, m)
        c2 = merge_weight(m2, m)
        m_l[g, 0] = m
        m_l[g, 1] = m_l[g, 1] * c1 + part_m_l[g, 1] * c2
        for d in range(D):
            acc[g, d] = acc[g, d] * c1 + part_acc[g, d] * c2


@register_jitable
def merge_parts(part_acc, part_m_l, out, group, head_dim):
    """The attention output of one work item from its P partial states: start from the empty state (m = -inf,
    l = 0, acc = 0), merge parts 0 .. P-1 into it in order (:func:`merge_state`), then ``out = acc / l``.

    part_acc: (P, G, D), part_m_l: (P, G, 2) (both only read), out: (G, D); group, head_dim: G and D (compile-time
    constants when compiled). The running state is private to the call, so threads that each merge their own columns
    d of the same item never write what another reads. With P = 1 the merge is exact (the empty state weighs 0 and
    part 0 weighs exp(0) = 1), so the output is bit for bit :func:`softmax_finish`'s."""
    acc = local_array((group, head_dim))  # the merged, unnormalised output
    m_l = local_array((group, 2))  # the merged (m, l)
    for g in range(group):
        m_l[g, 0] = -np.inf
        m_l[g, 1] = 0.0
        for d in range(head_dim):
            acc[g, d] = 0.0
    for part in range(part_acc.shape[0]):
        merge_state(acc, m_l, part_acc[part], part_m_l[part])
    normalise(acc, m_l[:, 1], out)


@register_jitable
def attend_group(q, keys, values, n_keys, scale, out, group, head_dim):
    """Attention of the G query heads of one KV head over ``n_keys`` visible key/value rows (rows 0 .. n_keys-1).

    q:       (G, D) float32        the G query heads that share this KV head
    keys:    (N, D) float32|uint16  rows 0 .. n_keys-1 are visible (uint16 = fp16 bit patterns)
    values:  (N, D) same dtype as keys
    scale:   float32, usually 1/sqrt(D)
    out:     (G, D) float32        receives the attention output
    group, head_dim: G and D (compile-time constants when compiled)
    """
    acc = local_array((group, head_dim))  # the unnormalised output
    work = local_array((group, WORK_COLUMNS))  # a tile's scores, then m and l
    block = local_array((SCORE_KEYS, group))  # the sums of one score pass
    softmax_start(acc, work)
    attend_rows(q, keys, values, n_keys, scale, acc, work, block)
    softmax_finish(acc, work, out)


@register_jitable
def merge_tokens(part_acc, part_m_l, out, group, head_dim):
    """The output of every work item (i, t, h) of a split-K step from its partial states (:func:`merge_parts`).

    part_acc: (n_seq, T, kv_heads, P, G, D) and part_m_l: (n_seq, T, kv_heads, P, G, 2), part p of item (i, t, h)
    at [i, t, h, p]; out: (n_seq, T, q_heads, D), query heads h*G .. h*G+G-1 for KV head h."""
    n_seq, n_tokens, kv_heads = part_acc.shape[:3]
    for i in range(n_seq):
        for t in range(n_tokens):
            for h in range(kv_heads):
                merge_parts(part_acc[i, t, h], part_m_l[i, t, h], out[i, t, h * group:(h + 1) * group], group,
                            head_dim)


@register_jitable
def ring_run(lo, hi, capacity):
    """Position range [lo, hi) of a ring of ``capacity`` slots (slot p % capacity) as at most two runs of slots:
    returns (start, n_first, n_second): slots start .. start+n_first-1, then 0 .. n_second-1."""
    start = lo % capacity
    n_first = min(hi - lo, capacity - start)
    return start, n_first, hi - lo - n_first


@register_jitable
def attend_gathered_one(keys, values, key_positions, positions, window, sinks, q, scale, out, i, t, h, group,
                        head_dim):
    """The G query heads of KV head h, for query t of sequence i, over the gathered rows (see below)."""
    acc = local_array((group, head_dim))
    work = local_array((group, WORK_COLUMNS))
    block = local_array((SCORE_KEYS, group))
    p = positions[i, t]
    q_heads = q[i, t, h * group:(h + 1) * group]
    softmax_start(acc, work)
    attend_slots(q_heads, keys[i, h], values[i, h], key_positions[i], p + 1, p, window, sinks, scale, acc, work,
                 block)
    softmax_finish(acc, work, out[i, t, h * group:(h + 1) * group])


@register_jitable
def attend_gathered_tokens(keys, values, key_positions, positions, window, sinks, q, scale, out, group, head_dim):
    """Attention over gathered float32 K/V rows that carry their positions (a dense reference layout: the two-tier
    cache's materializing path builds it from both tiers and the step's rows; the golden suite's dense attention
    cases), masked by the window rule :func:`visible` (W = ``window``, S = ``sinks``).

    keys, values: (n_seq, kv_heads, N, D) float32;  key_positions: (n_seq, N) int64, -1 for padding
    positions: (n_seq, T) query positions;  q, out: (n_seq, T, q_heads, D) float32
    group, head_dim: G = q_heads // kv_heads and D (compile-time constants when compiled)
    """
    n_seq, n_tokens = positions.shape
    for i in range(n_seq):
        for t in range(n_tokens):
            for h in range(keys.shape[1]):
                attend_gathered_one(keys, values, key_positions, positions, window, sinks, q, scale, out, i, t, h,
                                    group, head_dim)


def default_scale(head_dim):
    """The usual softmax scale 1 / sqrt(head_dim), as float32."""
    return np.float32(1.0 / math.sqrt(head_dim))
