"""The golden cases: what each one does, written as data (a config and a list of operations).

Every case is deterministic: its inputs come from ``numpy.random.default_rng(seed)`` with the seed derived from the
case's name (:func:`seed_of`), and its expected values from the spec run as plain Python (``Kvref("python")``,
``kvref/golden/write.py``). Sizes are small so that the default suite stays a few hundred kB; ``size="large"``
adds realistic shapes (llama-3-8b's 32 query heads, 8 KV heads, head_dim 128, at n = 4096).

A cache case is a list of ``(op, args)``:

* ``("append", {"seq_ids": [..], "num_tokens": T})``: new K, V and Q for the listed sequences, all layers;
  ``"error": "CacheOverflowError"`` in args marks a step that must be refused with the state unchanged;
* ``("crop", {"seq": s or None, "max_length": m})``, ``("reset", {"seq": s or None})``;
* ``("fork", {"seq": s, "child": c})``, ``("add_sequence", {"child": c})``, ``("release", {"seq": s})``,
  ``("evict", {"seq": s, "num_tokens": n})`` (pooled).
"""

import zlib
from dataclasses import dataclass, field

#: the shapes of the management cases: two layers (an implementation that writes every layer into layer 0, seed
#: 000's defect, fails), GQA with 2 query heads per KV head, head_dim 32 (one ggml block per row)
SMALL = {"layers": 2, "q_heads": 4, "kv_heads": 2, "head_dim": 32}
#: tolerances of the attention output (float32 K/V, float16 K/V): an fp16 kernel with fp32 accumulation passes
OUT_TOLERANCE = {"float32": (1e-4, 1e-4), "float16": (1e-3, 1e-3)}


def seed_of(name):
    """The seed of a case's inputs: crc32 of its name (stable across machines and Python versions)."""
    return zlib.crc32(name.encode())


@dataclass
class Case:
    """One case: name, kind ("cache", "attention", "paged_attention", "quantize"), variant (cache cases), a
    sentence saying what it checks, its config, and its operations."""

    name: str
    kind: str
    description: str
    config: dict
    ops: list = field(default_factory=list)
    variant: str = None


def append(seq_ids, num_tokens, error=None, attend=True):
    """An append step; ``attend=False`` gives it no queries (a long prefill of the large suite)."""
    args = {"seq_ids": list(seq_ids), "num_tokens": num_tokens}
    if error:
        args["error"] = error
    if not attend:
        args["attend"] = False
    return ("append", args)


def cache_case(name, variant, description, ops, dtype="float32", **config):
    """A cache case: the SMALL shape with ``config`` overrides, scale 1/sqrt(head_dim)."""
    config = {**SMALL, "dtype": dtype, **config}
    config["scale"] = 1.0 / config["head_dim"] ** 0.5
    return Case(name, "cache", description, config, ops, variant)


def decode(seq_ids, steps):
    """``steps`` decode steps (one token each) for ``seq_ids``."""
    return [append(seq_ids, 1) for _ in range(steps)]


# ---------------------------------------------------------------------------------------------------------------
# flat
# ---------------------------------------------------------------------------------------------------------------
def flat_cases():
    """Flat: prefill and decode with per-sequence lengths, MHA and GQA, fp32 and fp16, crop, reset, overflow."""
    return [
        cache_case("flat_prefill_decode_mha", "flat", "prefill then decode, per-sequence lengths; MHA (4 query heads, "
                   "4 KV heads), float32", [append([0, 1], 5), append([0], 3)] + decode([0, 1], 3),
                   batch=2, max_tokens=16, kv_heads=4),
        cache_case("flat_prefill_decode_gqa_f16", "flat", "prefill then decode, per-sequence lengths; GQA (4 query "
                   "heads per KV head), float16 K/V", [append([1], 4), append([0, 1], 6)] + decode([0, 1], 3),
                   dtype="float16", batch=2, max_tokens=16, q_heads=8),
        cache_case("flat_crop_reset", "flat", "crop one sequence, decode, reset one sequence, append, reset all",
                   [append([0, 1], 6), ("crop", {"seq": 0, "max_length": 3}), append([0, 1], 1),
                    ("crop", {"seq": None, "max_length": -2}), ("reset", {"seq": 1}), append([0, 1], 2),
                    ("reset", {"seq": None}), append([0, 1], 1)], batch=2, max_tokens=12),
        cache_case("flat_whole_batch", "flat", "every step covers the whole batch (as Hugging Face's DynamicLayer "
                   "requires): prefill, decode, crop all, append, reset all, append",
                   [append([0, 1], 5)] + decode([0, 1], 2) + [("crop", {"seq": None, "max_length": 4}),
                                                              append([0, 1], 2), ("reset", {"seq": None}),
                                                              append([0, 1], 3)], batch=2, max_tokens=12),
        cache_case("flat_overflow", "flat", "an append past max_tokens is refused with CacheOverflowError and "
                   "changes nothing; the cache then fills exactly",
                   [append([0, 1], 6), append([0], 3, error="CacheOverflowError"), append([0, 1], 2),
                    append([1], 1, error="CacheOverflowError")], batch=2, max_tokens=8),
    ]


# ---------------------------------------------------------------------------------------------------------------
# ring (W = 8)
# ---------------------------------------------------------------------------------------------------------------
def ring_cases():
    """Ring (W = 8): the wrap at W-1, W, W+1; a prefill longer than W; a deferred chunk; sinks."""
    w = 8
    return [
        cache_case("ring_wrap", "ring", "decode across the wrap: the two sequences reach W-1, W and W+1 tokens at "
                   "different steps (slot = p % W; the slot of p - W is overwritten)",
                   [append([0], w - 3), append([1], w - 2)] + decode([0, 1], 4), batch=2, window=w),
        cache_case("ring_wrap_f16", "ring", "the same wrap with float16 K/V and one sequence",
                   [append([0], w - 2)] + decode([0], 3), dtype="float16", batch=1, window=w),
        cache_case("ring_prefill_longer_than_window", "ring", "one prefill of W + 3 tokens: its early queries see "
                   "keys its later tokens overwrite, and only the last W stay",
                   [append([0], w + 3)] + decode([0], 2), batch=1, window=w),
        cache_case("ring_chunked_prefill_deferred", "ring", "a chunk of 5 after 6 tokens wraps over keys its own "
                   "first queries need: the write must wait until they are answered (W = 8)",
                   [append([0, 1], 6), append([0, 1], 5), append([0, 1], 1)], batch=2, window=w),
        cache_case("ring_sinks", "ring", "S = 2 attention sinks: positions 0 and 1 stay, the other W - S slots "
                   "rotate (slot S + (p - S) % (W - S))",
                   [append([0], 10)] + decode([0], 3) + [append([0], 4)], batch=1, window=w, sinks=2),
    ]


# ---------------------------------------------------------------------------------------------------------------
# two-tier (R = 8 tail tokens, migration in batches of 4, M = 20 held)
# ---------------------------------------------------------------------------------------------------------------
def two_tier_cases():
    """Two-tier: migration at R-1, R, R+1; eviction at M-1, M, M+1; q8_0 and q4_0 store bytes."""
    config = {"batch": 2, "tail_tokens": 8, "max_tokens": 20, "migration_batch": 4}
    return [
        cache_case("two_tier_migration_q8_0", "two_tier", "migration at R-1, R and R+1 tokens (the HF #39106 "
                   "boundary); store bytes in q8_0; attention over both tiers",
                   [append([0, 1], 6)] + decode([0, 1], 4), store_format="q8_0", **config),
        cache_case("two_tier_migration_q4_0_f16", "two_tier", "the same boundaries in q4_0 with float16 K/V",
                   [append([0, 1], 6)] + decode([0, 1], 4), dtype="float16", store_format="q4_0", **config),
        cache_case("two_tier_eviction_q8_0", "two_tier", "eviction at M-1, M and M+1 held tokens: the oldest "
                   "stored tokens leave, queries see a window of M",
                   [append([0, 1], 18)] + decode([0, 1], 3) + [append([0], 5)], store_format="q8_0", **config),
        cache_case("two_tier_long_prefill_q4_0", "two_tier", "a prefill longer than R goes to both tiers at once; "
                   "then decode", [append([0], 15), append([1], 3)] + decode([0, 1], 2), store_format="q4_0",
                   **config),
    ]


# ---------------------------------------------------------------------------------------------------------------
# pooled (B = 4)
# ---------------------------------------------------------------------------------------------------------------
def pooled_cases():
    """Pooled (B = 4): block boundaries, fork with copy-on-write, release and reuse, exhaustion, eviction."""
    return [
        cache_case("pooled_block_boundaries", "pooled", "lengths B-1, B and B+1: a block is taken exactly when a "
                   "sequence writes position k * B", [append([0, 1], 3)] + decode([0, 1], 2) + [append([1], 4)],
                   num_blocks=8, block_size=4, batch=2),
        cache_case("pooled_fork_copy_on_write", "pooled", "fork a sequence with a half-full last block: both "
                   "share its blocks (ref count 2) until the first append of either copies the shared block",
                   [append([0], 6), ("fork", {"seq": 0, "child": 1}), append([0, 1], 1), append([1], 3)],
                   num_blocks=10, block_size=4, batch=1, max_seqs=3),
        cache_case("pooled_release_reuse", "pooled", "release a sequence (its blocks go back to the free queue, "
                   "last block first), start a new one, which reuses them",
                   [append([0, 1], 5), ("release", {"seq": 0}), ("add_sequence", {"child": 0}), append([0], 6),
                    append([0, 1], 1)], num_blocks=8, block_size=4, batch=2, max_seqs=2),
        cache_case("pooled_exhaustion", "pooled", "a step that needs more blocks than are free raises "
                   "PoolExhaustedError and changes nothing",
                   [append([0, 1], 7), append([0, 1], 2, error="PoolExhaustedError"), append([0], 1)],
                   num_blocks=4, block_size=4, batch=2),
        cache_case("pooled_eviction", "pooled", "evict='oldest' drops the oldest full unshared block when the pool "
                   "runs dry; evict exactly 3 tokens by hand",
                   [append([0, 1], 8), append([0], 6), ("evict", {"seq": 1, "num_tokens": 3}), append([0, 1], 1)],
                   num_blocks=6, block_size=4, batch=2, evict="oldest"),
    ]


# ---------------------------------------------------------------------------------------------------------------
# attention alone, paged attention, quantization
# ---------------------------------------------------------------------------------------------------------------
def attention_case(name, description, n_keys, queries, kv_heads, window=0, sinks=0, dtype="float32", q_heads=8,
                   head_dim=32, key_order="sorted"):
    """A dense attention case: n_keys keys, the last ``queries`` positions as queries."""
    config = {"q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": dtype,
              "scale": 1.0 / head_dim ** 0.5, "window": window, "sinks": sinks}
    return Case(name, "attention", description, config,
                [("attention", {"n_keys": n_keys, "num_queries": queries, "key_order": key_order})])


def attention_cases(large=False):
    """Dense attention: decode and chunked prefill, window and sinks, GQA groups 1, 4 and 8."""
    cases = [
        attention_case("attention_decode_g1", "decode, MHA (group 1)", 37, 1, kv_heads=8),
        attention_case("attention_decode_g4_f16", "decode, GQA group 4, float16 K/V", 37, 1, kv_heads=2,
                       dtype="float16"),
        attention_case("attention_decode_g8", "decode, MQA (group 8)", 37, 1, kv_heads=1),
        attention_case("attention_chunked_prefill_g4", "a chunk of 6 queries at the end of 40 keys (causal inside "
                       "the chunk)", 40, 6, kv_heads=2),
        attention_case("attention_window", "sliding window W = 8 over 30 keys, a chunk of 4 queries", 30, 4,
                       kv_heads=2, window=8),
        attention_case("attention_window_sinks", "W = 8 with S = 2 sinks, a chunk of 4 queries", 30, 4, kv_heads=2,
                       window=8, sinks=2),
        attention_case("attention_ring_order", "keys in a wrapped ring's slot order (positions 16 .. 20, 13 .. 15), "
                       "3 queries at 18, 19, 20: which keys each sees depends on k_positions", 8, 3, kv_heads=2,
                       window=8, key_order="ring"),
        attention_case("attention_positions_from_100", "keys at positions 100 .. 139 (a row index is not a "
                       "position): W = 16 with S = 2 sinks, which are positions 0 and 1, not rows 0 and 1; 4 queries",
                       40, 4, kv_heads=2, window=16, sinks=2, key_order="from_100"),
    ]
    if large:
        cases.append(attention_case("attention_llama3_8b_decode_4096", "llama-3-8b heads (32 q, 8 KV, D = 128), "
                                    "decode at n = 4096, float16", 4096, 1, kv_heads=8, q_heads=32, head_dim=128,
                                    dtype="float16"))
    return cases


def paged_cases():
    """Paged attention over a real pooled cache's FlashInfer page table (forks, copy-on-write, reuse)."""
    config = {"layers": 1, "q_heads": 4, "kv_heads": 2, "head_dim": 32, "dtype": "float32", "scale": 1.0 / 32 ** 0.5,
              "num_blocks": 12, "block_size": 4, "batch": 3, "max_seqs": 4}
    history = [append([0, 1, 2], 5), append([1], 3), ("fork", {"seq": 1, "child": 3}), append([2, 3], 2),
               ("release", {"seq": 0}), append([1], 5)]
    return [Case("paged_decode_after_fork_and_reuse", "paged_attention", "decode attention over FlashInfer's page "
                 "table (kv_indptr, kv_indices, kv_last_page_len) after forks, copy-on-write and reused blocks",
                 config, history),
            Case("paged_decode_f16", "paged_attention", "the same page table with float16 pages",
                 {**config, "dtype": "float16"}, history)]


#: the rows of every quantization case (see :func:`kvref.golden.write.quant_inputs`)
QUANT_ROWS = ("zeros", "random", "q8_0 ties (d = 1)", "q4_0 ties (d = 1)", "q4_1 ties (d = 1, min 0)",
              "q5_0 ties (d = 1)", "q5_1 ties (d = 1, min 0)", "fp16-subnormal scale", "scale 0 (underflow)",
              "large values (1e4)", "large values (max |x| = 6e4)", "one nonzero element", "all equal")


def quant_cases():
    """One case per ggml format: quantize the QUANT_ROWS, then dequantize the blocks."""
    from .. import quant

    return [Case(f"quant_{fmt}", "quantize", f"ggml {fmt}: quantize rows (ties, zeros, fp16-subnormal scales, "
                 "large values) and dequantize the blocks", {"format": fmt, "head_dim": 64, "rows": list(QUANT_ROWS)},
                 [("quantize", {}), ("dequantize", {})]) for fmt in quant.FORMATS]


def large_cases():
    """Realistic shapes, not committed: llama-3-8b heads, a 4096-token flat cache and a ring of 4096."""
    llama = {"layers": 1, "q_heads": 32, "kv_heads": 8, "head_dim": 128}
    return [
        cache_case("flat_llama3_8b_4096", "flat", "llama-3-8b heads, prefill 4095 then decode",
                   [append([0], 4095, attend=False), append([0], 1)], dtype="float16", batch=1, max_tokens=4096,
                   record_state="last", **llama),
        cache_case("ring_llama3_8b_window_4096", "ring", "llama-3-8b heads, W = 4096: prefill 4095, decode 3 "
                   "across the wrap", [append([0], 4095, attend=False)] + decode([0], 3), dtype="float16", batch=1,
                   window=4096, record_state="last", **llama),
    ]


def all_cases(size="default"):
    """Every case of the suite of ``size`` ("default": the committed suite; "large": plus realistic shapes)."""
    if size not in ("default", "large"):
        raise ValueError(f"size must be 'default' or 'large', got {size!r}")
    large = size == "large"
    cases = flat_cases() + ring_cases() + two_tier_cases() + pooled_cases() + attention_cases(large) + \
        paged_cases() + quant_cases()
    return cases + large_cases() if large else cases
