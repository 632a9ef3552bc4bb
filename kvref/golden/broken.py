"""Deliberately broken implementations: each wraps a correct one (kvref's spec, ``Kvref("python")``) and adds ONE
named defect that a real KV cache has shipped, so the suite is shown to catch it. Every one must fail
``python -m kvref.golden check golden/v1 --impl kvref.golden.broken:NAME`` (exit status 1), with rows naming the
case, the step and the tensor.
"""

import numpy as np

from .impl import KvrefCache, Kvref

#: where the 16 bytes of 4-bit quants start in a block of each nibble format (32 elements per block): after
#: fp16 d (q4_0); d, m (q4_1); d, 4 bytes of high bits qh (q5_0); d, m, qh (q5_1)
QS_OFFSET = {"q4_0": 2, "q4_1": 4, "q5_0": 6, "q5_1": 8}


class WindowOffByOne:
    """Defect: a sliding-window query sees W + 1 keys (``k_pos > q_pos - W - 1``), FlashAttention's inclusive
    ``window_size`` taken as W (transformers#39408). Dense attention only."""

    name = "broken: window off by one"

    def __init__(self):
        self.spec = Kvref("python")

    def attention(self, q, k, v, q_positions, k_positions, scale, window, sinks):
        """The spec's attention with ``window + 1`` (when there is a window)."""
        return self.spec.attention(q, k, v, q_positions, k_positions, scale, window + 1 if window else 0, sinks)


def swap_nibbles(blocks, fmt):
    """The blocks with the two nibbles of every quant byte swapped (element j high, j + 16 low); q8_0 unchanged."""
    if fmt not in QS_OFFSET:
        return blocks
    size = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}[fmt]
    out = np.array(blocks, np.uint8).reshape(blocks.shape[0], -1, size)
    qs = out[:, :, QS_OFFSET[fmt]:]
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
