"""Figures of kvref, one function per figure, shared by ``python -m kvref.plots`` and the notebooks.

Every ``*_figure`` function takes parameters and returns a :class:`matplotlib.figure.Figure`. The figures are built
with the object-oriented API (``Figure(...)``, never ``pyplot``), so building one touches no global state, needs no
``plt.close``, and never shows a window: ``python -m kvref.plots`` renders them with Agg (PNG) and the SVG backend,
and a notebook displays them inline. :func:`save` writes a figure as PNG and SVG.

One module per topic, each variant one column (as ``kvref/<variant>.py``, ``cpu/<variant>.py``, ...):

* :mod:`kvref.plots.flat`      :func:`flat_timeline_figure` (a real FlatCache across append, rejected overflow,
                               crop and reset, next to seed 001's corrupted position), :func:`layouts_figure`
                               (head-major vs token-major offsets)
* :mod:`kvref.plots.ring`      :func:`ring_timeline_figure`, :func:`ring_memory_figure`,
                               :func:`window_conventions_figure`, :func:`chunked_prefill_figure`
* :mod:`kvref.plots.two_tier`  :func:`two_tier_timeline_figure`, :func:`two_tier_memory_figure`,
                               :func:`two_tier_error_figure`
* :mod:`kvref.plots.pooled`    :func:`pooled_tables_figure`, :func:`pooled_memory_figure`
* :mod:`kvref.plots.quant`     :func:`quant_blocks_figure`, :func:`quant_error_figure` (ggml's block formats)
* :mod:`kvref.plots.cost`      :func:`memory_figure` (bytes of published models, seed 003's formula, tensor
                               parallelism), :func:`cost_figure` (O(n) vs O(n²) per generated token, seed 002)
* :mod:`kvref.plots.style`     what they share: :func:`save`, :func:`format_bytes`, colours, axis helpers

Each ``*_figure`` has a data function next to it (``*_events``, ``*_samples``, ``*_rows``) that drives a real cache
and checks what it records; the tests check those data. The float64 reference and the backend check live in
:mod:`kvref.check` (re-exported here under their old names); ``python -m kvref.plots`` (:mod:`kvref.plots.__main__`)
runs the check, then writes every figure and ``index.html``; :mod:`kvref.plots.jobs` holds its units of work (one
part of the check, one figure), which it runs in worker processes.
"""

from ..check import (POOLED_CHECK_OPS, TOLERANCES, TWO_TIER_CHECK_STEPS, VARIANT_CHECKS, TwoTierHistory,
                     backend_max_error, check_backends, nmse, pooled_backend_max_error, random_step_inputs,
                     reference_attention, ring_backend_max_error, round_trip, two_tier_backend_max_error)
from .cost import (GQA_PRESETS, cost_figure, generation_counts, measure_decode_times, memory_figure, memory_rows,
                   tinyllama_row)
from .flat import flat_timeline_events, flat_timeline_figure, layouts_figure
from .pooled import (POOLED_TABLES_OPS, pooled_memory_figure, pooled_memory_samples, pooled_tables_events,
                     pooled_tables_figure, request_lengths)
from .quant import (LLAMA_CPP_MEASURED, LLAMA_CPP_TOTAL_ERROR, QUANT_BOUNDS, format_bits, llama_cpp_rmse,
                    llama_cpp_test_data, quant_block_layout, quant_blocks_figure, quant_error_figure,
                    quant_error_rows)
from .ring import (RING_TIMELINE_STEPS, chunked_prefill_events, chunked_prefill_figure, ring_memory_figure,
                   ring_memory_samples, ring_timeline_events, ring_timeline_figure, window_conventions_figure,
                   window_masks)
from .style import (CACHED_COLOR, MODEL_COLORS, QUANT_COLORS, RECOMPUTE_COLOR, SEED_COLOR, bytes_axis,
                    context_label, format_bytes, save, short_bytes)
from .two_tier import (LLAMA_CPP_FA_NMSE, TWO_TIER_TIMELINE_STEPS, error_shape, prefill_tier_rows, tail_after,
                       two_tier_error_figure, two_tier_error_rows, two_tier_memory_figure, two_tier_memory_samples,
                       two_tier_timeline_events, two_tier_timeline_figure)


#: the figures ``python -m kvref.plots`` writes, in order (file stem -> what it shows)
FIGURE_NAMES = ("memory", "cost", "flat_timeline", "layouts", "ring_timeline", "ring_memory", "window_conventions",
                "chunked_prefill", "quant_blocks", "quant_error", "two_tier_timeline", "two_tier_memory",
                "two_tier_error", "pooled_tables", "pooled_memory")

#: one-line caption of each figure (index.html)
FIGURE_CAPTIONS = {
    "memory": "KV-cache bytes vs context for published models; seed 003's query-head formula; bytes per "
              "tensor-parallel rank.",
    "cost": "Work and measured time per generated token with and without a cache (seed 002's count corrected).",
    "flat_timeline": "A real FlatCache's length across append, rejected overflow, crop and reset (seed 001's "
                     "position beside it).",
    "layouts": "Element offsets of the head-major and token-major layouts, and what one head's attention reads.",
    "ring_timeline": "Which position each slot of a real RingCache holds after each step: slot p % W, overwrites "
                     "at p >= W, a deferred chunk, and S = 2 attention sinks.",
    "ring_memory": "Ring memory stays flat in n once past W (Mistral-7B, W = 4096, formulas), checked by a small "
                   "real RingCache's measured nbytes.",
    "window_conventions": "One window W in kvref, FlashAttention, llama.cpp / HF and Mistral's reference: W keys, "
                          "or W + 1 where the parameter is misread.",
    "chunked_prefill": "Why kvref defers a chunk that wraps the ring: written first, it overwrites keys its own "
                       "earlier queries need (LLMs-from-scratch #1013).",
    "quant_blocks": "The bytes of one q8_0 and one q4_0 block of a real vector (kvref.quant.quantize): the fp16 "
                    "scale d, then the codes; q4_0 packs element j in the low nibble of byte j and element j + 16 in "
                    "its high nibble.",
    "quant_error": "True RMSE and max |error| of each ggml format vs bits per element (llama.cpp's test data "
                   "0.1 + 2 cos(i) and N(0, 1)); the worst error per block vs its bound (q4_0: amax/8, the clamp); "
                   "llama.cpp's array_rmse = sqrt(sum e^2)/n, i.e. true RMSE / sqrt(n), vs its 0.002 threshold.",
    "two_tier_timeline": "The tier of every position of a real TwoTierCache (R = 8, B = 4, M = 24, q4_0) after each "
                         "step: a prefill longer than R goes straight to its tiers, migration moves B tokens at a "
                         "time, eviction keeps exactly M.",
    "two_tier_memory": "Bytes vs tokens generated, Llama-3-8B: flat fp16 vs two-tier q8_0 / q4_0 with an fp16 tail "
                       "of 256 (formulas; the saving is one ratio, the bytes both caches allocate for M tokens, as "
                       "in the two-tier memory table), checked by a small real TwoTierCache's measured "
                       "stats()['bytes_used'].",
    "two_tier_error": "Attention-output error (NMSE) of a real TwoTierCache against an fp32 FlatCache fed the same "
                      "random K/V/Q, vs the tail length R; and after a prefill, kvref's tiers vs quantizing the whole "
                      "prompt (transformers #35185).",
    "pooled_tables": "The pool of a real PooledCache (8 blocks of B = 4) after a prefill, a fork, appends and a "
                     "release: block tables, ref counts, the copy-on-write copy of the shared partial block, and the "
                     "free queue (freed blocks join its tail; stale values stay until reused).",
    "pooled_memory": "K/V bytes of 32 requests of mixed lengths (Llama-3-8B): a FlatCache sized for the longest vs "
                     "PooledCaches of block size B, measured from real caches (stats()['bytes_used']) on the formula "
                     "sum ceil(L / B) · B · bytes_per_token; the waste is at most B - 1 slots per sequence.",
}


#: the figures of each topic, in the order of index.html's table of contents: (title, module, figure names)
FIGURE_GROUPS = (
    ("Flat cache", "flat", ("flat_timeline", "layouts")),
    ("Ring (sliding-window) cache", "ring", ("ring_timeline", "ring_memory", "window_conventions",
                                             "chunked_prefill")),
    ("Two-tier cache", "two_tier", ("two_tier_timeline", "two_tier_memory", "two_tier_error")),
    ("Pooled (paged) cache", "pooled", ("pooled_tables", "pooled_memory")),
    ("Quantization (ggml's block formats)", "quant", ("quant_blocks", "quant_error")),
    ("Cost and memory", "cost", ("memory", "cost")),
)

__all__ = [
    "CACHED_COLOR", "FIGURE_CAPTIONS", "FIGURE_GROUPS", "FIGURE_NAMES", "GQA_PRESETS", "LLAMA_CPP_FA_NMSE",
    "LLAMA_CPP_MEASURED", "LLAMA_CPP_TOTAL_ERROR", "MODEL_COLORS", "POOLED_CHECK_OPS", "POOLED_TABLES_OPS",
    "QUANT_BOUNDS", "QUANT_COLORS", "RECOMPUTE_COLOR", "RING_TIMELINE_STEPS", "SEED_COLOR", "TOLERANCES",
    "TWO_TIER_CHECK_STEPS", "TWO_TIER_TIMELINE_STEPS", "TwoTierHistory", "VARIANT_CHECKS", "backend_max_error",
    "bytes_axis", "check_backends", "chunked_prefill_events", "chunked_prefill_figure", "context_label",
    "cost_figure", "error_shape", "flat_timeline_events", "flat_timeline_figure", "format_bits", "format_bytes",
    "generation_counts", "layouts_figure", "llama_cpp_rmse", "llama_cpp_test_data", "measure_decode_times",
    "memory_figure", "memory_rows", "nmse", "pooled_backend_max_error", "pooled_memory_figure",
    "pooled_memory_samples", "pooled_tables_events", "pooled_tables_figure", "prefill_tier_rows",
    "quant_block_layout", "quant_blocks_figure", "quant_error_figure", "quant_error_rows", "random_step_inputs",
    "reference_attention", "request_lengths", "ring_backend_max_error", "ring_memory_figure", "ring_memory_samples",
    "ring_timeline_events", "ring_timeline_figure", "round_trip", "save", "short_bytes", "tail_after",
    "tinyllama_row", "two_tier_backend_max_error", "two_tier_error_figure", "two_tier_error_rows",
    "two_tier_memory_figure", "two_tier_memory_samples", "two_tier_timeline_events", "two_tier_timeline_figure",
    "window_conventions_figure", "window_masks",
]


def main(argv=None):
    """Command line: see ``python -m kvref.plots --help``. Returns the exit status."""
    from .__main__ import main as _main

    return _main(argv)
