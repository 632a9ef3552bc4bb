"""The pooled (paged) cache: fixed-size blocks from one shared pool, a block table per sequence. This file is its
whole algorithm: addressing, paged attention, and the plan (allocation, copy-on-write, eviction); the pool's books
are in ``kvref/pool.py`` and the FlashInfer / vLLM page-table formats in ``kvref/page_table.py``.

**Addressing.** The pool holds ``num_blocks`` blocks of exactly ``B = block_size`` token slots, each for every layer,
K and V (a block holds exactly B tokens; seed 004 took its blocks from byte size classes, so a block held more)::

    kv[layer, 0=K|1=V, block, kv_head, offset, dim]        shape (layers, 2, num_blocks, kv_heads, B, head_dim)

Sequence s lists its blocks, in position order, in its **block table** ``tables[s]``. Position p lives in::

    block  = tables[s][p // B - first[s]]          first[s] = e[s] // B, the first block still held (0 without eviction)
    offset = p % B
    slot   = block * B + offset                     vLLM's slot_mapping value (block = slot // B, offset = slot % B)

Without eviction ``first[s] = 0`` and this is ``block_table[s][p // B] * B + p % B`` (ARCHITECTURE.md). Blocks carry
ref counts (how many tables list them) and wait in a FIFO free queue when none does (``kvref/pool.py``).

**A step** is every variant's plan -> write (per layer) -> attend (per layer) -> advance:

1. **plan** (host, :func:`plan_blocks`) runs the step as a *dry run* on a copy of the books (ref counts, free
   queue, tables, lengths), one sequence after the other:

   - *copy-on-write*: if the sequence's last block is partially filled (``L % B != 0``), the step writes into it. If
     that block S is shared (ref >= 2 before the step), take a fresh block D, record the copy S -> D, list D instead
     of S and drop one reference to S. Every sharer that appends copies (after a crop, sharers of S can have
     different lengths, so writing into S could overwrite a row another sharer still holds); when the last
     reference goes, S returns to the pool;
   - *allocation*: one new block for each block boundary the new tokens cross, logical blocks ``ceil(L / B)`` ..
     ``ceil((L + T) / B) - 1``. This is the only place blocks are taken: a sequence gets block k when it writes
     position k * B.

   If the pool runs dry, :class:`PoolExhaustedError`: the dry run is thrown away, so no block was taken and no table
   touched. (With ``evict="oldest"`` blocks are reclaimed first, below.) The Step carries the positions, the slots,
   its sequences' tables and first held positions after the step, and the copies.
2. **write** (per layer, compiled): first the layer's copy-on-write copies (``kv[layer, :, D] = kv[layer, :, S]``),
   then the new K/V scattered into their slots. A plan can be dropped (nothing changed), but **a written step must
   be advanced**: its writes may already have gone into blocks that the dry run freed (eviction) and handed out
   again. So after the first ``write`` the cache refuses any other plan or change (:class:`StaleStepError`) until
   ``advance(step)``, or ``reset()``, which empties every sequence. (Engines work this way: a forward pass, once
   started, is finished.)
3. **attend** (per layer, compiled): the query at position p of sequence s sees its held positions ``e[s] .. p``,
   read through the step's tables a tile at a time, each block a contiguous run of rows (:func:`attend_one`).
4. **advance** (host) commits the dry run. Every layer must have been written (a copy-on-write happens per layer).

**Fork** (parallel sampling, beam search): the child gets a copy of the parent's table, and each listed block's ref
count goes up by one. No K/V is copied until someone appends into a shared, partially filled block (above). Full
blocks are never written again, so they stay shared.

**Release** returns a sequence's blocks, last block first (``kvref/pool.py``). Releasing a sequence twice raises
:class:`DoubleFreeError`, releasing one never added :class:`UnknownSequenceError`.

**Eviction** (opt-in: ``evict="oldest"``), with exact token accounting. Sequence s keeps ``e[s]``, the number of
its oldest tokens evicted, and holds positions ``e[s] .. L - 1``. A block is freed only when *all* its tokens are
evicted (block k of s goes when ``e[s] >= (k + 1) * B``); a partially evicted block stays and its evicted rows are
never read. Seed 004 removed a whole block when fewer tokens had to go, so it evicted more than asked. Two rules:

- a sequence that would hold more than ``max_tokens`` tokens drops exactly the excess, ``e' = L + T - max_tokens``:
  it keeps a sliding window of ``max_tokens`` tokens (without eviction that step raises :class:`CacheOverflowError`;
  ``max_tokens`` always bounds the tokens *held*, ``L - e``, so tokens dropped with ``evict_tokens`` make room);
- when the pool runs dry, the sequence listing the most blocks (ties: the lowest id) drops its oldest block, provided
  that block is full and no other sequence lists it (dropping a shared block would free nothing): exactly that
  block's held tokens, ``e' = (first + 1) * B``. Repeated until the step fits, else :class:`PoolExhaustedError`.

*What eviction means for attention:* evicted keys are gone. Every query of a step sees the positions from ``e'``, the
first position held *after* the step's evictions, up to itself (within a chunked prefill the early queries therefore
see fewer keys than a sliding window would give them). Keys keep the absolute positions they were rotated at (RoPE)
before they were stored, as in the ring cache, so nothing is re-rotated. This is a memory policy and it changes the
model's output; a model trained with a sliding window wants :class:`kvref.RingCache`, whose mask is the model's.

The functions marked ``@register_jitable`` are the spec of the compiled work (addressing, copy, write, attend): plain
Python here (backend "python"), compiled by ``kvref/cpu/pooled.py``, and called from the CUDA kernels of
``kvref/cuda/pooled.py``. The plan is host bookkeeping, right below them.
"""

import dataclasses

import numpy as np
from numba.extending import register_jitable

from .attention import (SCORE_KEYS, TILE, WORK_COLUMNS, accumulate_rows, key_share, local_array, merge_parts,
                        save_state, score_rows, softmax_start, softmax_weights)
from .backends import HOST
from .cache import CacheBase, Step, allocate, field_objects, freeze, same_objects
from .errors import CacheOverflowError, PoolExhaustedError, ShapeError
from .page_table import validate_page_table
from .pool import LIVE, BlockPool, Books, SequenceRows
from .shapes import buffer_dims, check_index, check_positive_int

__all__ = ["BlockPool", "Books", "PooledCache", "PooledStep", "attend_one", "attend_part", "attend_tokens", "block_of", "copy_blocks",
           "copy_one", "plan_blocks", "pooled_slot", "run_of", "validate_page_table", "write_one", "write_tokens"]

#: evict= values: None (exhaustion and overflow raise) or "oldest" (drop a sequence's oldest tokens, see above)
EVICTION_POLICIES = (None, "oldest")


# ---------------------------------------------------------------------------------------------------------------
# Spec: addressing, copy-on-write copy, write, attend
# ---------------------------------------------------------------------------------------------------------------
@register_jitable(forceinline=True)
def block_of(table_row, start, position, block_size):
    """The block holding ``position`` of a sequence whose first held position is ``start``:
    ``table_row[p // B - start // B]`` (the table lists held blocks only, oldest first)."""
    return table_row[position // block_size - start // block_size]


@register_jitable
def pooled_slot(table_row, start, position, block_size):
    """Slot of ``position`` in the pool: ``block * B + p % B`` (vLLM's slot_mapping value)."""
    return block_of(table_row, start, position, block_size) * block_size + position % block_size


@register_jitable
def copy_one(kv, layer, copies, c, h, r, d):
    """Copy-on-write of one element: row r, element d of KV head h, from block ``copies[c, 0]`` to ``copies[c, 1]``,
    K and V, this layer."""
    source = copies[c, 0]
    target = copies[c, 1]
    kv[layer, 0, target, h, r, d] = kv[layer, 0, source, h, r, d]
    kv[layer, 1, target, h, r, d] = kv[layer, 1, source, h, r, d]


@register_jitable
def copy_blocks(kv, layer, copies):
    """Every copy-on-write copy of a step, for one layer. copies: (n, 2) int64 (source block, target block)."""
    for c in range(copies.shape[0]):
        for h in range(kv.shape[3]):
            for r in range(kv.shape[4]):
                for d in range(kv.shape[5]):
                    copy_one(kv, layer, copies, c, h, r, d)


@register_jitable
def write_one(kv, layer, slots, k_new, v_new, i, t, h, d):
    """Store element d of KV head h of new token t of step-sequence i in its slot (one CUDA thread does this)::

        block, offset = slot // B, slot % B
        kv[layer, 0, block, h, offset, d] = k_new[i, t, h, d]          and the same for V
    """
    block_size = kv.shape[4]
    slot = slots[i, t]
    block = slot // block_size
    offset = slot % block_size
    kv[layer, 0, block, h, offset, d] = k_new[i, t, h, d]
    kv[layer, 1, block, h, offset, d] = v_new[i, t, h, d]


@register_jitable
def write_tokens(kv, layer, slots, k_new, v_new):
    """Scatter the new K/V of one layer into their slots.

    kv:     (layers, 2, num_blocks, kv_heads, B, D) pool storage (float32, or uint16 fp16 bits)
    slots:  (n_seq, T) int64 pool slots from the plan
    k_new:  (n_seq, T, kv_heads, D), same dtype as kv; v_new likewise
    """
    n_seq, n_tokens, kv_heads, head_dim = k_new.shape
    for i in range(n_seq):
        for t in range(n_tokens):
            for h in range(kv_heads):
                for d in range(head_dim):
                    write_one(kv, layer, slots, k_new, v_new, i, t, h, d)


@register_jitable(forceinline=True)
def run_of(table_row, start, position, end, block_size):
    """The rows that hold positions ``position ..`` up to a block edge or ``end``: ``(block, offset, n)`` with
    ``offset = p % B`` and ``n = min(B - offset, end - p)``; they are rows offset .. offset + n - 1 of the block."""
    offset = position % block_size
    return block_of(table_row, start, position, block_size), offset, min(block_size - offset, end - position)


@register_jitable
def attend_part(kv, layer, tables, starts, positions, q, scale, part_acc, part_m_l, i, t, first_head, end_head, part,
                parts, group, head_dim, kv_heads):
    """Paged attention of new token t of step-sequence i, for KV heads ``first_head .. end_head - 1`` and their G
    query heads each (GQA: query heads h*G .. h*G+G-1 share KV head h), over share ``part`` of ``parts`` of its keys
    (``attention.key_share``), saved as one partial state per head: KV head h's in ``part_acc[h - first_head]``
    (G, D) and ``part_m_l[h - first_head]`` (G, 2) (``attention.merge_parts`` combines the parts).

    The query at position p sees positions ``starts[i] .. p``; the part takes its share of them, a tile (``TILE``
    positions) at a time, as in the flat cache; a tile may span several blocks, each holding a run of consecutive rows (:func:`run_of`). For
    each head, the scores of the tile's keys are written run by run into the tile's columns of its scratch
    (``score_rows``), the online softmax takes the tile (``softmax_weights``), and then the values are added run by
    run (``accumulate_rows``): the flat cache's ``attend_rows``, with the rows fetched through the block table.

    Loop order: tiles outside, heads inside, and the keys of every head before the values. A block's K rows of
    consecutive heads are consecutive in the pool (so are its V rows), so each tile is read as a sweep over K and a
    sweep over V, wherever its blocks lie. (Head by head, a pool of 16-token blocks is read 8 KiB at a time with a
    jump in between, which costs a CPU 2-3x; see BENCHMARKS.md.) So there is one online softmax per KV head.

    group, head_dim, kv_heads: G, D and the most KV heads one call takes (at least end_head - first_head), constants
    when compiled (kvref/attention.py, "Specialisation")
    """
    acc = local_array((kv_heads, group, head_dim))  # the unnormalised output of each KV head's G query heads
    work = local_array((kv_heads, group, WORK_COLUMNS))  # each head's tile scores, then m and l
    block = local_array((SCORE_KEYS, group))  # the sums of one score pass
    block_size = kv.shape[4]
    for h in range(first_head, end_head):
        softmax_start(acc[h - first_head], work[h - first_head])
    share_lo, share_hi = key_share(positions[i, t] + 1 - starts[i], part, parts)
    position = starts[i] + share_lo
    end = starts[i] + share_hi
    while position < end:
        tile_end = min(end, position + TILE)
        for h in range(first_head, end_head):  # the tile's keys, head after head: a sweep over K
            q_heads = q[i, t, h * group:(h + 1) * group]  # (G, D) the query heads of KV head h
            p = position
            while p < tile_end:
                table_block, offset, n = run_of(tables[i], starts[i], p, tile_end, block_size)
                k_rows = kv[layer, 0, table_block, h]  # (B, D) the block's K rows
                score_rows(q_heads, k_rows, offset, n, scale, work[h - first_head], p - position, block)
                p += n
            softmax_weights(tile_end - position, acc[h - first_head], work[h - first_head])
        for h in range(first_head, end_head):  # then the tile's values: a sweep over V
            p = position
            while p < tile_end:
                table_block, offset, n = run_of(tables[i], starts[i], p, tile_end, block_size)
                v_rows = kv[layer, 1, table_block, h]  # (B, D)
                accumulate_rows(v_rows, offset, n, acc[h - first_head], work[h - first_head], p - position)
                p += n
        position = tile_end
    for h in range(first_head, end_head):
        save_state(acc[h - first_head], work[h - first_head], part_acc[h - first_head], part_m_l[h - first_head])


@register_jitable
def attend_one(kv, layer, tables, starts, positions, q, scale, out, i, t, first_head, end_head, group, head_dim,
               kv_heads):
    """Paged attention of new token t of step-sequence i for KV heads ``first_head .. end_head - 1``: all its keys
    as one part (:func:`attend_part`)."""
    part_acc = local_array((kv_heads, group, head_dim))  # head h's state in row h - first_head
    part_m_l = local_array((kv_heads, group, 2))
    attend_part(kv, layer, tables, starts, positions, q, scale, part_acc, part_m_l, i, t, first_head, end_head, 0, 1,
                group, head_dim, kv_heads)
    for h in range(first_head, end_head):
        row = h - first_head
        merge_parts(part_acc[row:row + 1], part_m_l[row:row + 1], out[i, t, h * group:(h + 1) * group], group,
                    head_dim)


@register_jitable
def attend_tokens(kv, layer, tables, starts, positions, q, scale, out, group, head_dim, kv_heads):
    """Paged decode attention (T = 1) or causal chunked prefill (T > 1) of one layer for every new token.

    tables: (n_seq, C) int64, the step's sequences' block tables (held blocks, oldest first; -1 after the last)
    starts: (n_seq,) int64, each sequence's first held position;  positions: (n_seq, T) int64
    q, out: (n_seq, T, q_heads, D) float32 (out is overwritten)
    group, head_dim, kv_heads: G, D and the KV heads, constants when compiled (kvref/attention.py, "Specialisation")
    """
    n_seq, n_tokens = positions.shape
    for i in range(n_seq):
        for t in range(n_tokens):
            attend_one(kv, layer, tables, starts, positions, q, scale, out, i, t, 0, kv_heads, group, head_dim,
                       kv_heads)


# ---------------------------------------------------------------------------------------------------------------
# The plan: a dry run of the step on a copy of the books (eviction, copy-on-write, allocation)
# ---------------------------------------------------------------------------------------------------------------
def reclaim_block(books, live, block_size):
    """Pool eviction: the live sequence listing the most blocks drops its oldest block, if that block is full and
    listed by no one else (ties: lowest id). Does nothing when no sequence qualifies."""
    B = block_size
    victim, most = -1, 0
    for seq in live:
        held = int((books.tables[seq] >= 0).sum())  # listed now, blocks this step gave it included
        first = int(books.starts[seq]) // B
        full = (first + 1) * B <= books.lengths[seq]
        if held > most and full and books.pool.ref_counts[books.tables[seq, 0]] == 1:
            victim, most = seq, held
    if victim >= 0:
        books.evict_to(victim, (int(books.starts[victim]) // B + 1) * B, B)


def take_block(books, live, block_size, evict, short):
    """A free block for the dry run, reclaiming one by eviction first if allowed; -1 (and short[0] += 1) when there
    is none."""
    if books.pool.num_free == 0 and evict is not None:
        reclaim_block(books, live, block_size)
    if books.pool.num_free == 0:
        short[0] += 1
        return -1
    return books.pool.allocate()


def plan_blocks(books, ids, num_tokens, block_size, max_tokens, evict, live, ref_before):
    """Run a step of T = ``num_tokens`` tokens for the sequences ``ids`` on ``books`` (a copy, changed in place):

    1. a sequence that would hold more than ``max_tokens`` tokens evicts exactly the excess (or raises);
    2. copy-on-write of its partly filled last block if that block was shared before the step
       (``ref_before[block] > 1``), then one new block per block boundary the new tokens cross.

    Returns the copies, (n, 2) int64 (source, target block). Raises CacheOverflowError or PoolExhaustedError (the
    caller throws the copy away, so nothing changed).
    """
    T, B, M = num_tokens, block_size, max_tokens
    for s in ids:  # 1. at most max_tokens held tokens (e .. L + T - 1): a sliding window
        end = int(books.lengths[s]) + T
        if end - int(books.starts[s]) > M:
            if evict is None:
                raise CacheOverflowError(
                    "num_tokens", f"<= remaining capacity {M - end + T + int(books.starts[s])} of sequence {s}",
                    T, detail="nothing was written; evict='oldest' would keep a sliding window instead")
            books.evict_to(s, end - M, B)
    copies, short = [], [0]
    free_before, allocations_before = books.pool.num_free, books.pool.allocations
    for s in ids:  # 2. copy-on-write, then one block per boundary crossed
        length = int(books.lengths[s])
        if length % B:
            last = books.tables[s, books.held_blocks(s, B) - 1]
            if ref_before[last] > 1:  # shared before the step: copy, never write into it
                fresh = take_block(books, live, B, evict, short)
                column = books.held_blocks(s, B) - 1  # after take_block: an eviction may have shifted the table
                if fresh >= 0:
                    copies.append((int(books.tables[s, column]), fresh))
                    books.pool.free(int(books.tables[s, column]))
                    books.tables[s, column] = fresh
                    books.cow_copies += 1
        for k in range(-(-length // B), -(-(length + T) // B)):
            books.tables[s, k - int(books.starts[s]) // B] = take_block(books, live, B, evict, short)
    if short[0]:
        needed = short[0] + books.pool.allocations - allocations_before
        raise PoolExhaustedError("num_tokens", f"a step that fits the {free_before} free blocks of "
                                 f"{books.pool.num_blocks}", f"a step needing {needed} new block"
                                 f"{'s' if needed != 1 else ''}",
                                 detail="nothing changed: no block taken, no table touched; release or evict "
                                        "sequences, or use evict='oldest'")
    return np.array(copies, np.int64).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------------------------
# The cache object: the lifecycle and the checks are kvref/cache.py's; the pooled cache adds its sequences, its
# books and the rule that a written step must be advanced.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class PooledStep(Step):
    """A planned step of the pooled cache: its sequences' block tables (n_seq, C) and first held positions (n_seq,)
    after the step, and its copy-on-write copies (n, 2) (source block, target block)."""

    tables: np.ndarray
    starts: np.ndarray
    copies: np.ndarray


class PooledCache(SequenceRows, CacheBase):
    """A paged KV cache: sequences take blocks of ``block_size`` tokens from one pool of ``num_blocks`` blocks.

    shape:       CacheShape (layers, q_heads, kv_heads, head_dim, dtype float32|float16)
    num_blocks:  blocks in the pool (storage: num_blocks * block_size tokens, all layers, K and V)
    block_size:  tokens per block, B (vLLM's default is 16)
    batch:       sequences live at the start, ids 0 .. batch-1
    max_seqs:    sequence rows (live at once), for add_sequence and fork (default: batch)
    max_tokens:  the most tokens one sequence holds (default: the whole pool)
    evict:       None (overflow and exhaustion raise) or "oldest" (see the module docstring)
    backend:     "python", "cpu" or "cuda"

    Use per step, as for every variant::

        step = cache.plan(num_tokens)              # dry run: chooses blocks, copy-on-write; may raise
        for layer in range(shape.layers):
            cache.write(step, layer, k, v)         # k, v: (n_seq, T, kv_heads, head_dim)
            o = cache.attend(step, layer, q)       # q: (n_seq, T, q_heads, head_dim) float32
        cache.advance(step)                        # commits the dry run

    Sequences (:class:`kvref.pool.SequenceRows`): ``add_sequence()``, ``fork(seq)``, ``release(seq)``,
    ``evict_tokens(seq, n)``. Export: ``page_table()`` (FlashInfer), ``slot_mapping(step)``, ``block_tables()`` (vLLM).
    """

    variant = "pooled"
    step_type = PooledStep
    written_step_must_advance = True

    def __init__(self, shape, num_blocks, block_size=16, batch=1, max_seqs=None, max_tokens=None, evict=None,
                 backend="cpu"):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("batch", batch)):
            check_positive_int(name, value)
        max_seqs = batch if max_seqs is None else max_seqs
        check_positive_int("max_seqs", max_seqs)
        if max_seqs < batch:
            raise ShapeError("max_seqs", f">= batch={batch}", max_seqs)
        max_tokens = num_blocks * block_size if max_tokens is None else max_tokens
        check_positive_int("max_tokens", max_tokens)
        if evict not in EVICTION_POLICIES:
            raise ShapeError("evict", f"one of {EVICTION_POLICIES}", repr(evict))
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.max_seqs = int(max_seqs)
        self.max_tokens = int(max_tokens)
        self.evict = evict
        super().__init__(shape, self.max_seqs, self.block_size, backend, size_argument="num_blocks",
                         storage_dims=buffer_dims(shape, self.num_blocks, self.block_size))
        # table width: the blocks max_tokens held tokens can touch (+1: they need not start on a block edge)
        self.table_width = -(-self.max_tokens // self.block_size) + 1
        tables = allocate(HOST, "max_tokens", (self.max_seqs, self.table_width), np.int64, -1)
        status = np.zeros(self.max_seqs, np.int8)
        status[:batch] = LIVE
        self._books = Books(BlockPool(self.num_blocks), tables, self._lengths, np.zeros(self.max_seqs, np.int64),
                            status)
        self._dry_runs = {}  # (version, seq_ids, T) -> (Step, Books): plan's result, reused by write/attend/advance

    # --- reading the state ---------------------------------------------------------------------------------
    @property
    def block_bytes(self):
        """Bytes of one block: B tokens, all layers, K and V."""
        return self.block_size * self.token_bytes

    def get_max_cache_shape(self):
        """The most tokens one sequence holds (``max_tokens``)."""
        return self.max_tokens

    def _first_held(self, seq):
        return int(self._books.starts[seq])

    def remaining_capacity(self, seq=0):
        """Tokens sequence ``seq`` can take in one step before it would raise (or evict): limited by ``max_tokens``
        and by the free slots (its last block's unused slots, unless that block is shared and must be copied first,
        plus B per free block)."""
        seq = self._check_live("seq", seq)
        held = int(self._lengths[seq] - self._books.starts[seq])
        return min(self.max_tokens - held, self._books.room(seq, self.block_size))

    def _stored(self, layer, seq, kv_index):
        check_index("layer", layer, self.shape.layers)
        seq = self._check_live("seq", seq)
        storage = self._ops.to_host(self._kv[layer, kv_index])  # (num_blocks, kv_heads, B, D)
        rows = []
        for position in range(int(self._books.starts[seq]), int(self._lengths[seq])):
            slot = pooled_slot(self._books.tables[seq], self._books.starts[seq], position, self.block_size)
            rows.append(storage[slot // self.block_size, :, slot % self.block_size])
        dims = (self.shape.kv_heads, 0, self.shape.head_dim)
        stacked = np.stack(rows, axis=1) if rows else np.zeros(dims, self.shape.storage_dtype)
        return stacked.view(self.shape.public_dtype)

    def stats(self):
        """A dict: blocks used/free, high-water mark, allocations, hits, reuses, copy-on-write copies, evicted tokens,
        tokens held, internal fragmentation (slots in used blocks that hold no live token) and bytes."""
        return {**self._stats_head(), "block_size": self.block_size, "num_blocks": self.num_blocks,
                **self._books.counters(self.block_size), "bytes_per_block": self.block_bytes,
                "bytes_used": self.pool.num_used * self.block_bytes, "nbytes": self.nbytes}

    def state(self):
        """A deep snapshot of everything the cache holds (for tests: equal snapshots = identical caches)."""
        return {"kv": self.kv.copy(), "lengths": self._lengths.copy(), "starts": self._books.starts.copy(),
                "tables": self._books.tables.copy(), "status": self._books.status.copy(), "pool": self.pool.state(),
                "counters": (self._books.evicted_tokens, self._books.cow_copies), **self._tracking_state()}

    # --- the variant's part of the lifecycle (kvref/cache.py runs it) -----------------------------------------
    def _check_capacity(self, ids, num_tokens):
        if num_tokens > self.max_tokens:
            raise CacheOverflowError("num_tokens", f"<= max_tokens={self.max_tokens} (the most a sequence holds)",
                                     num_tokens, detail="nothing was written")

    def _plan(self, ids, positions):
        """The dry run (:func:`plan_blocks`) on a copy of the books, memoised per cache version."""
        key = (self._version, tuple(ids.tolist()), positions.shape[1])  # the step's _key
        saved = self._dry_runs.get(key)
        if saved is None or not same_objects(saved[2], field_objects(saved[0])):  # none yet, or its step was edited
            books = self._books.copy()
            copies = plan_blocks(books, ids.tolist(), positions.shape[1], self.block_size, self.max_tokens,
                                 self.evict, self.live_sequences(), self.pool.ref_counts)
            slots = np.empty_like(positions)
            for i, s in enumerate(ids.tolist()):
                for t in range(positions.shape[1]):
                    slots[i, t] = pooled_slot(books.tables[s], books.starts[s], positions[i, t], self.block_size)
            books.lengths[ids] += positions.shape[1]
            tables, starts = books.tables[ids], books.starts[ids]
            ids, positions, slots, tables, starts, copies = freeze(ids, positions, slots, tables, starts, copies)
            step = PooledStep(ids, positions, slots, self._id, self._version, tables, starts, copies)
            self._dry_runs[key] = (step, books, field_objects(step))
        return self._dry_runs[key][0]

    def _write(self, step, layer, k_store, v_store):
        if step.copies.shape[0]:
            self._ops.copy_blocks(self._kv, layer, step.copies)
        self._ops.write_tokens(self._kv, layer, step.slots, k_store, v_store)

    def _attend(self, step, layer, q, scale, out):
        self._ops.attend_tokens(self._kv, layer, step.tables, step.starts, step.positions, q, scale, out,
                                self.shape.group_size, self.shape.head_dim, self.shape.kv_heads)

    def _commit(self, step):
        """Keep the dry run's books (blocks taken, copies, evictions, lengths)."""
        self._books = self._dry_runs[self._key(step)][1]
        self._lengths = self._books.lengths

    def _end_step(self):
        super()._end_step()
        self._dry_runs = {}

    def _reset(self, seqs):
        for s in seqs:
            self._books.drop_tail(s, 0, self.block_size)

    def _crop(self, targets):
        for s, target in targets.items():
            self._books.drop_tail(s, target, self.block_size)
