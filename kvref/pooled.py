"""The pooled (paged) cache: fixed-size blocks from one shared pool, a block table per sequence. This file is its
whole algorithm: the pool, the tables, copy-on-write, eviction, paged attention and the page-table formats of
FlashInfer and vLLM.

**Addressing.** The pool holds ``num_blocks`` blocks of exactly ``B = block_size`` token slots, each for every layer,
K and V (a block holds exactly B tokens; seed 004 took its blocks from byte size classes, so a block held more)::

    kv[layer, 0=K|1=V, block, kv_head, offset, dim]        shape (layers, 2, num_blocks, kv_heads, B, head_dim)

Sequence s lists its blocks, in position order, in its **block table** ``tables[s]``. Position p lives in::

    block  = tables[s][p // B - first[s]]          first[s] = e[s] // B, the first block still held (0 without eviction)
    offset = p % B
    slot   = block * B + offset                     vLLM's slot_mapping value (block = slot // B, offset = slot % B)

Without eviction ``first[s] = 0`` and this is ``block_table[s][p // B] * B + p % B`` (ARCHITECTURE.md).

**The pool** (:class:`BlockPool`). Each block has a **ref count**, the number of block tables that list it. Blocks
with ref count 0 wait in the **free queue**: allocation pops the head, freeing appends at the tail (vLLM's order: the
least recently freed block is reused first). The invariants, checked by the tests after every operation::

    ref[b] = number of table entries equal to b        (so the counts are conserved: sum(ref) = table entries)
    ref[b] = 0  <=>  b is in the free queue, exactly once
    a block listed twice (two forked sequences) has ref >= 2

**A step** is every variant's plan -> write (per layer) -> attend (per layer) -> advance:

1. **plan** (host) runs the step as a *dry run* on a copy of the books (ref counts, free queue, tables, lengths;
   :class:`Books`), one sequence after the other:

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

**Release** returns a sequence's blocks: ref -= 1 each, last block first; blocks that reach 0 go to the free queue's
tail (vLLM frees in reverse order: a request's last block is the least likely to be useful again). Releasing a
sequence twice raises :class:`DoubleFreeError`, releasing one never added :class:`UnknownSequenceError`, and freeing a
block whose ref count is 0 :class:`DoubleFreeError`.

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

**Page-table formats** (``../shared/reference/peer_systems.md`` A2-A3):

- FlashInfer, CSR over pages (:meth:`PooledCache.page_table`): ``kv_indptr`` (n + 1,) int32, ``kv_indices``
  (kv_indptr[-1],) int32, each sequence's pages in order, and ``kv_last_page_len`` (n,) int32 with
  ``0 < last_page_len <= page_size``, so that ``length = page_size * (pages - 1) + last_page_len``. FlashInfer's
  kernels do not check these invariants; :func:`validate_page_table` does, on any page table.
- vLLM: ``slot_mapping``, the slot ``block * B + offset`` of each new token of a step (:meth:`PooledCache.slot_mapping`),
  and ``block_tables`` (n, max_blocks) int32 padded with -1, plus ``seq_lens``.

The functions marked ``@register_jitable`` are the spec of the compiled work (addressing, copy, write, attend): plain
Python here (backend "python"), compiled by ``kvref/cpu/pooled.py``, and called from the CUDA kernels of
``kvref/cuda/pooled.py``. The pool, the tables and the dry run are host bookkeeping: the classes below.
"""

from collections import deque

import numpy as np
from numba.extending import register_jitable

from .attention import TILE, WORK_COLUMNS, accumulate_rows, score_tile, softmax_finish, softmax_start, softmax_weights
from .cache import CacheBase, Step, freeze
from .errors import (CacheOverflowError, DoubleFreeError, IndexOutOfRangeError, PageTableError, PoolExhaustedError,
                     ShapeError, StaleStepError, UnknownSequenceError)
from .shapes import buffer_dims, check_index, check_positive_int

__all__ = ["BlockPool", "Books", "PooledCache", "attend_one", "attend_tokens", "block_of", "copy_blocks", "copy_one",
           "pooled_slot", "run_of", "validate_page_table", "write_one", "write_tokens"]

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
def attend_one(kv, layer, tables, starts, positions, q, scale, out, work, i, t, first_head, end_head):
    """Paged attention of new token t of step-sequence i, for KV heads ``first_head .. end_head - 1`` and their G
    query heads each (GQA: query heads h*G .. h*G+G-1 share KV head h).

    The query at position p sees positions ``starts[i] .. p``, taken a tile (``TILE`` positions) at a time, as in
    the flat cache; a tile may span several blocks, each holding a run of consecutive rows (:func:`run_of`). For
    each head, the scores of the tile's keys are written run by run into the tile's columns of its scratch, the
    online softmax takes the tile (``softmax_weights``), and then the values are added run by run
    (``accumulate_rows``): the flat cache's ``attend_rows``, with the rows fetched through the block table.

    Loop order: tiles outside, heads inside, and the keys of every head before the values. A block's K rows of
    consecutive heads are consecutive in the pool (so are its V rows), so each tile is read as a sweep over K and a
    sweep over V, wherever its blocks lie. (Head by head, a pool of 16-token blocks is read 8 KiB at a time with a
    jump in between, which costs a CPU 2-3x; see BENCHMARKS.md.)

    work: (end_head - first_head, G, WORK_COLUMNS) float32 scratch, one online softmax per KV head.
    """
    block_size = kv.shape[4]
    group = q.shape[2] // kv.shape[3]
    for h in range(first_head, end_head):
        softmax_start(out[i, t, h * group:(h + 1) * group], work[h - first_head])
    position = starts[i]
    end = positions[i, t] + 1
    while position < end:
        tile_end = min(end, position + TILE)
        for h in range(first_head, end_head):  # the tile's keys, head after head: a sweep over K
            p = position
            while p < tile_end:
                block, offset, n = run_of(tables[i], starts[i], p, tile_end, block_size)
                score_tile(q[i, t, h * group:(h + 1) * group], kv[layer, 0, block, h, offset:], n, scale,
                           work[h - first_head, :, p - position:])  # scores go to the tile's columns p - position ..
                p += n
            softmax_weights(tile_end - position, out[i, t, h * group:(h + 1) * group], work[h - first_head])
        for h in range(first_head, end_head):  # then the tile's values: a sweep over V
            p = position
            while p < tile_end:
                block, offset, n = run_of(tables[i], starts[i], p, tile_end, block_size)
                accumulate_rows(kv[layer, 1, block, h, offset:], n, out[i, t, h * group:(h + 1) * group],
                                work[h - first_head, :, p - position:])
                p += n
        position = tile_end
    for h in range(first_head, end_head):
        softmax_finish(out[i, t, h * group:(h + 1) * group], work[h - first_head])


@register_jitable
def attend_tokens(kv, layer, tables, starts, positions, q, scale, out):
    """Paged decode attention (T = 1) or causal chunked prefill (T > 1) of one layer for every new token.

    tables: (n_seq, C) int64, the step's sequences' block tables (held blocks, oldest first; -1 after the last)
    starts: (n_seq,) int64, each sequence's first held position;  positions: (n_seq, T) int64
    q, out: (n_seq, T, q_heads, D) float32 (out is overwritten)
    """
    n_seq, n_tokens, q_heads, head_dim = q.shape
    kv_heads = kv.shape[3]
    work = np.empty((kv_heads, q_heads // kv_heads, WORK_COLUMNS), np.float32)
    for i in range(n_seq):
        for t in range(n_tokens):
            attend_one(kv, layer, tables, starts, positions, q, scale, out, work, i, t, 0, kv_heads)


# ---------------------------------------------------------------------------------------------------------------
# The pool: ref counts and a free queue
# ---------------------------------------------------------------------------------------------------------------
class BlockPool:
    """``num_blocks`` blocks with ref counts and a FIFO free queue (host bookkeeping; the storage is the cache's).

    ``allocate`` pops the free queue's head and sets the ref count to 1; ``share`` adds a reference (fork); ``free``
    drops one and queues the block at the tail when none is left. Counters: allocations, ``hits`` (allocations of a
    block whose memory was already touched, by earlier use or by ``PooledCache.prewarm``), ``reuses`` (allocations
    of a block that had been freed before) and the high-water mark of blocks in use.
    """

    def __init__(self, num_blocks):
        check_positive_int("num_blocks", num_blocks)
        self.num_blocks = int(num_blocks)
        self.ref_counts = np.zeros(self.num_blocks, np.int64)
        self.free_queue = deque(range(self.num_blocks))
        self.touched = np.zeros(self.num_blocks, bool)  # memory written at least once (used or prewarmed)
        self.ever_freed = np.zeros(self.num_blocks, bool)
        self.allocations = 0
        self.hits = 0
        self.reuses = 0
        self.high_water = 0

    def copy(self):
        """An independent copy (a plan's dry run works on one)."""
        other = BlockPool.__new__(BlockPool)
        other.__dict__.update(self.__dict__)
        other.ref_counts = self.ref_counts.copy()
        other.free_queue = deque(self.free_queue)
        other.touched = self.touched.copy()
        other.ever_freed = self.ever_freed.copy()
        return other

    @property
    def num_free(self):
        """Blocks in the free queue."""
        return len(self.free_queue)

    @property
    def num_used(self):
        """Blocks with ref count >= 1."""
        return self.num_blocks - len(self.free_queue)

    def _check_block(self, block):
        check_index("block", block, self.num_blocks)
        return int(block)

    def allocate(self):
        """Take the block at the head of the free queue (ref count 1). Raises PoolExhaustedError when none is free."""
        if not self.free_queue:
            raise PoolExhaustedError("num_blocks", "a free block", f"all {self.num_blocks} blocks in use")
        block = self.free_queue.popleft()
        self.ref_counts[block] = 1
        self.allocations += 1
        self.hits += int(self.touched[block])
        self.reuses += int(self.ever_freed[block])
        self.touched[block] = True
        self.high_water = max(self.high_water, self.num_used)
        return block

    def share(self, block):
        """One more table lists ``block`` (fork): ref += 1. The block must be in use."""
        block = self._check_block(block)
        if self.ref_counts[block] < 1:
            raise DoubleFreeError("block", "a block in use (ref count >= 1) to share", f"free block {block}",
                                  detail="sharing a free block would be a use after free")
        self.ref_counts[block] += 1

    def free(self, block):
        """One table no longer lists ``block``: ref -= 1, and at 0 the block joins the free queue's tail.
        Freeing a block whose ref count is already 0 raises DoubleFreeError."""
        block = self._check_block(block)
        if self.ref_counts[block] < 1:
            raise DoubleFreeError("block", "a block with ref count >= 1", f"block {block} with ref count 0")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_queue.append(block)
            self.ever_freed[block] = True

    def state(self):
        """A deep snapshot (arrays and counters)."""
        return {"ref_counts": self.ref_counts.copy(), "free_queue": np.array(self.free_queue, np.int64),
                "touched": self.touched.copy(), "ever_freed": self.ever_freed.copy(),
                "counters": (self.allocations, self.hits, self.reuses, self.high_water)}


# ---------------------------------------------------------------------------------------------------------------
# The books: everything a step, fork, release or eviction changes (copied for a plan's dry run)
# ---------------------------------------------------------------------------------------------------------------
class Books:
    """The pool plus, per sequence row: block table, length L, first held position e, and the eviction counter.

    tables[s, c] is the c-th held block of s (oldest first), -1 past the last; s holds positions e[s] .. L[s] - 1.
    """

    def __init__(self, pool, tables, lengths, starts):
        self.pool = pool
        self.tables = tables
        self.lengths = lengths
        self.starts = starts
        self.evicted_tokens = 0  # tokens evicted so far, all sequences
        self.cow_copies = 0  # copy-on-write block copies so far

    def copy(self):
        """An independent copy."""
        other = Books(self.pool.copy(), self.tables.copy(), self.lengths.copy(), self.starts.copy())
        other.evicted_tokens = self.evicted_tokens
        other.cow_copies = self.cow_copies
        return other

    def held_blocks(self, seq, block_size):
        """Blocks sequence ``seq`` lists: ceil(L / B) - e // B."""
        return -(-int(self.lengths[seq]) // block_size) - int(self.starts[seq]) // block_size

    def drop_blocks(self, seq, first_kept):
        """Free the first ``first_kept`` blocks of ``seq``'s table, oldest first, and shift the table left."""
        for column in range(first_kept):
            self.pool.free(int(self.tables[seq, column]))
        row = self.tables[seq]
        row[:row.size - first_kept] = row[first_kept:].copy()
        row[row.size - first_kept:] = -1

    def evict_to(self, seq, new_start, block_size):
        """Evict positions e .. new_start - 1 of ``seq`` (exactly those); free the blocks all of whose tokens are
        now evicted: ``new_start // B - e // B`` blocks."""
        old_start = int(self.starts[seq])
        self.drop_blocks(seq, new_start // block_size - old_start // block_size)
        self.starts[seq] = new_start
        self.evicted_tokens += new_start - old_start


# ---------------------------------------------------------------------------------------------------------------
# The cache object
# ---------------------------------------------------------------------------------------------------------------
NEVER_USED, LIVE, RELEASED = 0, 1, 2


class PooledCache(CacheBase):
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

    Sequences: ``add_sequence()``, ``fork(seq)``, ``release(seq)``. Export: ``page_table()`` (FlashInfer),
    ``slot_mapping(step)`` and ``block_tables()`` (vLLM).
    """

    variant = "pooled"

    def __init__(self, shape, num_blocks, block_size=16, batch=1, max_seqs=None, max_tokens=None, evict=None,
                 backend="cpu"):
        check_positive_int("num_blocks", num_blocks)
        check_positive_int("block_size", block_size)
        check_positive_int("batch", batch)
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
        super().__init__(shape, self.max_seqs, self.block_size, backend,
                         storage_dims=buffer_dims(shape, self.num_blocks, self.block_size))
        # table width: the blocks max_tokens held tokens can touch (+1: they need not start on a block edge)
        self.table_width = -(-self.max_tokens // self.block_size) + 1
        self._books = Books(BlockPool(self.num_blocks), np.full((self.max_seqs, self.table_width), -1, np.int64),
                            self._lengths, np.zeros(self.max_seqs, np.int64))
        self._status = np.full(self.max_seqs, NEVER_USED, np.int8)
        self._status[:batch] = LIVE
        self._dry_runs = {}  # (version, seq_ids, T) -> (Step, Books): plan's result, reused by write/attend/advance

    # --- reading the state ---------------------------------------------------------------------------------
    @property
    def pool(self):
        """The block pool (ref counts, free queue, counters). Read it; change it only through the cache."""
        return self._books.pool

    @property
    def block_bytes(self):
        """Bytes of one block: B tokens, all layers, K and V."""
        return self.block_size * self.token_bytes

    def live_sequences(self):
        """Ids of the live sequences, ascending."""
        return [int(s) for s in np.flatnonzero(self._status == LIVE)]

    def _check_live(self, name, seq):
        check_index(name, seq, self.max_seqs)
        if self._status[seq] == RELEASED:
            raise UnknownSequenceError(name, "a live sequence", f"sequence {int(seq)}, released")
        if self._status[seq] != LIVE:
            raise UnknownSequenceError(name, "a live sequence", f"sequence {int(seq)}, never added")
        return int(seq)

    def get_seq_length(self, seq=0):
        """Tokens seen by sequence ``seq`` (its next token goes to this position)."""
        return int(self._lengths[self._check_live("seq", seq)])

    def get_max_cache_shape(self):
        """The most tokens one sequence holds (``max_tokens``)."""
        return self.max_tokens

    def first_position(self, seq=0):
        """e: the first position sequence ``seq`` still holds (its evicted token count; 0 without eviction)."""
        return int(self._books.starts[self._check_live("seq", seq)])

    def held_positions(self, seq=0):
        """Positions sequence ``seq`` holds, in order: e .. L - 1."""
        seq = self._check_live("seq", seq)
        return np.arange(self._books.starts[seq], self._lengths[seq], dtype=np.int64)

    def block_table(self, seq=0):
        """The blocks sequence ``seq`` lists, oldest first (a copy)."""
        seq = self._check_live("seq", seq)
        return self._books.tables[seq, :self._books.held_blocks(seq, self.block_size)].copy()

    def remaining_capacity(self, seq=0):
        """Tokens sequence ``seq`` can take in one step before it would raise (or evict): limited by ``max_tokens``
        and by the free slots (its last block's unused slots, unless that block is shared and must be copied first,
        plus B per free block)."""
        seq = self._check_live("seq", seq)
        length = int(self._lengths[seq])
        partial = length % self.block_size
        free = self.pool.num_free * self.block_size
        if partial:
            block = int(self._books.tables[seq, self._books.held_blocks(seq, self.block_size) - 1])
            if self.pool.ref_counts[block] > 1:  # copy-on-write takes a free block
                room = max(0, free - partial)
            else:
                room = free + self.block_size - partial
        else:
            room = free
        return min(self.max_tokens - (length - int(self._books.starts[seq])), room)

    def is_full(self, seq=0):
        """True when sequence ``seq`` cannot take another token without raising (or evicting)."""
        return self.remaining_capacity(seq) == 0

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
        pool = self.pool
        B = self.block_size
        occupied = np.zeros((self.num_blocks, B), bool)  # slots holding a token that some sequence holds
        tokens = 0
        for seq in self.live_sequences():
            start, length = int(self._books.starts[seq]), int(self._lengths[seq])
            tokens += length - start
            for column in range(self._books.held_blocks(seq, B)):
                first_position = (start // B + column) * B  # position of the block's row 0
                lo = max(start, first_position) - first_position
                hi = min(length, first_position + B) - first_position
                occupied[self._books.tables[seq, column], lo:hi] = True
        allocated_slots = pool.num_used * self.block_size
        distinct = int(occupied.sum())
        return {
            **self._stats_head(),
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
            "blocks_used": pool.num_used,
            "blocks_free": pool.num_free,
            "high_water_blocks": pool.high_water,
            "allocations": pool.allocations,
            "hits": pool.hits,
            "reuses": pool.reuses,
            "cow_copies": self._books.cow_copies,
            "evicted_tokens": self._books.evicted_tokens,
            "live_sequences": len(self.live_sequences()),
            "lengths": [int(self._lengths[s]) for s in self.live_sequences()],
            "tokens_held": tokens,  # per sequence: shared tokens count once per sequence
            "slots_filled": distinct,  # distinct pool slots holding a held token
            "allocated_slots": allocated_slots,
            "internal_fragmentation": allocated_slots - distinct,
            "bytes_per_block": self.block_bytes,
            "bytes_used": pool.num_used * self.block_bytes,
            "nbytes": self.nbytes,
        }

    def state(self):
        """A deep snapshot of everything the cache holds (for tests: equal snapshots = identical caches)."""
        return {"kv": self.kv.copy(), "lengths": self._lengths.copy(), "starts": self._books.starts.copy(),
                "tables": self._books.tables.copy(), "status": self._status.copy(), "pool": self.pool.state(),
                "counters": (self._books.evicted_tokens, self._books.cow_copies), "version": self._version}

    # --- sequences ------------------------------------------------------------------------------------------
    def _seq_ids(self, seq_ids):
        if seq_ids is None:
            live = self.live_sequences()
            if not live:
                raise UnknownSequenceError("seq_ids", "at least one live sequence", "none live")
            return np.array(live, np.int64)
        ids = super()._seq_ids(seq_ids)  # 1-D, integers in range, distinct
        for s in ids.tolist():
            self._check_live("seq_ids", s)
        return ids

    def _new_row(self):
        rows = np.flatnonzero(self._status != LIVE)
        if rows.size == 0:
            raise CacheOverflowError("max_seqs", f"a free sequence row (max_seqs={self.max_seqs})",
                                     f"all {self.max_seqs} rows live", detail="release a sequence first")
        return int(rows[0])

    def add_sequence(self):
        """Start an empty sequence in the lowest free row; returns its id."""
        seq = self._new_row()
        self._check_not_mid_step("add_sequence")
        self._status[seq] = LIVE
        self._lengths[seq] = 0
        self._books.starts[seq] = 0
        self._books.tables[seq] = -1
        self._bump()
        return seq

    def fork(self, seq):
        """A new sequence that shares every block of ``seq`` (ref count + 1 each, no K/V copied); returns its id.
        The first append of either into a shared, partially filled block copies that block first."""
        seq = self._check_live("seq", seq)
        child = self._new_row()
        self._check_not_mid_step("fork")
        books = self._books
        for column in range(books.held_blocks(seq, self.block_size)):
            books.pool.share(int(books.tables[seq, column]))
        books.tables[child] = books.tables[seq]
        self._lengths[child] = self._lengths[seq]
        books.starts[child] = books.starts[seq]
        self._status[child] = LIVE
        self._bump()
        return child

    def release(self, seq):
        """End sequence ``seq``: drop its references, last block first (blocks that reach ref count 0 are freed)."""
        check_index("seq", seq, self.max_seqs)
        if self._status[seq] == RELEASED:
            raise DoubleFreeError("seq", "a live sequence", f"sequence {int(seq)}, already released")
        self._check_live("seq", seq)
        self._check_not_mid_step("release")
        self._drop_tail(int(seq), 0)
        self._status[seq] = RELEASED
        self._bump()

    def _drop_tail(self, seq, length):
        """Cut ``seq`` to ``length`` tokens (>= e): free its blocks past ceil(length / B), last first."""
        books = self._books
        keep = -(-length // self.block_size) - int(books.starts[seq]) // self.block_size
        for column in reversed(range(max(keep, 0), books.held_blocks(seq, self.block_size))):
            books.pool.free(int(books.tables[seq, column]))
            books.tables[seq, column] = -1
        self._lengths[seq] = length
        if length == 0:
            books.starts[seq] = 0

    def evict_tokens(self, seq, num_tokens):
        """Evict exactly the ``num_tokens`` oldest held tokens of ``seq`` (no more: seed 004 dropped a whole block);
        blocks all of whose tokens are then evicted are freed. Returns the number of blocks freed."""
        seq = self._check_live("seq", seq)
        held = int(self._lengths[seq] - self._books.starts[seq])
        if isinstance(num_tokens, (bool, np.bool_)) or not isinstance(num_tokens, (int, np.integer)) or not (
                0 <= num_tokens <= held):
            raise IndexOutOfRangeError("num_tokens", f"an integer in [0, {held}] (tokens held by sequence {seq})",
                                       repr(num_tokens))
        self._check_not_mid_step("evict_tokens")
        free_before = self.pool.num_free
        self._books.evict_to(seq, int(self._books.starts[seq]) + int(num_tokens), self.block_size)
        self._bump()
        return self.pool.num_free - free_before

    def prewarm(self, num_blocks=None):
        """Touch the memory of the next ``num_blocks`` blocks the pool will hand out (default: every free block), so
        that their first use does not page-fault (NumPy's zeros are mapped lazily by the OS). On the cuda backend the
        memory is committed already and only the accounting changes. Returns how many blocks were newly warmed.
        Their allocations then count as ``hits`` in ``stats()``. Any planned step becomes stale."""
        pool = self.pool
        count = pool.num_free if num_blocks is None else num_blocks
        if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)) or not (
                0 <= count <= pool.num_free):
            raise IndexOutOfRangeError("num_blocks", f"an integer in [0, {pool.num_free}] (free blocks)", repr(count))
        self._check_not_mid_step("prewarm")
        blocks = [b for b in list(pool.free_queue)[:count] if not pool.touched[b]]
        if blocks and isinstance(self._kv, np.ndarray):
            self._kv[:, :, blocks] = 0
        pool.touched[blocks] = True
        self._bump()
        return len(blocks)

    # --- planning and running a step -------------------------------------------------------------------------
    def _take_block(self, books, short):
        """A free block for the dry run, reclaiming one by eviction first if allowed; -1 (and short[0] += 1) when
        there is none."""
        if books.pool.num_free == 0 and self.evict is not None:
            self._reclaim_block(books)
        if books.pool.num_free == 0:
            short[0] += 1
            return -1
        return books.pool.allocate()

    def _reclaim_block(self, books):
        """Pool eviction: the live sequence listing the most blocks drops its oldest block, if that block is full and
        listed by no one else (ties: lowest id). Does nothing when no sequence qualifies."""
        B = self.block_size
        victim, most = -1, 0
        for seq in self.live_sequences():
            held = int((books.tables[seq] >= 0).sum())  # listed now, blocks this step gave it included
            first = int(books.starts[seq]) // B
            full = (first + 1) * B <= books.lengths[seq]
            if held > most and full and books.pool.ref_counts[books.tables[seq, 0]] == 1:
                victim, most = seq, held
        if victim >= 0:
            books.evict_to(victim, (int(books.starts[victim]) // B + 1) * B, B)

    def _dry_run(self, num_tokens, seq_ids):
        """Plan a step on a copy of the books: returns (Step, books after the step). Memoised per cache version."""
        check_positive_int("num_tokens", num_tokens)
        ids = self._seq_ids(seq_ids).copy()
        key = (self._version, tuple(ids.tolist()), int(num_tokens))
        if key in self._dry_runs:
            return self._dry_runs[key]
        T, B, M = int(num_tokens), self.block_size, self.max_tokens
        if T > M:
            raise CacheOverflowError("num_tokens", f"<= max_tokens={M} (the most a sequence holds)", T,
                                     detail="nothing was written")
        books = self._books.copy()
        for s in ids.tolist():  # 1. at most max_tokens held tokens (e .. L + T - 1): a sliding window
            end = int(books.lengths[s]) + T
            if end - int(books.starts[s]) > M:
                if self.evict is None:
                    raise CacheOverflowError(
                        "num_tokens", f"<= remaining capacity {M - end + T + int(books.starts[s])} of sequence {s}",
                        T, detail="nothing was written; evict='oldest' would keep a sliding window instead")
                books.evict_to(s, end - M, B)
        copies, short = [], [0]
        free_before = self.pool.num_free
        for s in ids.tolist():  # 2. copy-on-write, then one block per boundary crossed
            length = int(books.lengths[s])
            if length % B:
                last = books.tables[s, books.held_blocks(s, B) - 1]
                if self.pool.ref_counts[last] > 1:  # shared before the step: copy, never write into it
                    fresh = self._take_block(books, short)
                    column = books.held_blocks(s, B) - 1  # after _take_block: an eviction may have shifted the table
                    if fresh >= 0:
                        copies.append((int(books.tables[s, column]), fresh))
                        books.pool.free(int(books.tables[s, column]))
                        books.tables[s, column] = fresh
                        books.cow_copies += 1
            for k in range(-(-length // B), -(-(length + T) // B)):
                block = self._take_block(books, short)
                books.tables[s, k - int(books.starts[s]) // B] = block
        if short[0]:
            needed = short[0] + books.pool.allocations - self.pool.allocations
            raise PoolExhaustedError("num_tokens", f"a step needing at most {free_before} new blocks "
                                     f"({free_before} of {self.num_blocks} free)", f"{needed} new blocks",
                                     detail="nothing changed: no block taken, no table touched; release or evict "
                                            "sequences, or use evict='oldest'")
        positions = books.lengths[ids][:, None] + np.arange(T, dtype=np.int64)[None, :]
        slots = np.empty_like(positions)
        for i, s in enumerate(ids.tolist()):
            for t in range(T):
                slots[i, t] = pooled_slot(books.tables[s], books.starts[s], positions[i, t], B)
        books.lengths[ids] += T
        tables = books.tables[ids]
        starts = books.starts[ids]
        copies = np.array(copies, np.int64).reshape(-1, 2)
        freeze(ids, positions, slots, tables, starts, copies)
        step = Step(ids, positions, slots, self._version, tables=tables, starts=starts, copies=copies)
        self._dry_runs[key] = (step, books)
        return step, books

    def _check_not_mid_step(self, action):
        """After the first write of a step, only that step's own calls and advance (or reset) may run."""
        if self._written and self._step_key is not None and self._step_key[0] == self._version:
            raise StaleStepError("step", f"advance() of the step already written before {action}",
                                 "a written step that was not advanced",
                                 detail="a written step must be advanced (or the cache reset)")

    def _check_same_step(self, step, action):
        """Mid-step (after a write), only the written step itself may be planned, written, attended or advanced."""
        if (step.version, tuple(step.seq_ids.tolist()), step.num_tokens) != self._step_key:
            self._check_not_mid_step(action)

    def plan(self, num_tokens=1, seq_ids=None):
        """Plan a step of ``num_tokens`` new tokens for each sequence in ``seq_ids`` (default: every live one).

        A dry run: it chooses the blocks (copy-on-write and one per block boundary crossed) and evictions, and the
        cache is not changed. Raises CacheOverflowError past ``max_tokens`` and PoolExhaustedError when the pool is
        short (unless evict="oldest").
        """
        step = self._dry_run(num_tokens, seq_ids)[0]
        self._check_same_step(step, "planning another step")
        return step

    def write(self, step, layer, k_new, v_new):
        """Write one layer: the step's copy-on-write copies, then its new K and V, each (n_seq, T, kv_heads,
        head_dim) in the cache's dtype."""
        k_store, v_store = self._check_kv(step, layer, k_new, v_new)
        self._check_same_step(step, "writing another step")
        self._track(step)
        if step.copies.shape[0]:
            self._ops.copy_blocks(self._kv, layer, step.copies)
        self._ops.write_tokens(self._kv, layer, step.slots, k_store, v_store)
        self._written.add(layer)

    def attend(self, step, layer, q, scale=None, out=None):
        """Paged attention of one layer for the step's tokens: (n_seq, T, q_heads, head_dim) float32. The layer must
        have been written for this step. ``scale`` defaults to 1/sqrt(head_dim)."""
        out, scale = self._check_query(step, layer, q, scale, out)
        self._check_written(step, [layer], "attend")
        self._ops.attend_tokens(self._kv, layer, step.tables, step.starts, step.positions, q, scale, out)
        return out

    def advance(self, step):
        """Commit the step's dry run (blocks taken, copies, evictions, lengths). Every layer must have been written."""
        self._check_step(step)
        self._check_written(step, range(self.shape.layers), "advance")
        _, books = self._dry_run(step.num_tokens, step.seq_ids)
        self._books = books
        self._lengths = books.lengths
        self._bump()

    def _bump(self):
        super()._bump()
        self._dry_runs = {}

    # --- shrinking ------------------------------------------------------------------------------------------
    def reset(self, seq=None):
        """Forget every token of every live sequence (or of ``seq``): their blocks go back to the pool. The
        sequences stay live, empty."""
        seqs = self.live_sequences() if seq is None else [self._check_live("seq", seq)]
        for s in seqs:
            self._drop_tail(s, 0)
        self._bump()

    def crop(self, max_length, seq=None):
        """Keep the first ``max_length`` tokens (Hugging Face semantics: a negative value drops that many); blocks
        past the new end are freed. A target below a sequence's first held position (evicted tokens) raises."""
        max_length = self._check_crop_target(max_length)
        seqs = self.live_sequences() if seq is None else [self._check_live("seq", seq)]
        targets = {}
        for s in seqs:
            length = int(self._lengths[s])
            target = max_length if max_length >= 0 else length + max_length
            if target < int(self._books.starts[s]):
                raise IndexOutOfRangeError(
                    "max_length", f"a length >= {int(self._books.starts[s])} for sequence {s} (its first held "
                    f"position; evicted tokens cannot come back)" if max_length >= 0 else
                    f">= -{length - int(self._books.starts[s])} for sequence {s}", max_length)
            targets[s] = min(target, length)
        self._check_not_mid_step("crop")
        for s, target in targets.items():
            self._drop_tail(s, target)
        self._bump()

    # --- export: FlashInfer and vLLM page tables ---------------------------------------------------------------
    def page_table(self, seq_ids=None):
        """FlashInfer's paged-KV description of sequences ``seq_ids`` (default: every live one), as a dict of int32
        arrays: ``kv_indptr`` (n + 1,), ``kv_indices`` (kv_indptr[-1],), ``kv_last_page_len`` (n,), plus
        ``page_size``. Every sequence needs at least one held token (FlashInfer requires 0 < last_page_len).

        With eviction the page list starts at the first held block; if e is not a multiple of B, that page's first
        ``e % B`` rows are evicted tokens, which FlashInfer (it has no start offset) would attend to.
        """
        ids = self._seq_ids(seq_ids)
        indptr, indices, last = [0], [], []
        for s in ids.tolist():
            held = self._books.held_blocks(s, self.block_size)
            if int(self._lengths[s]) == int(self._books.starts[s]):
                raise ShapeError("seq_ids", "sequences holding at least one token", f"sequence {s} holds none")
            indices.extend(int(b) for b in self._books.tables[s, :held])
            indptr.append(len(indices))
            last.append(int(self._lengths[s]) - (-(-int(self._lengths[s]) // self.block_size) - 1) * self.block_size)
        return {"kv_indptr": np.array(indptr, np.int32), "kv_indices": np.array(indices, np.int32),
                "kv_last_page_len": np.array(last, np.int32), "page_size": self.block_size}

    def slot_mapping(self, step):
        """vLLM's ``slot_mapping`` for the step's tokens, sequence by sequence: (n_seq * T,) int64,
        ``slot = block * B + offset``."""
        self._check_step(step)
        return step.slots.reshape(-1).copy()

    def block_tables(self, seq_ids=None):
        """vLLM's ``block_tables`` (n, max_blocks) int32 padded with -1 and ``seq_lens`` (n,) int32 (without
        eviction; with eviction, column c is logical block e // B + c)."""
        ids = self._seq_ids(seq_ids)
        return self._books.tables[ids].astype(np.int32), self._lengths[ids].astype(np.int32)


def validate_page_table(kv_indptr, kv_indices, kv_last_page_len, page_size, num_pages=None, seq_lens=None):
    """Check FlashInfer's page-table invariants (its kernels do not); returns the sequence lengths (int64).

    - the three arrays are 1-D int32 (FlashInfer: "int64 can cause indexing errors");
    - len(kv_indptr) = n + 1 = len(kv_last_page_len) + 1, kv_indptr[0] = 0, non-decreasing, kv_indptr[-1] =
      len(kv_indices);
    - every sequence has at least one page, and ``0 < kv_last_page_len[i] <= page_size``;
    - page ids are in [0, num_pages) (>= 0 when num_pages is not given), and a sequence lists a page at most once;
    - with ``seq_lens``: ``page_size * (pages_i - 1) + kv_last_page_len[i] == seq_lens[i]``.

    Raises :class:`kvref.errors.PageTableError` naming the array, the expected and the actual value.
    """
    arrays = {"kv_indptr": kv_indptr, "kv_indices": kv_indices, "kv_last_page_len": kv_last_page_len}
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray) or a.ndim != 1:
            raise PageTableError(name, "a 1-D NumPy array", getattr(a, "shape", type(a).__name__))
        if a.dtype != np.int32:
            raise PageTableError(name, "dtype int32", a.dtype.name)
    if isinstance(page_size, (bool, np.bool_)) or not isinstance(page_size, (int, np.integer)) or page_size < 1:
        raise PageTableError("page_size", "an integer >= 1", repr(page_size))
    n = kv_last_page_len.size
    if kv_indptr.size != n + 1:
        raise PageTableError("kv_indptr", f"length len(kv_last_page_len) + 1 = {n + 1}", kv_indptr.size)
    if kv_indptr[0] != 0:
        raise PageTableError("kv_indptr", "kv_indptr[0] == 0", int(kv_indptr[0]))
    pages = np.diff(kv_indptr.astype(np.int64))
    if np.any(pages < 0):
        i = int(np.flatnonzero(pages < 0)[0])
        raise PageTableError("kv_indptr", "non-decreasing entries", f"kv_indptr[{i + 1}] < kv_indptr[{i}]")
    if kv_indptr[-1] != kv_indices.size:
        raise PageTableError("kv_indptr", f"kv_indptr[-1] == len(kv_indices) = {kv_indices.size}", int(kv_indptr[-1]))
    if np.any(pages == 0):
        i = int(np.flatnonzero(pages == 0)[0])
        raise PageTableError("kv_indptr", "at least one page per sequence", f"sequence {i} with 0 pages")
    bad = np.flatnonzero((kv_last_page_len < 1) | (kv_last_page_len > page_size))
    if bad.size:
        i = int(bad[0])
        raise PageTableError("kv_last_page_len", f"0 < last_page_len <= page_size={page_size}",
                             f"{int(kv_last_page_len[i])} for sequence {i}")
    upper = np.iinfo(np.int32).max if num_pages is None else num_pages
    bad = np.flatnonzero((kv_indices < 0) | (kv_indices >= upper))
    if bad.size:
        i = int(bad[0])
        raise PageTableError("kv_indices", f"page ids in [0, {upper})", f"kv_indices[{i}] = {int(kv_indices[i])}")
    for i in range(n):
        own = kv_indices[kv_indptr[i]:kv_indptr[i + 1]]
        if np.unique(own).size != own.size:
            raise PageTableError("kv_indices", "each page at most once per sequence", f"a repeated page in sequence {i}")
    lengths = page_size * (pages - 1) + kv_last_page_len.astype(np.int64)
    if seq_lens is not None:
        seq_lens = np.asarray(seq_lens)
        if seq_lens.shape != (n,) or not np.array_equal(seq_lens, lengths):
            raise PageTableError("seq_lens", f"page_size * (pages - 1) + last_page_len = {lengths.tolist()}",
                                 np.asarray(seq_lens).tolist())
    return lengths
