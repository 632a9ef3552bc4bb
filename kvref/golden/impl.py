"""The calling convention an implementation follows to be checked (``docs/golden-format.md`` says it in full), and
kvref's own implementation of it, :class:`Kvref`, which also writes the suite (``Kvref("python")`` is the spec).

An implementation is any object with some of these methods (a case whose method is missing is skipped):

* dense attention: ``attention(q, k, v, q_positions, k_positions, scale, window, sinks) -> out``
  q (T, q_heads, D) float32; k, v (n, kv_heads, D); q_positions (T,), k_positions (n,) int64 -> out (T, q_heads, D).
  Key j is seen by query i iff ``k_pos[j] <= q_pos[i]`` and (window == 0 or ``k_pos[j] < sinks`` or
  ``k_pos[j] > q_pos[i] - (window - sinks)``). GQA: query head h reads KV head ``h // (q_heads // kv_heads)``.
* paged attention (FlashInfer's page table, NHD pages), one decode query per sequence at its last position:
  ``paged_attention(q, k_pages, v_pages, kv_indptr, kv_indices, kv_last_page_len, scale) -> out``
  q (n, q_heads, D); k_pages, v_pages (num_pages, page_size, kv_heads, D); the three int32 arrays -> (n, q_heads, D).
* quantization (ggml block formats): ``quantize(x, fmt) -> blocks`` with x (rows, D) float32 and blocks
  (rows, row_bytes) uint8; ``dequantize(blocks, fmt, head_dim) -> x`` (rows, D) float32.
* cache management: ``open_cache(variant, config) -> cache`` (or None: not supported), where the cache has
  ``append(seq_ids, k, v, q) -> out | None`` with k, v (layers, n, T, kv_heads, D) and q (layers, n, T, q_heads, D),
  out like q; ``read(seq) -> (positions, k, v)``, the logical content: the positions the sequence holds in
  increasing order and their K/V (layers, held, kv_heads, D); optional ``physical() -> {name: array}``, and the ops
  ``crop(seq, max_length)``, ``reset(seq)``, ``fork(seq) -> child``, ``add_sequence() -> id``, ``release(seq)``,
  ``evict(seq, num_tokens)``.
  ``seq`` None means every sequence. A refused operation raises any exception and changes nothing.

Arrays may be returned as NumPy arrays or anything with ``__array__`` or ``__dlpack__`` (torch tensors).
"""

import numpy as np

from .. import CacheShape, FlatCache, PooledCache, RingCache, TwoTierCache, quant
from ..attention import attend_gathered_tokens
from ..backends import backend_ops

#: the cache class of each variant, and the config keys its constructor takes besides shape and backend
CACHES = {
    "flat": (FlatCache, ("batch", "max_tokens")),
    "ring": (RingCache, ("batch", "window", "sinks")),
    "two_tier": (TwoTierCache, ("batch", "tail_tokens", "max_tokens", "store_format", "migration_batch")),
    "pooled": (PooledCache, ("num_blocks", "block_size", "batch", "max_seqs", "max_tokens", "evict")),
}


def shape_of(config):
    """The CacheShape a case's config describes."""
    return CacheShape(layers=config.get("layers", 1), q_heads=config["q_heads"], kv_heads=config["kv_heads"],
                      head_dim=config["head_dim"], dtype=config["dtype"])


def token_major(a):
    """(..., kv_heads, n, D) -> (..., n, kv_heads, D): kvref stores head-major, the golden files are token-major."""
    return np.ascontiguousarray(np.swapaxes(a, -3, -2))


class KvrefCache:
    """One kvref cache behind the cache-management convention (see the module docstring)."""

    def __init__(self, variant, config, backend):
        cls, keys = CACHES[variant]
        self.variant = variant
        self.config = config
        self.shape = shape_of(config)
        self.scale = np.float32(config["scale"])
        self.cache = cls(self.shape, backend=backend, **{k: config[k] for k in keys if k in config})
        self.last_slots = None  # the slots of the last append (ring: -1 for a token a later one overwrites)

    def append(self, seq_ids, k, v, q):
        """One step: plan, then per layer write and attend, then advance. Returns out (layers, n, T, q_heads, D),
        or None when ``q`` is None (a step without queries)."""
        cache = self.cache
        self.last_slots = None  # a refused step has no slots
        step = cache.plan(k.shape[2], seq_ids)
        out = None if q is None else np.empty(q.shape, np.float32)
        for layer in range(self.shape.layers):
            cache.write(step, layer, k[layer], v[layer])
            if q is not None:
                out[layer] = cache.attend(step, layer, q[layer], self.scale)
        cache.advance(step)
        self.last_slots = np.array(step.slots)
        return out

    def read(self, seq):
        """(positions, k, v): the positions ``seq`` holds in order and their K/V (layers, held, kv_heads, D)."""
        cache = self.cache
        if hasattr(cache, "held_positions"):  # ring, pooled
            positions = np.asarray(cache.held_positions(seq), np.int64)
        elif hasattr(cache, "tiers"):  # two-tier: e .. L - 1
            positions = np.arange(cache.tiers(seq)["evicted"][1], cache.get_seq_length(seq), dtype=np.int64)
        else:  # flat: 0 .. L - 1
            positions = np.arange(cache.get_seq_length(seq), dtype=np.int64)
        k = np.stack([token_major(cache.keys(layer, seq)) for layer in range(self.shape.layers)])
        v = np.stack([token_major(cache.values(layer, seq)) for layer in range(self.shape.layers)])
        return positions, k, v

    def physical(self):
        """The variant's physical layout as named arrays (``docs/golden-format.md`` lists them)."""
        cache = self.cache
        layout = {"lengths": np.array(cache.lengths, np.int64)}
        if self.variant == "ring":
            kv = cache.kv  # (layers, 2, batch, kv_heads, W, D)
            layout["slot_positions"] = np.array(cache.slot_positions, np.int64)
            layout["k_slots"] = token_major(kv[:, 0]).view(self.shape.public_dtype)  # (layers, batch, W, Hkv, D)
            layout["v_slots"] = token_major(kv[:, 1]).view(self.shape.public_dtype)
        elif self.variant == "two_tier":
            layout["tiers"] = np.array([[t["evicted"][1], t["store"][1], t["tail"][1]]
                                        for t in map(cache.tiers, range(cache.batch))], np.int64)
            for seq in range(cache.batch):
                blocks = np.stack([cache.store_blocks(layer, seq) for layer in range(self.shape.layers)])
                layout[f"seq{seq}/store_k"] = token_major(blocks[:, 0])  # (layers, n_store, Hkv, row_bytes)
                layout[f"seq{seq}/store_v"] = token_major(blocks[:, 1])
        elif self.variant == "pooled":
            live = cache.live_sequences()
            lengths, starts = np.zeros(cache.max_seqs, np.int64), np.zeros(cache.max_seqs, np.int64)
            tables = np.full((cache.max_seqs, cache.table_width), -1, np.int32)  # rows not live: all -1, L = e = 0
            for s in live:
                lengths[s], starts[s] = cache.get_seq_length(s), cache.first_position(s)
                held = cache.block_table(s)
                tables[s, :len(held)] = held
            layout.update(lengths=lengths, starts=starts, block_tables=tables)
            layout["ref_counts"] = cache.pool.ref_counts.astype(np.int32)
            layout["free_queue"] = np.array(cache.pool.free_queue, np.int64)
            holding = [s for s in live if cache.get_seq_length(s) > cache.first_position(s)]
            if holding:
                table = cache.page_table(holding)
                layout["page_table_seqs"] = np.array(holding, np.int64)
                for name in ("kv_indptr", "kv_indices", "kv_last_page_len"):
                    layout[name] = table[name]
        if self.last_slots is not None and self.variant in ("ring", "pooled"):
            layout["slot_mapping" if self.variant == "pooled" else "step_slots"] = self.last_slots.reshape(
                -1 if self.variant == "pooled" else self.last_slots.shape)
        return layout

    # --- the other operations ------------------------------------------------------------------------------
    def crop(self, seq, max_length):
        """Keep the first ``max_length`` tokens of ``seq`` (None: every sequence)."""
        self.cache.crop(max_length, seq)
        self.last_slots = None

    def reset(self, seq):
        """Forget the tokens of ``seq`` (None: every sequence)."""
        self.cache.reset(seq)
        self.last_slots = None

    def fork(self, seq):
        """A new sequence sharing the blocks of ``seq``; returns its id."""
        self.last_slots = None
        return self.cache.fork(seq)

    def add_sequence(self):
        """Start an empty sequence; returns its id."""
        self.last_slots = None
        return self.cache.add_sequence()

    def release(self, seq):
        """End ``seq``; its blocks go back to the pool."""
        self.cache.release(seq)
        self.last_slots = None

    def evict(self, seq, num_tokens):
        """Evict exactly the ``num_tokens`` oldest held tokens of ``seq``."""
        self.cache.evict_tokens(seq, num_tokens)
        self.last_slots = None


class Kvref:
    """kvref itself as an implementation, on one backend: "python" (the spec, which writes the suite), "cpu" or
    "cuda" (the CUDA simulator when ``NUMBA_ENABLE_CUDASIM=1``). ``--impl kvref.golden.impl:Kvref`` checks cpu."""

    def __init__(self, backend="cpu"):
        self.backend = backend
        self.name = f"kvref ({backend})"
        if backend == "cuda":
            self.attention = None  # kvref has no dense CUDA kernel: the dense attention cases are skipped

    def open_cache(self, variant, config):
        """A kvref cache of ``variant`` built from a case config."""
        return KvrefCache(variant, config, self.backend)

    def attention(self, q, k, v, q_positions, k_positions, scale, window, sinks):
        """Dense attention through the spec's ``attend_gathered_tokens`` (python), or its njit twin (cpu), which
        ``kvref/cpu/two_tier.py`` compiles as ``attend_materialized_tokens`` for the two-tier cache's materializing
        path: one function, compiled once."""
        keys = token_major(np.asarray(k, np.float32))[None]  # (1, Hkv, n, D): token_major swaps back
        values = token_major(np.asarray(v, np.float32))[None]
        out = np.zeros((1,) + q.shape, np.float32)
        run = attend_gathered_tokens if self.backend == "python" else backend_ops(
            "two_tier", "cpu").attend_materialized_tokens
        run(keys, values, np.asarray(k_positions, np.int64)[None], np.asarray(q_positions, np.int64)[None],
            int(window), int(sinks), np.asarray(q, np.float32)[None], np.float32(scale), out,
            q.shape[1] // k.shape[1], q.shape[2])
        return out[0]

    def paged_attention(self, q, k_pages, v_pages, kv_indptr, kv_indices, kv_last_page_len, scale):
        """FlashInfer's page table turned into kvref's (block table, start 0, query at the last position), then
        the pooled cache's attend kernel of this backend."""
        num_pages, page_size, kv_heads, head_dim = k_pages.shape
        storage = np.dtype(np.uint16) if k_pages.dtype == np.float16 else np.dtype(np.float32)
        kv = np.stack([token_major(k_pages), token_major(v_pages)])[None].view(storage)  # (1, 2, pages, Hkv, B, D)
        n_seq = q.shape[0]
        pages = np.diff(kv_indptr)
        tables = np.full((n_seq, max(1, int(pages.max()))), -1, np.int64)
        for i in range(n_seq):
            tables[i, :pages[i]] = kv_indices[kv_indptr[i]:kv_indptr[i + 1]]
        positions = (page_size * (pages - 1) + kv_last_page_len - 1).astype(np.int64)[:, None]
        out = np.zeros((n_seq, 1) + q.shape[1:], np.float32)
        if self.backend == "cuda":
            from numba import cuda

            kv = cuda.to_device(np.ascontiguousarray(kv))
        backend_ops("pooled", self.backend).attend_tokens(kv, 0, tables, np.zeros(n_seq, np.int64), positions,
                                                          np.asarray(q, np.float32)[:, None], np.float32(scale), out,
                                                          q.shape[1] // kv.shape[3], q.shape[2], kv.shape[3])
        return out[:, 0]

    def quantize(self, x, fmt):
        """ggml blocks of float32 rows ``x`` (kvref.quant.quantize)."""
        return quant.quantize(np.asarray(x, np.float32), fmt, backend=self.backend)

    def dequantize(self, blocks, fmt, head_dim):
        """float32 rows of ggml blocks (kvref.quant.dequantize)."""
        return quant.dequantize(blocks, fmt, (blocks.shape[0], head_dim), backend=self.backend)
