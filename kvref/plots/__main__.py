"""python -m kvref.plots [--quick] [--out DIR] [--jobs N]: check every backend, then write every figure and
DIR/index.html.

1. Backend check. Every available backend (python, cpu, and cuda where kvref.backends() says it runs) runs a small
   scripted workload of the flat, ring, two-tier and pooled caches, and every layer's attention of every step is
   compared with the float64 reference of kvref.check. If any error exceeds its tolerance, the run stops with exit
   status 1 before anything is timed or written. A backend that cannot run here is reported on one line.
2. Timing. The toy model's decode step is timed with and without a cache, alone on the machine.
3. Figures. Every figure of kvref.plots is built and written as PNG and SVG (--quick: PNG only, smaller data).
4. DIR/index.html shows the figures by topic, the memory and quantization tables, the backend check, the timings
   and the machine.

Work runs in N worker processes (default: the usable cores, at most 4; --jobs 1 runs it all in this process).
Compiled CPU code is cached on disk (kvref.cpu), so only a first run compiles.
"""

import argparse
import html
import os
import platform
import sys
import time

from tqdm import tqdm

from .. import memory
from . import (FIGURE_CAPTIONS, FIGURE_GROUPS, FIGURE_NAMES, LLAMA_CPP_TOTAL_ERROR, check_backends, format_bytes,
               measure_decode_times, memory_rows, tinyllama_row)
from .jobs import CHECK_UNITS, DTYPES, FIGURE_ORDER, Pool, check_unit, figure_unit

TABLE_CONTEXTS = (2048, 4096, 8192, 32768)

#: the two-tier memory table: contexts (= max_tokens M), tail R and migration batch B, store formats
TWO_TIER_TABLE = ((8192, 32768), 256, 64, ("q8_0", "q4_0"))

#: decode-timing settings: (contexts, repetitions)
QUICK_TIMING = ((16, 32, 64, 128, 256), 2)
FULL_TIMING = ((16, 32, 64, 128, 256, 512, 1024, 2048), 5)

BACKENDS = ("python", "cpu", "cuda")
VARIANTS = ("flat", "ring", "two_tier", "pooled")

#: what the seed documents are (index.html)
SEEDS_NOTE = (
    "<p><b>Seeds 000-004.</b> kvref was started from five <i>seed documents</i>, each describing a KV cache that "
    "somebody built or planned in another language: 000, a plan to fix a GPU ring-buffer cache (Rust host, Metal "
    "kernel); 001, the docs of a CUDA C++ flat cache; 002, notes on prefill and decode phases with tensor "
    "parallelism; 003, a Zig flat cache with a batch and a memory table; 004, the Rust source of a two-tier "
    "(fp16 tail + quantized store) and a pooled block cache. Together they name the four variants kvref implements, "
    "and they contain real defects: layers that all write layer 0, caches sized by query heads instead of KV heads, "
    "an overflow check after the increment, a wrong TinyLlama row, a miscounted speed-up, simulated quantization, "
    "eviction that drifts or evicts too much, attention without GQA. Each defect is a regression test named after "
    "its seed (<code>tests/test_seeds.py</code>, e.g. <code>test_seed001_overflow_checked_before_any_change</code>), "
    "and where a figure or notebook says \"seed 00N\" it shows that defect next to kvref's behaviour.</p>")


#: where a kernel author goes next (index.html)
GOLDEN_NOTE = (
    "<p><b>Check your own kernel or cache against kvref.</b> The same spec that draws these figures writes the "
    "golden suite <code>golden/v1/</code> (safetensors + <code>manifest.json</code>: cache management of every "
    "variant step by step, dense and paged attention, ggml quantization), readable from any language. Run "
    "<code>python -m kvref.golden check golden/v1 --impl your_module:YourImpl</code>: see the README section "
    "<a href='../README.md#check-your-kernel-against-kvref'>Check your kernel against kvref</a> and the format in "
    "<a href='../docs/golden-format.md'>docs/golden-format.md</a>.</p>")


def parse_args(argv):
    """The command line (plain-text help: python -m kvref.plots --help)."""
    parser = argparse.ArgumentParser(prog="python -m kvref.plots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="figures", metavar="DIR", help="output directory (default: figures)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: short timing sweep, smaller data, PNG only (well under a minute)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="worker processes (default: the usable cores, at most 4; 1: all in this process)")
    return parser.parse_args(argv)


def usable_cores():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


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
    usable = usable_cores()
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


def write_index(out_dir, checks, timings, counts, timings_log, total_s, quick, quant_rows=None,
                formats=("png", "svg")):
    """Write ``out_dir/index.html`` (figures shown as SVG, or PNG when no SVG was written); returns its path."""
    e = html.escape
    image = "svg" if "svg" in formats else "png"
    sections = [("backend-check", "Backend check"), ("quant-table", "Quantization error table"),
                ("two-tier-table", "Two-tier memory table"), ("memory-table", "Memory table"),
                ("work-counts", "Work counts (seed 002)"), ("timings", "Decode timings"), ("machine", "Machine"),
                ("log", "Run log")]
    toc = [f"<li><a href='#topic-{key}'>{e(title)}</a>: " + ", ".join(f"<a href='#{n}'>{n}</a>" for n in names)
           + "</li>" for title, key, names in FIGURE_GROUPS]
    toc.append("<li>" + " · ".join(f"<a href='#{anchor}'>{title}</a>" for anchor, title in sections
                                   if quant_rows or anchor not in ("quant-table", "two-tier-table")) + "</li>")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>kvref figures</title><style>"
        "body{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%;"
        "border:1px solid #eee}.fail{color:#c00;font-weight:bold}.ok{color:#080}</style></head><body>",
        "<h1>kvref: figures of the flat, ring, two-tier and pooled caches</h1>",
        f"<p>Written by <code>python -m kvref.plots{' --quick' if quick else ''}</code> in {total_s:.1f} s"
        f"{' (a smoke run: smaller data, a short timing sweep, PNG only)' if quick else ''}. Every figure is built "
        "by a function of <code>kvref.plots</code> (one module per cache variant), the same one the notebooks "
        "call.</p>",
        SEEDS_NOTE,
        GOLDEN_NOTE,
        "<h2>Contents</h2><ul>" + "".join(toc) + "</ul>",
    ]

    for title, key, names in FIGURE_GROUPS:
        parts.append(f"<h2 id='topic-{key}'>{e(title)} <small>(<code>kvref/plots/{key}.py</code>)</small></h2>")
        for name in names:
            links = " · ".join(f"<a href='{name}.{ext}'>{name}.{ext}</a>" for ext in formats)
            parts.append(f"<h3 id='{name}'>{e(name)}</h3><p>{e(FIGURE_CAPTIONS[name])} {links}</p>"
                         f"<img src='{name}.{image}' alt='{e(name)}'>")

    parts.append("<h2 id='backend-check'>Backend check</h2><p>Attention of every backend against the float64 "
                 "reference of <code>kvref.check</code> (gather, "
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
    rows, skipped = [], set()
    for r in checks:
        if r["ok"] is None:  # a backend that cannot run here: one row
            if r["backend"] not in skipped:
                skipped.add(r["backend"])
                rows.append([e(r["backend"]), "all", "all", "-", f"{r['tolerance']:.0e}", "skipped", "-",
                             e(r["reason"])])
            continue
        status = "<span class='ok'>ok</span>" if r["ok"] else "<span class='fail'>FAIL</span>"
        rows.append([e(r["backend"]), e(r["variant"]), e(r["dtype"]), f"{r['max_error']:.2e}",
                     f"{r['tolerance']:.0e}", status, f"{r['seconds']:.2f}", e(r["reason"])])
    parts.append(_table(["backend", "cache", "dtype", "max |error|", "tolerance", "result",
                         "seconds (compile included)",
                         "note"], rows))

    if quant_rows:
        parts.append("<h2 id='quant-table'>Quantization error of ggml's formats</h2><p>"
                     "<code>kvref.plots.quant_error_rows</code>: "
                     "quantize and dequantize with <code>kvref.quant</code> (f16: NumPy's float16, the tail). "
                     "llama.cpp data: <code>x[i] = 0.1 + 2 cos(i)</code>, n = 4096, from llama.cpp's "
                     "<code>tests/test-quantize-fns.cpp</code>, whose <code>array_rmse</code> is "
                     "<code>sqrt(sum e²) / n</code> = true RMSE / sqrt(n) = RMSE / 64: its threshold "
                     f"{LLAMA_CPP_TOTAL_ERROR} means a true RMSE below {LLAMA_CPP_TOTAL_ERROR * 64:.3f}. The printed "
                     "column is what llama.cpp c392e509 (AVX2 build) printed with <code>-v</code>. The block bound "
                     "leaves out the fp16 rounding of d (and m).</p>")
        parts.append(quant_table(quant_rows))
        contexts, tail, batch_size, _ = TWO_TIER_TABLE
        parts.append(f"<h2 id='two-tier-table'>Two-tier memory table</h2><p><code>kvref.memory.two_tier_bytes</code>: "
                     "allocated K/V "
                     f"bytes, batch 1, an fp16 tail of R = {tail} slots and a store of S = M - R + B - 1 slots "
                     f"(B = {batch_size}) of ggml blocks, against a FlatCache of M fp16 slots.</p>")
        parts.append(two_tier_memory_table())

    parts.append("<h2 id='memory-table'>Memory table</h2><p><code>kvref.memory.memory_table</code>: K and V, every "
                 "layer, batch 1, "
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

    parts.append("<h2 id='work-counts'>Work counts (seed 002)</h2>")
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

    parts.append(f"<h2 id='timings'>Decode timings</h2><p>Toy model, backend {e(timings['backend'])!s}, "
                 f"{timings['threads']} Numba "
                 f"thread(s), min of up to {timings['reps']} repeats.</p>")
    parts.append(_table(["context n", "cached ms/token", "no-cache ms/token", "ratio"], [
        [f"{n + 1}", f"{c * 1e3:.3f}", f"{r * 1e3:.3f}", f"{r / c:.1f}x"]
        for n, c, r in zip(timings["contexts"], timings["cached_s"], timings["recompute_s"])]))

    parts.append("<h2 id='machine'>Machine</h2>")
    parts.append(_table(["", ""], [[e(k), e(str(v))] for k, v in machine_info()]))
    parts.append("<h2 id='log'>Run log</h2><pre>" + e("\n".join(timings_log)) + "</pre></body></html>")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path




def run_check(pool, say):
    """The backend check with one progress bar; returns the rows in check_backends' order (backend, variant,
    dtype). A backend that cannot run here costs nothing and is reported on one line."""
    from ..backends import backends

    status = backends()
    units = [unit for unit in CHECK_UNITS if status[unit[0]][0]]
    rows = [r for b in BACKENDS if not status[b][0] for r in check_backends(names=[b])]
    total = sum(len(dtypes) for _, _, dtypes in units)
    with tqdm(total=total, desc="backend check", unit="row", leave=False, file=sys.stderr) as bar:
        for unit_rows in pool.run(check_unit, units):
            rows += unit_rows
            bar.set_postfix_str(f"{unit_rows[0]['backend']} {unit_rows[0]['variant']}")
            bar.update(len(unit_rows))
    order = [(b, v, d) for b in BACKENDS for v in VARIANTS for d in DTYPES]
    rows.sort(key=lambda r: order.index((r["backend"], r["variant"], r["dtype"])))
    for name in BACKENDS:
        mine = [r for r in rows if r["backend"] == name]
        if not mine[0]["available"]:
            say(f"  {name:>6}  skipped: {mine[0]['reason']}")
            continue
        bad = [r for r in mine if not r["ok"]]
        say(f"  {name:>6}  {len(mine) - len(bad)}/{len(mine)} ok, max |error| "
            f"{max(r['max_error'] for r in mine):.1e} (tolerance {mine[0]['tolerance']:.0e}), "
            f"{sum(r['seconds'] for r in mine):.1f} s" + "".join(
                f"\n          FAIL {r['variant']} {r['dtype']}: max |error| {r['max_error']:.2e}" for r in bad))
    return rows


def main(argv=None):
    """Run the whole pipeline; returns the exit status (0 = ok, 1 = a backend failed its check)."""
    args = parse_args(argv)
    start = time.perf_counter()
    log = []

    def say(message):
        line = f"[{time.perf_counter() - start:6.1f} s] {message}"
        log.append(line)
        tqdm.write(line, file=sys.stderr)

    out_dir = str(args.out)
    jobs = args.jobs or max(1, min(4, usable_cores()))
    formats = ("png",) if args.quick else ("png", "svg")
    pool = Pool(jobs)
    try:
        say(f"1/3 backend check against the float64 reference ({jobs} process{'es' if jobs > 1 else ''}; "
            "a first run compiles the CPU kernels)")
        checks = run_check(pool, say)
        failed = [r for r in checks if r["ok"] is False]
        if failed:
            names = ", ".join(f"{r['backend']}/{r['variant']}/{r['dtype']}" for r in failed)
            print(f"ABORT: backend check failed for {names}; nothing was timed or written.", file=sys.stderr)
            return 1

        contexts, reps = QUICK_TIMING if args.quick else FULL_TIMING
        say(f"2/3 timing the toy model's decode step with and without a cache at {len(contexts)} contexts x {reps}")
        t = time.perf_counter()
        timings = measure_decode_times(contexts, reps=reps, backend="cpu")
        say(f"  done in {time.perf_counter() - t:.1f} s")

        say(f"3/3 {len(FIGURE_NAMES)} figures ({' + '.join(f.upper() for f in formats)}) -> {out_dir}")
        os.makedirs(out_dir, exist_ok=True)
        built, extras = {}, {}
        calls = [(name, out_dir, args.quick, formats, {"timings": timings} if name == "cost" else None)
                 for name in FIGURE_ORDER]
        with tqdm(total=len(calls), desc="figures", unit="fig", leave=False, file=sys.stderr) as bar:
            for name, seconds, extra in pool.run(figure_unit, calls):
                built[name], extras[name] = seconds, extra
                bar.set_postfix_str(name)
                bar.update(1)
        say("  " + ", ".join(f"{name} {built[name]:.1f} s" for name in FIGURE_NAMES))
    finally:
        pool.close()

    path = write_index(out_dir, checks, timings, extras["cost"], log, time.perf_counter() - start,
                       args.quick, extras["quant_error"], formats)
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
