"""The block pool of the pooled (paged) cache and its books: ref counts, a FIFO free queue, block tables.

Host bookkeeping, no K/V: ``kvref/pooled.py`` holds the storage, the addressing and the plan that uses these.

**The pool** (:class:`BlockPool`). Each block has a **ref count**, the number of block tables that list it. Blocks
with ref count 0 wait in the **free queue**: allocation pops the head, freeing appends at the tail (vLLM's order: the
least recently freed block is reused first). The invariants, checked by the tests after every operation::

    ref[b] = number of table entries equal to b        (so the counts are conserved: sum(ref) = table entries)
    ref[b] = 0  <=>  b is in the free queue, exactly once
    a block listed twice (two forked sequences) has ref >= 2

**Release** returns a sequence's blocks: ref -= 1 each, last block first; blocks that reach 0 go to the free queue's
tail (vLLM frees in reverse order: a request's last block is the least likely to be useful again). Freeing a block
whose ref count is 0 raises :class:`DoubleFreeError`.

**The books** (:class:`Books`): the pool plus, per sequence row, its status (never used, live, released), its block
table (held blocks, oldest first, -1 past
the last), its length L and its first held position e (tokens before e were evicted). A plan's dry run works on a
copy of the books; ``advance`` keeps the copy. :class:`SequenceRows` is the pooled cache's API over its books
(add, fork, release, evict, prewarm, exports).
"""

from collections import deque

import numpy as np

from .backends import host_memory_bytes
from .page_table import flashinfer_page_table, vllm_block_tables
from .errors import AllocationError, CacheOverflowError, DoubleFreeError, PoolExhaustedError, UnknownSequenceError
from .shapes import check_index, check_positive_int

__all__ = ["BlockPool", "Books", "LIVE", "NEVER_USED", "RELEASED", "SequenceRows"]


class BlockPool:
    """``num_blocks`` blocks with ref counts and a FIFO free queue (host bookkeeping; the storage is the cache's).

    ``allocate`` pops the free queue's head and sets the ref count to 1; ``share`` adds a reference (fork); ``free``
    drops one and queues the block at the tail when none is left. Counters: allocations, ``hits`` (allocations of a
    block whose memory was already touched, by earlier use or by ``PooledCache.prewarm``), ``reuses`` (allocations
    of a block that had been freed before) and the high-water mark of blocks in use.
    """

    #: host bytes of bookkeeping per block: ref count (8), touched and ever-freed flags (1 + 1), a free-queue entry
    BOOK_BYTES_PER_BLOCK = 8 + 2 + 8

    def __init__(self, num_blocks):
        check_positive_int("num_blocks", num_blocks)
        nbytes, limit = int(num_blocks) * self.BOOK_BYTES_PER_BLOCK, host_memory_bytes()
        if nbytes > limit:
            raise AllocationError("num_blocks", f"a pool whose books fit in the {limit} bytes of memory here",
                                  f"{nbytes} bytes of books for {int(num_blocks)} blocks")
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

    def untouched_head(self, count):
        """The blocks among the next ``count`` the free queue hands out whose memory was never touched; they count
        as touched from now on (``PooledCache.prewarm`` writes them)."""
        blocks = [b for b in list(self.free_queue)[:count] if not self.touched[b]]
        self.touched[blocks] = True
        return blocks

    def state(self):
        """A deep snapshot (arrays and counters)."""
        return {"ref_counts": self.ref_counts.copy(), "free_queue": np.array(self.free_queue, np.int64),
                "touched": self.touched.copy(), "ever_freed": self.ever_freed.copy(),
                "counters": (self.allocations, self.hits, self.reuses, self.high_water)}




#: a sequence row's status
NEVER_USED, LIVE, RELEASED = 0, 1, 2


class Books:
    """The pool plus, per sequence row: status, block table, length L, first held position e; and counters.

    tables[s, c] is the c-th held block of s (oldest first), -1 past the last; s holds positions e[s] .. L[s] - 1.
    """

    def __init__(self, pool, tables, lengths, starts, status):
        self.pool = pool
        self.tables = tables
        self.lengths = lengths
        self.starts = starts
        self.status = status  # NEVER_USED, LIVE or RELEASED per row
        self.evicted_tokens = 0  # tokens evicted so far, all sequences
        self.cow_copies = 0  # copy-on-write block copies so far

    def copy(self):
        """An independent copy."""
        other = Books(self.pool.copy(), self.tables.copy(), self.lengths.copy(), self.starts.copy(),
                      self.status.copy())
        other.evicted_tokens = self.evicted_tokens
        other.cow_copies = self.cow_copies
        return other

    def live(self):
        """Ids of the live sequences, ascending."""
        return [int(s) for s in np.flatnonzero(self.status == LIVE)]

    def check_live(self, name, seq):
        """``seq`` as an int if it is a live sequence row; else IndexOutOfRangeError or UnknownSequenceError."""
        check_index(name, seq, self.status.size)
        if self.status[seq] != LIVE:
            state = "released" if self.status[seq] == RELEASED else "never added"
            raise UnknownSequenceError(name, "a live sequence", f"sequence {int(seq)}, {state}")
        return int(seq)

    def free_row(self):
        """The lowest row that is not live (for add_sequence and fork); CacheOverflowError when every row is."""
        rows = np.flatnonzero(self.status != LIVE)
        if rows.size == 0:
            raise CacheOverflowError("max_seqs", f"a free sequence row (max_seqs={self.status.size})",
                                     f"all {self.status.size} rows live", detail="release a sequence first")
        return int(rows[0])

    def room(self, seq, block_size):
        """Slots ``seq`` can fill from the pool in one step: its last block's unused slots (unless that block is
        shared and must be copied first, which takes a free block) plus B per free block."""
        partial = int(self.lengths[seq]) % block_size
        room = self.pool.num_free * block_size
        if partial:
            shared = self.pool.ref_counts[self.tables[seq, self.held_blocks(seq, block_size) - 1]] > 1
            room = max(0, room - partial) if shared else room + block_size - partial
        return room

    def counters(self, block_size):
        """The pool's and the books' counters for ``stats()``."""
        pool, live = self.pool, self.live()
        allocated_slots = pool.num_used * block_size
        filled = self.slots_filled(live, block_size)
        return {"blocks_used": pool.num_used, "blocks_free": pool.num_free, "high_water_blocks": pool.high_water,
                "allocations": pool.allocations, "hits": pool.hits, "reuses": pool.reuses,
                "cow_copies": self.cow_copies, "evicted_tokens": self.evicted_tokens, "live_sequences": len(live),
                "lengths": [int(self.lengths[s]) for s in live],
                "tokens_held": sum(int(self.lengths[s] - self.starts[s]) for s in live),  # shared: once per seq
                "slots_filled": filled,  # distinct pool slots holding a held token
                "allocated_slots": allocated_slots, "internal_fragmentation": allocated_slots - filled}

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

    def drop_tail(self, seq, length, block_size):
        """Cut ``seq`` to ``length`` tokens (>= e): free its blocks past ceil(length / B), last first."""
        keep = -(-length // block_size) - int(self.starts[seq]) // block_size
        for column in reversed(range(max(keep, 0), self.held_blocks(seq, block_size))):
            self.pool.free(int(self.tables[seq, column]))
            self.tables[seq, column] = -1
        self.lengths[seq] = length
        if length == 0:
            self.starts[seq] = 0

    def fork(self, parent, child, block_size):
        """``child`` (a free row, now live) lists every block of ``parent`` (ref count + 1 each) and has its length
        and first position. No K/V is copied: an append into a shared, partly filled block copies it first."""
        self.status[child] = LIVE
        for column in range(self.held_blocks(parent, block_size)):
            self.pool.share(int(self.tables[parent, column]))
        self.tables[child] = self.tables[parent]
        self.lengths[child] = self.lengths[parent]
        self.starts[child] = self.starts[parent]

    def slots_filled(self, seqs, block_size):
        """Distinct pool slots holding a token that one of ``seqs`` holds (a shared slot counts once)."""
        occupied = np.zeros((self.pool.num_blocks, block_size), bool)
        for seq in seqs:
            start, length = int(self.starts[seq]), int(self.lengths[seq])
            for column in range(self.held_blocks(seq, block_size)):
                first_position = (start // block_size + column) * block_size  # position of the block's row 0
                lo = max(start, first_position) - first_position
                hi = min(length, first_position + block_size) - first_position
                occupied[self.tables[seq, column], lo:hi] = True
        return int(occupied.sum())


# ---------------------------------------------------------------------------------------------------------------
# The pooled cache's sequence rows: what PooledCache does with its books besides a step
# ---------------------------------------------------------------------------------------------------------------
class SequenceRows:
    """The sequence API of :class:`kvref.PooledCache` (a mixin over its ``_books``): live sequences, add, fork,
    release, exact eviction, prewarm, and the FlashInfer / vLLM exports (``kvref/page_table.py``)."""

    @property
    def pool(self):
        """The block pool (ref counts, free queue, counters). Read it; change it only through the cache."""
        return self._books.pool

    def live_sequences(self):
        """Ids of the live sequences, ascending."""
        return self._books.live()

    def _check_live(self, name, seq):
        return self._books.check_live(name, seq)

    def get_seq_length(self, seq=0):
        """Tokens seen by sequence ``seq`` (its next token goes to this position)."""
        return int(self._lengths[self._check_live("seq", seq)])

    def first_position(self, seq=0):
        """e: the first position sequence ``seq`` still holds (its evicted token count; 0 without eviction)."""
        return self._first_held(self._check_live("seq", seq))

    def held_positions(self, seq=0):
        """Positions sequence ``seq`` holds, in order: e .. L - 1."""
        seq = self._check_live("seq", seq)
        return np.arange(self._books.starts[seq], self._lengths[seq], dtype=np.int64)

    def block_table(self, seq=0):
        """The blocks sequence ``seq`` lists, oldest first (a copy)."""
        seq = self._check_live("seq", seq)
        return self._books.tables[seq, :self._books.held_blocks(seq, self.block_size)].copy()

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

    def _sequences(self, seq):
        return self.live_sequences() if seq is None else [self._check_live("seq", seq)]

    def add_sequence(self):
        """Start an empty sequence in the lowest free row; returns its id."""
        seq = self._books.free_row()
        self._check_not_mid_step("add_sequence")
        self._books.status[seq] = LIVE
        self._books.drop_tail(seq, 0, self.block_size)  # a row that is not live lists no block: this zeroes L, e
        self._end_step()
        return seq

    def fork(self, seq):
        """A new sequence that shares every block of ``seq`` (ref count + 1 each, no K/V copied); returns its id.
        The first append of either into a shared, partially filled block copies that block first."""
        seq = self._check_live("seq", seq)
        child = self._books.free_row()
        self._check_not_mid_step("fork")
        self._books.fork(seq, child, self.block_size)
        self._end_step()
        return child

    def release(self, seq):
        """End sequence ``seq``: drop its references, last block first (blocks that reach ref count 0 are freed)."""
        check_index("seq", seq, self.max_seqs)
        if self._books.status[seq] == RELEASED:
            raise DoubleFreeError("seq", "a live sequence", f"sequence {int(seq)}, already released")
        seq = self._check_live("seq", seq)
        self._check_not_mid_step("release")
        self._books.drop_tail(seq, 0, self.block_size)
        self._books.status[seq] = RELEASED
        self._end_step()

    def evict_tokens(self, seq, num_tokens):
        """Evict exactly the ``num_tokens`` oldest held tokens of ``seq`` (no more: seed 004 dropped a whole block);
        blocks all of whose tokens are then evicted are freed. Returns the number of blocks freed."""
        seq = self._check_live("seq", seq)
        held = int(self._lengths[seq] - self._books.starts[seq])
        check_index("num_tokens", num_tokens, held + 1, f"at most the {held} tokens sequence {seq} holds")
        self._check_not_mid_step("evict_tokens")
        free_before = self.pool.num_free
        self._books.evict_to(seq, int(self._books.starts[seq]) + int(num_tokens), self.block_size)
        self._end_step()
        return self.pool.num_free - free_before

    def prewarm(self, num_blocks=None):
        """Touch the memory of the next ``num_blocks`` blocks the pool will hand out (default: every free block), so
        that their first use does not page-fault (NumPy's zeros are mapped lazily by the OS). On the cuda backend the
        memory is committed already and only the accounting changes. Returns how many blocks were newly warmed.
        Their allocations then count as ``hits`` in ``stats()``. Any planned step becomes stale."""
        pool = self.pool
        count = pool.num_free if num_blocks is None else num_blocks
        check_index("num_blocks", count, pool.num_free + 1, f"at most the {pool.num_free} free blocks")
        self._check_not_mid_step("prewarm")
        blocks = pool.untouched_head(count)
        if blocks and isinstance(self._kv, np.ndarray):
            self._kv[:, :, blocks] = 0
        self._end_step()
        return len(blocks)

    # --- export: FlashInfer and vLLM page tables (kvref/page_table.py) ---------------------------------------
    def page_table(self, seq_ids=None):
        """FlashInfer's paged-KV description of sequences ``seq_ids`` (default: every live one), as a dict of int32
        arrays ``kv_indptr``, ``kv_indices``, ``kv_last_page_len``, plus ``page_size``. Every sequence needs at
        least one held token (FlashInfer requires 0 < last_page_len)."""
        return flashinfer_page_table(self._books, self._seq_ids(seq_ids).tolist(), self.block_size)

    def slot_mapping(self, step):
        """vLLM's ``slot_mapping`` for the step's tokens, sequence by sequence: (n_seq * T,) int64,
        ``slot = block * B + offset``."""
        self._check_step(step)
        return step.slots.reshape(-1).copy()

    def block_tables(self, seq_ids=None):
        """vLLM's ``block_tables`` (n, max_blocks) int32 padded with -1 and ``seq_lens`` (n,) int32."""
        return vllm_block_tables(self._books, self._seq_ids(seq_ids))
