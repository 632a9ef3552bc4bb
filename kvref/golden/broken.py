"""Deliberately broken implementations: each wraps a correct one (kvref's spec, ``Kvref("python")``) and adds ONE
named defect that a real KV cache has shipped, so the suite is shown to catch it. Every one must fail
``python -m kvref.golden check golden/v1 --impl kvref.golden.broken:NAME`` (exit status 1), with rows naming the
case, the step and the tensor.
"""

import numpy as np

from .. import quant
from .impl import KvrefCache, Kvref

#: the nibble formats: 16 bytes of 4-bit quants per block of 32 (q8_0 holds whole bytes and has no nibbles)
NIBBLE_FORMATS = ("q4_0", "q4_1", "q5_0", "q5_1")


class WindowOffByOne:
    """Defect: a sliding-window query sees W + 1 keys (``k_pos > q_pos - W - 1``), FlashAttention's inclusive
    ``window_size`` taken as W (transformers#39408). Dense attention only."""

    name = "broken: window off by one"

    def __init__(self):
        self.spec = Kvref("python")

    def attention(self, q, k, v, q_positions, k_positions, scale, window, sinks):
        """The spec's attention with ``window + 1`` (when there is a window)."""
        return self.spec.attention(q, k, v, q_positions, k_positions, scale, window + 1 if window else 0, sinks)


class IgnoresPositions:
    """Defect: dense attention that trusts the row order instead of ``k_positions`` and ``q_positions`` (keys taken
    as positions 0 .. n-1, queries as the last T): right for a flat cache, wrong for a wrapped ring or a cache that
    no longer starts at position 0."""

    name = "broken: ignores positions"

    def __init__(self):
        self.spec = Kvref("python")

    def attention(self, q, k, v, q_positions, k_positions, scale, window, sinks):
        """The spec's attention with positions made up from the row indices."""
        n, t = k.shape[0], q.shape[0]
        return self.spec.attention(q, k, v, np.arange(n - t, n), np.arange(n), scale, window, sinks)


def swap_nibbles(blocks, fmt):
    """The blocks with the two nibbles of every quant byte swapped (element j high, j + 16 low); q8_0 unchanged.
    Where the quant bytes start in a block, and the block's size, come from :func:`kvref.quant.layout`."""
    if fmt not in NIBBLE_FORMATS:
        return blocks
    _, _, qs_offset, size = quant.layout(quant.GGML_TYPES[fmt])
    out = np.array(blocks, np.uint8).reshape(blocks.shape[0], -1, size)
    qs = out[:, :, qs_offset:]
    qs[...] = (qs >> 4) | (qs << 4)
    return out.reshape(blocks.shape)


class WrongNibbleOrder:
    """Defect: q4_0/q4_1/q5_0/q5_1 packed with element j in the HIGH nibble and j + 16 in the low one (ggml puts j
    low), both when quantizing and dequantizing; q8_0 stays correct."""

    name = "broken: wrong nibble order"

    def __init__(self):
        self.spec = Kvref("python")

    def quantize(self, x, fmt):
        """The spec's blocks, nibbles swapped."""
        return swap_nibbles(self.spec.quantize(x, fmt), fmt)

    def dequantize(self, blocks, fmt, head_dim):
        """Reads the nibbles the same wrong way round."""
        return self.spec.dequantize(swap_nibbles(blocks, fmt), fmt, head_dim)


def shifted_indices(kv_indptr, kv_indices):
    """Each sequence's pages read one entry late: ``kv_indices[kv_indptr[i] + 1 : kv_indptr[i + 1] + 1]``, the
    index clamped to the last entry."""
    take = np.concatenate([np.arange(a + 1, b + 1) for a, b in zip(kv_indptr[:-1], kv_indptr[1:])])
    return np.asarray(kv_indices)[np.minimum(take, len(kv_indices) - 1).astype(np.int64)]


class OffByOneTableCache(KvrefCache):
    """kvref's pooled cache whose exported block tables and kv_indices are shifted by one entry."""

    def physical(self):
        """The correct layout, then ``block_tables[s, j] = block_tables[s, j + 1]`` (last column -1) and
        ``kv_indices`` by :func:`shifted_indices`."""
        layout = super().physical()
        tables = layout["block_tables"]
        layout["block_tables"] = np.concatenate([tables[:, 1:], np.full_like(tables[:, :1], -1)], axis=1)
        if "kv_indices" in layout:
            layout["kv_indices"] = shifted_indices(layout["kv_indptr"], layout["kv_indices"]).astype(np.int32)
        return layout


class BlockTableOffByOne:
    """Defect: a block table read off by one, sequence i's pages taken from ``kv_indptr[i] + 1`` on: in paged
    attention, and in the pooled cache's exported layout (``block_tables``, ``kv_indices``)."""

    name = "broken: block table off by one"

    def __init__(self):
        self.spec = Kvref("python")

    def paged_attention(self, q, k_pages, v_pages, kv_indptr, kv_indices, kv_last_page_len, scale):
        """The spec's paged attention over the shifted page list."""
        return self.spec.paged_attention(q, k_pages, v_pages, kv_indptr, shifted_indices(kv_indptr, kv_indices),
                                         kv_last_page_len, scale)

    def open_cache(self, variant, config):
        """The pooled cache with the shifted layout; no other variant."""
        return OffByOneTableCache(variant, config, "python") if variant == "pooled" else None


class Layer0Cache(KvrefCache):
    """kvref's cache fed layer 0's K/V for every layer."""

    def append(self, seq_ids, k, v, q):
        """The correct append of ``k[0]``, ``v[0]`` repeated over the layers."""
        return super().append(seq_ids, *(np.repeat(a[:1], a.shape[0], axis=0) for a in (k, v)), q)


class LayersShareOffset:
    """Defect (seed 000's): every layer's K/V is written at layer 0's offset, so all layers hold layer 0's keys and
    values; the logical state (and attention) of layer 1 is wrong. Flat and ring caches."""

    name = "broken: layers share layer 0's offset"

    def open_cache(self, variant, config):
        """A :class:`Layer0Cache` for flat and ring, else None."""
        return Layer0Cache(variant, config, "python") if variant in ("flat", "ring") else None
