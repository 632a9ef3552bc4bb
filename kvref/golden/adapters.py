"""Peer libraries behind the golden suite's calling convention (``kvref/golden/impl.py``), each usable as
``python -m kvref.golden check golden/v1 --impl kvref.golden.adapters:NAME``:

* :class:`TorchSDPA`: dense and paged attention by ``torch.nn.functional.scaled_dot_product_attention``;
* :class:`GGUFQuant`: ggml block quantization by the ``gguf`` package;
* :class:`HFCacheLayers`: Hugging Face transformers' ``DynamicLayer`` / ``DynamicSlidingWindowLayer`` as the flat
  and ring caches, on the cases they can honestly run (:meth:`HFCacheLayers.supports` says why not, otherwise).

torch, gguf and transformers are imported when an adapter is made, not with this module (``pip install
'kvref[peers]'`` installs the pinned versions).
"""

import importlib

import numpy as np


def require(module, who):
    """Import ``module`` for the adapter ``who``, or raise an ImportError naming the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{who} needs the {module.split('.')[0]} package: pip install 'kvref[peers]'") from exc


def visible(q_positions, k_positions, window, sinks):
    """(T, n) bool: key j is seen by query i iff ``k_pos <= q_pos`` and (window == 0 or ``k_pos < sinks`` or
    ``k_pos > q_pos - (window - sinks)``), the rule of ``kvref/golden/impl.py``."""
    q_pos = np.asarray(q_positions, np.int64)[:, None]
    k_pos = np.asarray(k_positions, np.int64)[None, :]
    seen = k_pos <= q_pos
    if window:
        seen &= (k_pos < sinks) | (k_pos > q_pos - (window - sinks))
    return seen


def sdpa(q, k, v, allowed, scale):
    """torch SDPA in float32 with an explicit boolean mask: q (B, Hq, T, D), k, v (B, Hkv, S, D) torch tensors,
    allowed (T, S) bool (True: attend) -> (B, Hq, T, D) float32. GQA: query head h reads KV head
    ``h // (Hq // Hkv)`` (``enable_gqa``)."""
    import torch
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=torch.as_tensor(allowed),
                                          scale=float(scale), enable_gqa=q.shape[1] != k.shape[1])


def tensor(a):
    """A torch tensor holding a copy of the array ``a`` (the golden arrays may be read-only)."""
    import torch

    return torch.tensor(np.ascontiguousarray(a))


# ---------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------
class TorchSDPA:
    """Dense and paged attention by torch's ``scaled_dot_product_attention`` on the CPU, float32 (float16 K/V are
    widened), with the mask built from the positions; returns torch tensors (the checker takes ``__array__``)."""

    name = "torch SDPA (cpu, float32, explicit mask)"

    def __init__(self):
        self.torch = require("torch", "TorchSDPA")

    def attention(self, q, k, v, q_positions, k_positions, scale, window, sinks):
        """q (T, Hq, D), k, v (n, Hkv, D) -> (T, Hq, D): token-major in, heads first for SDPA."""
        heads_first = [tensor(a).transpose(0, 1)[None] for a in (q, k, v)]  # (1, H, T|n, D)
        out = sdpa(*heads_first, visible(q_positions, k_positions, window, sinks), scale)
        return out[0].transpose(0, 1)

    def paged_attention(self, q, k_pages, v_pages, kv_indptr, kv_indices, kv_last_page_len, scale):
        """Gather each sequence's rows by FlashInfer's page table (pages ``kv_indices[kv_indptr[i]:kv_indptr[i+1]]``,
        length ``page_size * (pages - 1) + kv_last_page_len[i]``); its one query is at the last position, so it
        sees every row."""
        page_size = k_pages.shape[1]
        outs = []
        for i in range(q.shape[0]):
            pages = np.asarray(kv_indices[kv_indptr[i]:kv_indptr[i + 1]], np.int64)
            length = page_size * (len(pages) - 1) + int(kv_last_page_len[i])
            k, v = (a[pages].reshape((-1,) + a.shape[2:])[:length] for a in (k_pages, v_pages))  # (length, Hkv, D)
            outs.append(self.attention(q[i:i + 1], k, v, [length - 1], np.arange(length), scale, 0, 0)[0])
        return self.torch.stack(outs)


# ---------------------------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------------------------
class GGUFQuant:
    """ggml block formats by ``gguf.quants.quantize`` / ``dequantize`` (the gguf package's NumPy port of ggml)."""

    name = "gguf.quants"

    def __init__(self):
        self.gguf = require("gguf", "GGUFQuant")

    def qtype(self, fmt):
        """The GGMLQuantizationType of a kvref format name ("q4_0" -> Q4_0)."""
        return self.gguf.GGMLQuantizationType[fmt.upper()]

    def quantize(self, x, fmt):
        """x (rows, D) float32 -> blocks (rows, row_bytes) uint8."""
        return self.gguf.quants.quantize(np.ascontiguousarray(x, np.float32), self.qtype(fmt))

    def dequantize(self, blocks, fmt, head_dim):
        """blocks (rows, row_bytes) uint8 -> (rows, head_dim) float32."""
        x = self.gguf.quants.dequantize(np.ascontiguousarray(blocks), self.qtype(fmt))
        return x.astype(np.float32).reshape(-1, head_dim)


# ---------------------------------------------------------------------------------------------------------------
# Cache management: Hugging Face cache layers
# ---------------------------------------------------------------------------------------------------------------
class HFCacheLayers:
    """Hugging Face transformers' cache layers as the flat cache (one ``DynamicLayer`` per layer) and the ring
    cache (one ``DynamicSlidingWindowLayer(sliding_window=W)`` per layer).

    What they can run: an HF layer holds one (batch, heads, seq, head_dim) tensor and no per-sequence lengths, so
    every append must cover every sequence with the same number of tokens; ``crop`` and ``reset`` act on the whole
    batch (``seq`` None, or a batch of one). There is no fork, release, eviction or capacity (``DynamicLayer`` grows
    without bound: an append kvref refuses with CacheOverflowError is not refused), and no attention sinks.
    :meth:`supports` names the first such step of a case, and the checker skips it; a cache opened anyway raises
    NotImplementedError on a per-sequence append or crop/reset.

    Attention: ``append`` computes the output from the states ``update`` returns (what a model's attention gets):
    the last returned token is at position ``L_after - 1``; the mask is causal, plus the window on a ring.

    The window convention (``window_convention = "hf"`` on a ring cache): ``DynamicSlidingWindowLayer.update``
    returns the W - 1 cached tokens plus the new ones but keeps only ``full[:, :, -sliding_window + 1:]``, the
    W - 1 most recent tokens (the next query brings its own key, so W - 1 suffice), where kvref's ring holds W.
    ``read`` reports what HF holds; the checker compares it with the last W - 1 expected positions
    (``kvref.golden.run.trim_to_past``). ``physical`` reports only ``lengths`` (HF's ``get_seq_length``, which
    counts every token appended, like kvref's).
    """

    name = "transformers cache layers (DynamicLayer, DynamicSlidingWindowLayer)"

    def __init__(self):
        require("torch", "HFCacheLayers")
        self.cache_utils = require("transformers.cache_utils", "HFCacheLayers")

    def supports(self, case):
        """True, or the reason the HF layers cannot run ``case`` (a manifest case dict)."""
        if case["kind"] != "cache":
            return "cache management only"
        config = case["config"]
        if case["variant"] not in ("flat", "ring"):
            return f"no HF layer for the {case['variant']} variant"
        if config.get("sinks", 0):
            return "DynamicSlidingWindowLayer has no attention sinks"
        every = list(range(config.get("batch", 1)))
        for step in case["steps"]:
            op, args, where = step["op"], step["args"], f"{step['name']} {step['op']}"
            if op == "append" and step["error"]:
                return f"{where} must be refused ({step['error']}): DynamicLayer has no capacity"
            if op == "append" and sorted(args["seq_ids"]) != every:
                return f"{where} to sequences {args['seq_ids']} of {len(every)}: HF layers advance the whole batch"
            if op in ("crop", "reset") and args.get("seq") is not None and len(every) > 1:
                return f"{where} of sequence {args['seq']} of {len(every)}: HF layers act on the whole batch"
            if op not in ("append", "crop", "reset"):
                return f"{where}: HF cache layers have no {op}"
        return True

    def open_cache(self, variant, config):
        """An :class:`HFCache` for "flat" or "ring" without sinks, else None."""
        if variant not in ("flat", "ring") or config.get("sinks", 0):
            return None
        return HFCache(self.cache_utils, variant, config)


class HFCache:
    """One stack of HF cache layers behind the cache-management convention (see :class:`HFCacheLayers`)."""

    def __init__(self, cache_utils, variant, config):
        self.config = config
        self.batch = config.get("batch", 1)
        self.window = config["window"] if variant == "ring" else 0
        self.dtype = np.dtype(config["dtype"])
        n = config.get("layers", 1)
        if variant == "ring":
            self.window_convention = "hf"  # keeps the W - 1 most recent tokens (see HFCacheLayers)
            self.layers = [cache_utils.DynamicSlidingWindowLayer(sliding_window=self.window) for _ in range(n)]
        else:
            self.layers = [cache_utils.DynamicLayer() for _ in range(n)]

    def length(self):
        """Tokens appended to every sequence (HF's ``get_seq_length``)."""
        return self.layers[0].get_seq_length()

    def whole_batch(self, seq, op):
        """Refuse (NotImplementedError) an ``op`` on one sequence of a batch of several."""
        if seq is not None and self.batch > 1:
            raise NotImplementedError(f"HF cache layers cannot {op} one sequence ({seq}) of a batch of {self.batch}")

    def append(self, seq_ids, k, v, q):
        """``layer.update`` per layer with k, v as (batch, kv_heads, T, D); attention over the returned states."""
        if sorted(seq_ids) != list(range(self.batch)):
            raise NotImplementedError(f"HF cache layers advance every sequence together: cannot append to "
                                      f"sequences {list(seq_ids)} of a batch of {self.batch}")
        rows = np.argsort(seq_ids)  # batch row b holds the input row of sequence b
        start, new = self.length(), k.shape[2]
        out = None if q is None else np.empty(q.shape, np.float32)
        for layer, cache in enumerate(self.layers):
            keys, values = cache.update(*(tensor(a[layer][rows]).transpose(1, 2) for a in (k, v)))
            if q is not None:
                end, held = start + new, keys.shape[2]
                allowed = visible(np.arange(start, end), np.arange(end - held, end), self.window, 0)
                o = sdpa(tensor(q[layer][rows]).transpose(1, 2), keys, values, allowed, self.config["scale"])
                out[layer] = o.transpose(1, 2).numpy()[np.asarray(seq_ids)]
        return out

    def read(self, seq):
        """The positions HF holds (the last ``held`` of ``length``) and their K/V (layers, held, kv_heads, D)."""
        if self.length() == 0:
            empty = np.zeros((len(self.layers), 0, self.config["kv_heads"], self.config["head_dim"]), self.dtype)
            return np.zeros(0, np.int64), empty, empty
        k, v = ([getattr(c, part)[seq].transpose(0, 1).numpy() for c in self.layers] for part in ("keys", "values"))
        held = k[0].shape[0]
        return np.arange(self.length() - held, self.length(), dtype=np.int64), np.stack(k), np.stack(v)

    def physical(self):
        """Only ``lengths``: HF's tensors are not kvref's physical layout."""
        return {"lengths": np.full(self.batch, self.length(), np.int64)}

    def crop(self, seq, max_length):
        """Keep the first ``max_length`` tokens (negative: drop that many) of the whole batch: HF's ``crop`` takes
        the (non-positive) number of tokens to remove."""
        self.whole_batch(seq, "crop")
        length = self.length()
        target = min(length, max_length if max_length >= 0 else length + max_length)
        if target < 0:
            raise ValueError(f"cannot crop {length} tokens to {max_length}")
        for cache in self.layers:  # a refusal (sliding layer past its window) comes from the first layer
            cache.crop(target - length)

    def reset(self, seq):
        """``layer.reset()`` on every layer (the whole batch)."""
        self.whole_batch(seq, "reset")
        for cache in self.layers:
            cache.reset()
