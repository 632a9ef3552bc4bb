"""``python -m kvref.plots [--quick] [--out DIR]``: check the backends, then write every figure and an index.html.

1. Every available backend ("python", "cpu", and "cuda" where kvref.backends() says it can run) is compared with a
   float64 NumPy reference on a small case, for the flat, the ring, the two-tier and the pooled cache; the run aborts
   with exit status 1 if any error exceeds its tolerance, before anything is timed.
2. Each figure of :mod:`kvref.plots` is built and written as PNG and SVG, one progress line per figure.
3. ``DIR/index.html`` shows the figures, the memory tables, the quantization-error table, the backend check, the
   timings and the machine.
"""

import argparse
import html
import os
import platform
import sys
import time

from .. import memory
from . import (FIGURE_CAPTIONS, FIGURE_NAMES, LLAMA_CPP_TOTAL_ERROR, check_backends, chunked_prefill_figure,
               cost_figure, flat_timeline_figure, format_bytes, generation_counts, layouts_figure,
               measure_decode_times, memory_figure, memory_rows, pooled_memory_figure, pooled_tables_figure,
               quant_blocks_figure, quant_error_figure, quant_error_rows, ring_memory_figure, ring_timeline_figure,
               save, tinyllama_row,
               two_tier_error_figure, two_tier_memory_figure, two_tier_timeline_figure, window_conventions_figure)

TABLE_CONTEXTS = (2048, 4096, 8192, 32768)

#: the two-tier memory table: contexts (= max_tokens M), tail R and migration batch B, store formats
TWO_TIER_TABLE = ((8192, 32768), 256, 64, ("q8_0", "q4_0"))

#: decode-timing settings: (contexts, repetitions)
QUICK_TIMING = ((16, 32, 64, 128, 256, 512), 3)
FULL_TIMING = ((16, 32, 64, 128, 256, 512, 1024, 2048), 5)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m kvref.plots", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="figures", help="output directory (default: figures)")
    parser.add_argument("--quick", action="store_true", help="shorter timing sweep (well under a minute)")
    return parser.parse_args(argv)


def machine_info():
    """Platform, CPU model, cores and library versions, as (label, value) pairs."""
    import matplotlib
    import numba
    import numpy

    from ..backends import backends

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = [("platform", platform.platform()), ("python", platform.python_version()), ("CPU", cpu),
            ("cores", f"{os.cpu_count()} ({usable} usable by this process)"),
            ("numpy", numpy.__version__), ("numba", f"{numba.__version__} ({numba.config.NUMBA_NUM_THREADS} threads, "
                                                    f"threading layer {numba.config.THREADING_LAYER})"),
            ("matplotlib", matplotlib.__version__)]
    for name, (ok, reason) in backends().items():
        info.append((f"backend {name}", f"{'available' if ok else 'not available'}: {reason}"))
    return info


def _table(header, rows):
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _bytes_cell(n):
    return f'<span data-bytes="{n}" title="{n:,} bytes">{format_bytes(n)}</span>'


def quant_table(rows):
    """The quantization-error table of index.html, from :func:`kvref.plots.quant_error_rows`."""
    e = html.escape
    body = []
    for r in rows:
        measured = "-" if r["llama_cpp_measured"] is None else f"{r['llama_cpp_measured']:.6f}"
        status = "<span class='ok'>pass</span>" if r["llama_cpp_passes"] else "<span class='fail'>FAIL</span>"
        body.append([e(r["format"]), f"{r['bits']:g}", f"{r['bytes_per_block']}", f"{r['cos_rmse']:.5f}",
                     f"{r['cos_max']:.5f}", f"{r['normal_rmse']:.5f}", f"{r['normal_max']:.5f}",
                     f"{r['worst_block']:.5f} (1/{round(1 / r['bound'])} {e(r['block_stat'])})",
                     f"{r['llama_cpp_metric']:.6f}", measured, status])
    return _table(["format", "bits / element", "bytes / 32 elements", "RMSE (llama.cpp data)",
                   "max |error| (llama.cpp data)", "RMSE (N(0, 1))", "max |error| (N(0, 1))",
                   "worst block: max |error| / amax or range (bound)", "llama.cpp array_rmse (kvref)",
                   "llama.cpp array_rmse (printed by llama.cpp)", f"< {LLAMA_CPP_TOTAL_ERROR}"], body)


def two_tier_memory_table():
    """Allocated bytes of a flat fp16 cache and two-tier caches (fp16 tail) per preset, batch 1 (index.html)."""
    from ..shapes import PRESETS, preset

    contexts, tail, batch_size, formats = TWO_TIER_TABLE
    rows = []
    for name in PRESETS:
        shape = preset(name)
        for context in contexts:
            flat = memory.cache_bytes(shape, 1, context)
            cells = [html.escape(name), f"{context:,}", _bytes_cell(flat)]
            for fmt in formats:
                if shape.head_dim % 32:
                    cells.append(f"- (head_dim {shape.head_dim} is not a multiple of 32)")
                    continue
                nbytes = memory.two_tier_bytes(shape, 1, tail, context, fmt, batch_size)
                cells.append(f"{_bytes_cell(nbytes)} ({flat / nbytes:.2f}x less)")
            rows.append(cells)
    return _table(["model", "max_tokens M", "FlatCache fp16"] + [f"TwoTierCache {f} + fp16 tail" for f in formats],
                  rows)


def write_index(out_dir, checks, timings, counts, timings_log, total_s, quick, quant_rows=None):
    """Write ``out_dir/index.html``; returns its path."""
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>kvref figures</title><style>"
        "body{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%;"
        "border:1px solid #eee}.fail{color:#c00;font-weight:bold}.ok{color:#080}</style></head><body>",
        "<h1>kvref: figures of the flat, ring, two-tier and pooled caches</h1>",
        f"<p>Written by <code>python -m kvref.plots{' --quick' if quick else ''}</code> in {total_s:.1f} s. "
        "Every figure is built by a function of <code>kvref.plots</code>, the same one the notebooks call.</p>",
    ]

    parts.append("<h2>Backend check</h2><p>Attention of every backend against a float64 NumPy reference (gather, "
                 "softmax, matmul), every layer, checked before anything is timed. <b>flat</b>: from the cache's "
                 "stored K/V, over a chunked prefill, a one-sequence step and decode steps. <b>ring</b>: a RingCache "
                 "of W = 6 slots (no sinks, then 2 sinks) against the window rule i - W &lt; j &lt;= i over every "
                 "K/V row fed, unwrapped, over a prefill, a step that wraps (deferred), decode steps past the wrap "
                 "and a chunk longer than the ring. <b>two_tier</b>: a TwoTierCache (R = 6, B = 3, M = 12) in each "
                 "store format against the same rule with W = M over the values the tiers hold before the step: "
                 "positions below m through a quantize / dequantize round trip of the value fed, the rest as fed; "
                 "over a prefill longer than R, decode steps that migrate, and a chunk longer than M. <b>pooled</b>: "
                 "a PooledCache of 8 blocks of B = 4 tokens and three sequences against plain causal attention over "
                 "every K/V row fed to each sequence (a fork inherits its parent's), over a prefill that ends "
                 "mid-block, a fork whose next step copies the shared block (copy-on-write), chunks across block "
                 "boundaries, a release and a new sequence on reused blocks; then the same with evict='oldest' and "
                 "max_tokens = 7 (keys from e' = max(0, L + T - 7), a window that starts mid-block).</p>")
    rows = []
    for r in checks:
        if r["ok"] is None:
            status, err = "skipped", "-"
        else:
            status = "<span class='ok'>ok</span>" if r["ok"] else "<span class='fail'>FAIL</span>"
            err = f"{r['max_error']:.2e}"
        rows.append([e(r["backend"]), e(r["variant"]), e(r["dtype"]), err, f"{r['tolerance']:.0e}", status,
                     f"{r['seconds']:.2f}", e(r["reason"])])
    parts.append(_table(["backend", "cache", "dtype", "max |error|", "tolerance", "result",
                         "seconds (compile included)",
                         "note"], rows))

    parts.append("<h2>Figures</h2>")
    for name in FIGURE_NAMES:
        parts.append(f"<h3>{e(name)}</h3><p>{e(FIGURE_CAPTIONS[name])} <a href='{name}.png'>{name}.png</a> · "
                     f"<a href='{name}.svg'>{name}.svg</a></p><img src='{name}.svg' alt='{e(name)}'>")

    if quant_rows:
        parts.append("<h2>Quantization error of ggml's formats</h2><p><code>kvref.plots.quant_error_rows</code>: "
                     "quantize and dequantize with <code>kvref.quant</code> (f16: NumPy's float16, the tail). "
                     "llama.cpp data: <code>x[i] = 0.1 + 2 cos(i)</code>, n = 4096, from llama.cpp's "
                     "<code>tests/test-quantize-fns.cpp</code>, whose <code>array_rmse</code> is "
                     "<code>sqrt(sum e²) / n</code> = true RMSE / sqrt(n) = RMSE / 64: its threshold "
                     f"{LLAMA_CPP_TOTAL_ERROR} means a true RMSE below {LLAMA_CPP_TOTAL_ERROR * 64:.3f}. The printed "
                     "column is what llama.cpp c392e509 (AVX2 build) printed with <code>-v</code>. The block bound "
                     "leaves out the fp16 rounding of d (and m).</p>")
        parts.append(quant_table(quant_rows))
        contexts, tail, batch_size, _ = TWO_TIER_TABLE
        parts.append(f"<h2>Two-tier memory table</h2><p><code>kvref.memory.two_tier_bytes</code>: allocated K/V "
                     f"bytes, batch 1, an fp16 tail of R = {tail} slots and a store of S = M - R + B - 1 slots "
                     f"(B = {batch_size}) of ggml blocks, against a FlatCache of M fp16 slots.</p>")
        parts.append(two_tier_memory_table())

    parts.append("<h2>Memory table</h2><p><code>kvref.memory.memory_table</code>: K and V, every layer, batch 1, "
                 "fp16, bytes = 2 · layers · kv_heads · head_dim · 2 · tokens (binary units: "
                 "1 GiB = 2<sup>30</sup> bytes).</p>")
    from ..shapes import preset

    rows = []
    for name, values in memory_rows(TABLE_CONTEXTS).items():
        s = preset(name)
        rows.append([e(name), f"{s.layers}", f"{s.q_heads} / {s.kv_heads}", f"{s.head_dim}",
                     f"{memory.bytes_per_token(s):,}"] + [_bytes_cell(v) for v in values])
    parts.append(_table(["model", "layers", "q / kv heads", "head_dim", "bytes per token"]
                        + [f"{n:,} tokens" for n in TABLE_CONTEXTS], rows))
    t = tinyllama_row()
    parts.append("<h3>Seed 003's TinyLlama row (fp32, 2048 tokens, batch 1)</h3>")
    parts.append(_table(["", "configuration", "bytes"], [
        ["seed 003 claimed", e(t["claimed_config"]),
         f"{e(t['claimed_text'])} (= {_bytes_cell(t['claimed_bytes'])} for that wrong configuration)"],
        ["correct (published config.json)", e(t["config"]), _bytes_cell(t["correct_bytes"])],
        ["seed 003's formula (query heads) on the real config", e(t["config"]), _bytes_cell(t["query_heads_bytes"])],
    ]))

    parts.append("<h2>Work counts (seed 002)</h2>")
    parts.append(_table(["", "token-computations", "q·k dot products (all layers and heads)"], [
        ["no cache", f"{counts['tokens_recompute']:,}", f"{counts['dots_recompute']:,}"],
        ["cache", f"{counts['tokens_cached']:,}", f"{counts['dots_cached']:,}"],
        ["ratio", f"{counts['tokens_recompute'] / counts['tokens_cached']:.1f}x",
         f"{counts['dots_recompute'] / counts['dots_cached']:.1f}x"],
        ["seed 002 claimed", f"{counts['new_tokens'] * (counts['new_tokens'] + 1) // 2:,} vs 150, 33x", ""],
    ]))
    parts.append(f"<p>P = {counts['prompt_len']} prompt tokens, N = {counts['new_tokens']} new tokens, recorded by "
                 f"<code>kvref.toy.ToyModel.generate</code> and equal to <code>kvref.toy.token_computations</code> / "
                 f"<code>attention_dot_products</code>. Both paths generated the same tokens: "
                 f"{counts['same_tokens']}.</p>")

    parts.append(f"<h2>Decode timings</h2><p>Toy model, backend {e(timings['backend'])!s}, {timings['threads']} Numba "
                 f"thread(s), min of up to {timings['reps']} repeats.</p>")
    parts.append(_table(["context n", "cached ms/token", "no-cache ms/token", "ratio"], [
        [f"{n + 1}", f"{c * 1e3:.3f}", f"{r * 1e3:.3f}", f"{r / c:.1f}x"]
        for n, c, r in zip(timings["contexts"], timings["cached_s"], timings["recompute_s"])]))

    parts.append("<h2>Machine</h2>")
    parts.append(_table(["", ""], [[e(k), e(str(v))] for k, v in machine_info()]))
    parts.append("<h2>Run log</h2><pre>" + e("\n".join(timings_log)) + "</pre></body></html>")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


def main(argv=None):
    """Run the whole pipeline; returns the exit status (0 = ok, 1 = a backend failed its check)."""
    args = parse_args(argv)
    start = time.perf_counter()
    log = []

    def progress(message):
        line = f"[{time.perf_counter() - start:6.1f} s] {message}"
        log.append(line)
        print(line, flush=True)

    out_dir = str(args.out)
    os.makedirs(out_dir, exist_ok=True)
    progress("checking backends against the float64 reference (compiles the CPU kernels) ...")
    t = time.perf_counter()
    checks = check_backends()
    for r in checks:
        if r["ok"] is None:
            progress(f"  {r['backend']:>6} {r['variant']:<8} {r['dtype']:<7}  skipped: {r['reason']}")
        else:
            progress(f"  {r['backend']:>6} {r['variant']:<8} {r['dtype']:<7}  max |error| {r['max_error']:.2e}  "
                     f"(tolerance {r['tolerance']:.0e})  {'ok' if r['ok'] else 'FAIL'}  {r['seconds']:.1f} s")
    failed = [r for r in checks if r["ok"] is False]
    if failed:
        names = ", ".join(f"{r['backend']}/{r['variant']}/{r['dtype']}" for r in failed)
        print(f"ABORT: backend check failed for {names}; nothing was timed or written.", file=sys.stderr)
        return 1
    progress(f"backend check done in {time.perf_counter() - t:.1f} s")

    contexts, reps = QUICK_TIMING if args.quick else FULL_TIMING
    built = {}

    def figure(name, build):
        t0 = time.perf_counter()
        fig = build()
        save(fig, name, out_dir)
        built[name] = time.perf_counter() - t0
        progress(f"figure {name:<18} {built[name]:5.1f} s  -> {os.path.join(out_dir, name)}.png/.svg")

    figure("memory", memory_figure)
    state = {}

    def build_cost():
        state["counts"] = generation_counts(50, 100)
        state["timings"] = measure_decode_times(contexts, reps=reps, backend="cpu")
        return cost_figure(state["counts"], state["timings"])

    figure("cost", build_cost)
    figure("flat_timeline", flat_timeline_figure)
    figure("layouts", layouts_figure)
    figure("ring_timeline", ring_timeline_figure)
    figure("ring_memory", ring_memory_figure)
    figure("window_conventions", window_conventions_figure)
    figure("chunked_prefill", chunked_prefill_figure)
    figure("quant_blocks", quant_blocks_figure)

    def build_quant_error():
        state["quant_rows"] = quant_error_rows()
        return quant_error_figure(state["quant_rows"])

    figure("quant_error", build_quant_error)
    figure("two_tier_timeline", two_tier_timeline_figure)
    figure("two_tier_memory", two_tier_memory_figure)
    figure("two_tier_error", two_tier_error_figure)
    figure("pooled_tables", pooled_tables_figure)
    figure("pooled_memory", pooled_memory_figure)
    assert tuple(built) == FIGURE_NAMES

    total = time.perf_counter() - start
    path = write_index(out_dir, checks, state["timings"], state["counts"], log, total, args.quick,
                       state["quant_rows"])
    progress(f"wrote {path}")
    print(f"total {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
