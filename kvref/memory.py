"""Memory formulas for KV caches, checked by the tests against the ``nbytes`` of real allocated caches.

A cache stores K and V (the factor 2) for every layer, sequence, **KV head**, token slot and head element:

    bytes = 2 * layers * batch * local_kv_heads * max_tokens * head_dim * element_bytes

With tensor parallelism over ``tp_size`` GPUs each rank keeps only its own KV heads (seed 002's formula):

    local_kv_heads = kv_heads / tp_size            when tp_size <= kv_heads (tp_size must divide kv_heads)
    local_kv_heads = 1                             when tp_size >  kv_heads (heads are replicated; tp_size must
                                                   be a multiple of kv_heads, as in vLLM)

Seed 003 used ``n_heads`` (query heads) in this formula: for a GQA model that overstates memory by
``q_heads / kv_heads`` (8x for TinyLlama, 4x for Llama-3-8B).

A ring cache (``kvref/ring.py``) is this formula with ``max_tokens = W``, the window, however many tokens have gone
through it (:func:`ring_bytes`), plus one int64 stored position per layer, sequence and slot
(:func:`ring_position_bytes`).

A two-tier cache (``kvref/two_tier.py``) holds a tail of R full-precision slots and a store of S = M - R + B - 1
slots of ggml blocks (:func:`two_tier_bytes`): per token, layer and KV head, K and V each take
``head_dim / 32 * bytes_per_block`` bytes (34 for q8_0, 18 for q4_0), i.e. 1.0625 or 0.5625 bytes per element
instead of 2 (fp16): 1.88x and 3.56x less. The bytes of N held tokens of which R are in the tail are
``R * tail_bytes_per_token + (N - R) * store_bytes_per_token`` (:func:`two_tier_held_bytes`).

A pooled (paged) cache (``kvref/pooled.py``) allocates one pool of ``num_blocks`` blocks of B = ``block_size`` token
slots, shared by every sequence: ``num_blocks * B * bytes_per_token`` (:func:`pooled_bytes`, its ``nbytes``). A
sequence of L tokens takes ``ceil(L / B)`` blocks, so a batch of lengths L_i uses

    blocks_needed = sum ceil(L_i / B)                            (:func:`blocks_needed`; without forked sharing)
    bytes_used    = blocks_needed * B * bytes_per_token          (:func:`pooled_used_bytes`, ``stats()["bytes_used"]``)

against ``batch * max(L_i) * bytes_per_token`` for a flat cache sized for the longest sequence. Only the last block
of a sequence is partly empty: the **internal fragmentation** is ``sum (ceil(L_i / B) * B - L_i)`` slots
(:func:`internal_fragmentation`), fewer than B per sequence. B = 1 wastes nothing but needs a table entry per
token; a large B approaches the flat cache's waste for short sequences.
"""

import numpy as np

from .errors import ShapeError
from .shapes import check_positive_int

MIB = 1024 * 1024
GIB = 1024 * MIB


def local_kv_heads(kv_heads, tp_size=1):
    """KV heads held by one tensor-parallel rank (see the module docstring)."""
    check_positive_int("tp_size", tp_size)
    if tp_size <= kv_heads:
        if kv_heads % tp_size:
            raise ShapeError("tp_size", f"a divisor of kv_heads={kv_heads} (or a multiple of it)", tp_size)
        return kv_heads // tp_size
    if tp_size % kv_heads:
        raise ShapeError("tp_size", f"a multiple of kv_heads={kv_heads} (or a divisor of it)", tp_size)
    return 1


def bytes_per_token(shape, tp_size=1):
    """Bytes one token adds to the cache on one rank, all layers: 2 * layers * local_kv_heads * head_dim * bytes."""
    return 2 * shape.layers * local_kv_heads(shape.kv_heads, tp_size) * shape.head_dim * shape.element_bytes


def bytes_per_layer(shape, batch, max_tokens, tp_size=1):
    """Bytes of one layer on one rank: 2 * batch * local_kv_heads * max_tokens * head_dim * bytes."""
    check_positive_int("batch", batch)
    check_positive_int("max_tokens", max_tokens)
    return 2 * batch * local_kv_heads(shape.kv_heads, tp_size) * max_tokens * shape.head_dim * shape.element_bytes


def cache_bytes(shape, batch, max_tokens, tp_size=1):
    """Bytes of the whole cache on one rank: layers * bytes_per_layer = batch * max_tokens * bytes_per_token."""
    return shape.layers * bytes_per_layer(shape, batch, max_tokens, tp_size)


def ring_bytes(shape, batch, window):
    """K/V bytes of a ring cache of ``window`` = W slots per sequence: :func:`cache_bytes` with max_tokens = W.

    The same for every number of tokens generated: past W the ring overwrites its oldest slot instead of growing.
    """
    check_positive_int("window", window)
    return cache_bytes(shape, batch, window)


def ring_position_bytes(shape, batch, window):
    """Bytes of a ring cache's stored slot positions: layers * batch * W int64 (8 bytes each), one per layer, sequence
    and slot (``RingCache.stats()["position_bytes"]``; not counted in ``nbytes``)."""
    check_positive_int("batch", batch)
    check_positive_int("window", window)
    return shape.layers * batch * window * 8


def store_bytes_per_token(shape, fmt):
    """Bytes one token takes in a two-tier cache's quantized store, all layers: 2 * layers * kv_heads *
    (head_dim / 32) * bytes_per_block."""
    from .quant import row_bytes

    return 2 * shape.layers * shape.kv_heads * row_bytes(shape.head_dim, fmt)


def two_tier_bytes(shape, batch, tail_tokens, max_tokens, fmt, migration_batch):
    """Allocated bytes of a two-tier cache: the tail (R slots in the shape's dtype) plus the store
    (S = M - R + B - 1 slots of ggml blocks), for ``batch`` sequences."""
    from .two_tier import store_capacity

    check_positive_int("batch", batch)
    store_slots = store_capacity(tail_tokens, max_tokens, migration_batch)
    return batch * (tail_tokens * bytes_per_token(shape) + store_slots * store_bytes_per_token(shape, fmt))


def two_tier_held_bytes(shape, held_tokens, tail_held, fmt):
    """Bytes that ``held_tokens`` tokens of one sequence really occupy when ``tail_held`` of them are in the tail
    and the rest in the store (what ``stats()["bytes_used"]`` counts)."""
    return tail_held * bytes_per_token(shape) + (held_tokens - tail_held) * store_bytes_per_token(shape, fmt)


def _check_lengths(lengths):
    """The lengths as a list of ints >= 0 (ShapeError otherwise)."""
    values = list(lengths)
    for i, n in enumerate(values):
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ShapeError("lengths", "integers >= 0 (tokens per sequence)", f"lengths[{i}] = {n!r}")
    return [int(n) for n in values]


def pooled_bytes(shape, num_blocks, block_size):
    """Allocated bytes of a pooled cache (``PooledCache.nbytes``): the pool's ``num_blocks * block_size`` token
    slots, all layers, K and V: ``num_blocks * block_size * bytes_per_token``. The same whatever the sequences hold."""
    check_positive_int("num_blocks", num_blocks)
    check_positive_int("block_size", block_size)
    return num_blocks * block_size * bytes_per_token(shape)


def blocks_needed(lengths, block_size):
    """Blocks a batch of sequences of ``lengths`` tokens takes from the pool, none shared: ``sum ceil(L / B)``
    (a sequence takes block k when it writes position k * B; an empty sequence takes none)."""
    check_positive_int("block_size", block_size)
    return sum(-(-n // block_size) for n in _check_lengths(lengths))


def pooled_used_bytes(shape, lengths, block_size):
    """Bytes of the blocks a batch of ``lengths`` tokens uses in a pooled cache, none shared (what
    ``stats()["bytes_used"]`` reports): ``blocks_needed * block_size * bytes_per_token``."""
    return blocks_needed(lengths, block_size) * block_size * bytes_per_token(shape)


def internal_fragmentation(lengths, block_size):
    """Token slots allocated but empty (``stats()["internal_fragmentation"]`` without sharing or eviction): the
    unused tail of each sequence's last block, ``sum (ceil(L / B) * B - L)``; each term is below B."""
    check_positive_int("block_size", block_size)
    return sum(-(-n // block_size) * block_size - n for n in _check_lengths(lengths))


def wrong_heads_bytes(shape, batch, max_tokens):
    """Seed 003's formula, which sizes the cache by query heads: kept only to show how far off it is."""
    return 2 * shape.layers * batch * max_tokens * shape.q_heads * shape.head_dim * shape.element_bytes


def memory_table(names=None, contexts=(2048, 4096, 8192, 32768), batch=1, dtype="float16", tp_size=1):
    """Rows ``(model, context, bytes)`` of :func:`cache_bytes` for presets: the table the notebook and report show."""
    from .shapes import PRESETS, preset

    rows = []
    for name in names or PRESETS:
        shape = preset(name, dtype)
        for context in contexts:
            rows.append((name, context, cache_bytes(shape, batch, context, tp_size)))
    return rows
