"""Figures of ggml's quantized blocks (``kvref/quant.py``): one q8_0 and one q4_0 block byte by byte
(:func:`quant_blocks_figure`) and the error of every format against bits per element, per block and in llama.cpp's
own metric (:func:`quant_error_figure`, from :func:`quant_error_rows`)."""

import numpy as np
from matplotlib.figure import Figure

from .. import quant
from ..check import round_trip
from .style import QUANT_COLORS

#: llama.cpp ``tests/test-quantize-fns.cpp``: MAX_QUANTIZATION_TOTAL_ERROR, the bound for q8_0, q4_0, q4_1, q5_0,
#: q5_1 (and f16) on its test data, in its own metric (:func:`llama_cpp_rmse`)
LLAMA_CPP_TOTAL_ERROR = 0.002

#: the "total error" that ``test-quantize-fns -v`` printed for llama.cpp c392e509 built for the CPU (AVX2)
#: (``shared/reference/quant_and_ring_facts.md`` §4); f16 is the format of kvref's tail
LLAMA_CPP_MEASURED = {"f16": 0.000004, "q8_0": 0.000074, "q4_0": 0.001121, "q4_1": 0.001144, "q5_0": 0.000591,
                      "q5_1": 0.000556}

#: the largest error of one element, as a fraction of its block's statistic, without the fp16 rounding of d (and m):
#: format -> (statistic, bound). Symmetric formats map the signed extreme M to the lowest code exactly, but a value
#: of the other sign and the same magnitude reaches only the highest code: the clamp costs one step d = amax/8
#: (q4_0) or amax/16 (q5_0), more than the rounding's d/2. q8_0 (d = amax/127, codes -127..127) only rounds: amax/254.
#: The affine formats round to a step of range/15 or range/31. fp16 rounds to 11 significant bits.
QUANT_BOUNDS = {"f16": ("amax", 1 / 2048), "q8_0": ("amax", 1 / 254), "q4_0": ("amax", 1 / 8),
                "q4_1": ("range", 1 / 30), "q5_0": ("amax", 1 / 16), "q5_1": ("range", 1 / 62)}


def format_bits(fmt):
    """Bits per element of a store format, or 16 for "f16" (the tail)."""
    return 16.0 if fmt == "f16" else quant.FORMATS[fmt][2]


def llama_cpp_test_data(n=4096, offset=0.0):
    """The data of llama.cpp's ``test-quantize-fns``: ``x[i] = 0.1 + 2*cosf(i + offset)`` as float32 (its
    ``generate_data``: the cosine in float32, the sum with the double 0.1 in double, stored as float)."""
    c = np.cos(np.arange(n, dtype=np.float32) + np.float32(offset))
    return (0.1 + 2.0 * c.astype(np.float64)).astype(np.float32)


def llama_cpp_rmse(a, b):
    """llama.cpp's ``array_rmse`` as it is: ``sqrtf(sum (a - b)^2) / n``. That is the true RMSE divided by sqrt(n),
    not the RMSE: at n = 4096 it is 64 times smaller, so its 0.002 threshold means a true RMSE below 0.128."""
    e = np.asarray(a, np.float64).ravel() - np.asarray(b, np.float64).ravel()
    return float(np.float32(np.sqrt(np.sum(e * e)))) / e.size


#: the formats of the quantization table and figure, in llama.cpp's test order: f16 (the tail), then the stores
TABLE_FORMATS = ("f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def quant_error_rows(formats=TABLE_FORMATS, n=4096, normal_n=32768, backend="python", seed=0):
    """The error of each format on llama.cpp's test data (:func:`llama_cpp_test_data`, n values) and on
    ``normal_n`` N(0, 1) values, through :func:`round_trip` (kvref.quant.quantize / dequantize on ``backend``; every
    backend gives the same bytes, and the python spec needs no compiling).

    Returns one dict per format: format, bits (per element), bytes_per_block (32 elements), cos_rmse, cos_max,
    normal_rmse, normal_max (true RMSE and max |error|), block_stat and bound (:data:`QUANT_BOUNDS`), worst_block
    (the largest max |error| of a block divided by its amax or range, both data sets), llama_cpp_metric
    (:func:`llama_cpp_rmse` on the test data), llama_cpp_threshold (0.002), llama_cpp_passes (metric < threshold,
    as the test checks) and llama_cpp_measured (:data:`LLAMA_CPP_MEASURED`).
    """
    cos = llama_cpp_test_data(n)
    normal = np.random.default_rng(seed).standard_normal(normal_n).astype(np.float32)
    rows = []
    for fmt in formats:
        stat, bound = QUANT_BOUNDS[fmt]
        row = {"format": fmt, "bits": format_bits(fmt),
               "bytes_per_block": 64 if fmt == "f16" else quant.FORMATS[fmt][1], "block_stat": stat, "bound": bound}
        worst = 0.0
        for name, x in (("cos", cos), ("normal", normal)):
            y = round_trip(x, fmt, backend)
            e = np.abs(y.astype(np.float64) - x)
            row[f"{name}_rmse"] = float(np.sqrt(np.mean(e * e)))
            row[f"{name}_max"] = float(e.max())
            blocks = x.reshape(-1, quant.BLOCK).astype(np.float64)
            size = (np.abs(blocks).max(axis=1) if stat == "amax" else blocks.max(axis=1) - blocks.min(axis=1))
            worst = max(worst, float(np.max(e.reshape(-1, quant.BLOCK).max(axis=1) / size)))
            if name == "cos":
                row["llama_cpp_metric"] = llama_cpp_rmse(x, y)
        row["worst_block"] = worst
        row["llama_cpp_threshold"] = LLAMA_CPP_TOTAL_ERROR
        row["llama_cpp_passes"] = row["llama_cpp_metric"] < LLAMA_CPP_TOTAL_ERROR
        row["llama_cpp_measured"] = LLAMA_CPP_MEASURED.get(fmt)
        rows.append(row)
    return rows


def quant_error_figure(rows=None, n=4096):
    """Three panels from :func:`quant_error_rows`: (a) true RMSE and max |error| vs bits per element (each bit
    halves the error); (b) the worst error in a block as a fraction of its amax or range, against the bound of each
    format; (c) llama.cpp's ``array_rmse`` (= true RMSE / sqrt(n)) against its threshold 0.002, next to what
    llama.cpp itself printed."""
    rows = rows or quant_error_rows(n=n)
    fig = Figure(figsize=(16, 5.4), layout="constrained")
    ax_bits, ax_block, ax_llama = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.25, 1, 1]})
    names = [r["format"] for r in rows]
    colors = [QUANT_COLORS.get(f, "#333333") for f in names]

    # (a) error vs bits (the store formats; fp16, the tail's format, as lines)
    stores = sorted((r for r in rows if r["format"] != "f16"), key=lambda r: r["bits"])
    for key, marker, label in (("cos_rmse", "o", "RMSE, llama.cpp data 0.1 + 2 cos(i)"),
                               ("normal_rmse", "s", "RMSE, N(0, 1)"),
                               ("cos_max", "^", "max |error|, llama.cpp data"),
                               ("normal_max", "v", "max |error|, N(0, 1)")):
        filled = key.startswith("cos")
        ax_bits.plot([r["bits"] for r in stores], [r[key] for r in stores], ls=":", color="#999999", lw=0.8)
        for r in stores:
            c = QUANT_COLORS.get(r["format"], "#333333")
            ax_bits.plot(r["bits"], r[key], marker, color=c, mfc=c if filled else "white", ms=7, ls="none")
        ax_bits.plot([], [], marker, color="#555555", mfc="#555555" if filled else "white", ls="none", label=label)
    if stores:
        q8 = next((r for r in stores if r["format"] == "q8_0"), stores[-1])
        bits = np.linspace(4.2, 9, 30)
        ax_bits.plot(bits, q8["normal_rmse"] * 2.0 ** (q8["bits"] - bits), "--", color="#bbbbbb", lw=1,
                     label="x 1/2 per extra bit")
        ax_bits.set_xticks([r["bits"] for r in stores], [f"{r['bits']:g}\n{r['format']}" for r in stores])
        for label, r in zip(ax_bits.get_xticklabels(), stores):
            label.set_color(QUANT_COLORS.get(r["format"], "#333333"))
    for r in rows:
        if r["format"] == "f16":
            ax_bits.axhline(r["cos_rmse"], color=QUANT_COLORS["f16"], ls="-.", lw=1,
                            label=f"f16 (the tail, 16 bits): RMSE {r['cos_rmse']:.1e}, max {r['cos_max']:.1e}")
    ax_bits.set_xlim(4.1, 9)
    ax_bits.set_yscale("log")
    ax_bits.set_xlabel("bits per element (codes + the fp16 scale d, and m, shared by 32 elements)")
    ax_bits.set_ylabel("error of one element (data scale ~ 1)")
    ax_bits.set_title("(a) error vs bits per element (kvref.quant.quantize -> dequantize)", fontsize=10)
    ax_bits.legend(fontsize=7.5, loc="lower left")
    ax_bits.grid(alpha=0.3, which="both")

    # (b) the worst element of a block vs its bound
    x = np.arange(len(rows))
    ax_block.bar(x, [r["worst_block"] for r in rows], 0.6, color=colors, alpha=0.85, label="measured (both data sets)")
    for i, r in enumerate(rows):
        ax_block.plot([i - 0.38, i + 0.38], [r["bound"]] * 2, color="black", lw=2,
                      label="bound without the fp16 rounding of d (and m)" if i == 0 else None)
        frac = f"1/{round(1 / r['bound'])}"
        ax_block.annotate(f"{r['worst_block']:.4f}\n≤ {frac} {r['block_stat']}",
                          (i, max(r["worst_block"], r["bound"])), xytext=(0, 3), textcoords="offset points",
                          ha="center", va="bottom", fontsize=7.5)
    ax_block.set_yscale("log")
    ax_block.set_ylim(min(r["bound"] for r in rows) / 3, max(r["bound"] for r in rows) * 6)
    ax_block.set_xticks(x, names)
    ax_block.set_ylabel("max |error| in a block / the block's amax (or range)")
    ax_block.set_title("(b) the worst element of a block: q4_0's clamp costs d = amax/8\n"
                       "(the extreme maps to -8 d exactly; the other sign reaches only +7 d)", fontsize=10)
    ax_block.legend(fontsize=7.5, loc="upper left")
    ax_block.grid(alpha=0.3, axis="y", which="both")

    # (c) llama.cpp's metric, as it is
    ax_llama.bar(x, [r["llama_cpp_metric"] for r in rows], 0.6, color=colors, alpha=0.85,
                 label="kvref, in llama.cpp's metric")
    measured = [(i, r["llama_cpp_measured"]) for i, r in enumerate(rows) if r["llama_cpp_measured"] is not None]
    ax_llama.plot([i for i, _ in measured], [m for _, m in measured], "kx", ms=9, mew=2,
                  label="printed by llama.cpp's test-quantize-fns (AVX2 build)")
    ax_llama.axhline(LLAMA_CPP_TOTAL_ERROR, color="#d62728", ls="--", lw=1.2,
                     label=f"MAX_QUANTIZATION_TOTAL_ERROR = {LLAMA_CPP_TOTAL_ERROR}")
    bottom = 1e-6
    for i, r in enumerate(rows):  # the value up from the bar's foot, clear of the marker at its top; above a short bar
        tall = r["llama_cpp_metric"] > 30 * bottom
        ax_llama.annotate(f"{r['llama_cpp_metric']:.6f}", (i, bottom if tall else r["llama_cpp_metric"]),
                          xytext=(0, 3 if tall else 8), textcoords="offset points", ha="center", va="bottom",
                          fontsize=7, rotation=90, color="white" if tall else "black")
    ax_llama.set_yscale("log")
    ax_llama.set_ylim(bottom, 0.05)
    ax_llama.set_xticks(x, names)
    ax_llama.set_ylabel("array_rmse = sqrt(sum e²) / n")
    root = np.sqrt(n)
    right = ax_llama.secondary_yaxis("right", functions=(lambda v: v * root, lambda v: v / root))
    right.set_ylabel(f"true RMSE = array_rmse · sqrt(n) = · {root:g}")
    ax_llama.set_title(f"(c) llama.cpp's metric as it is (n = {n}): it divides by n, not sqrt(n),\nso 0.002 means a "
                       f"true RMSE below {LLAMA_CPP_TOTAL_ERROR * root:.3f}; every format passes", fontsize=10)
    ax_llama.legend(fontsize=7.5, loc="upper left")
    ax_llama.grid(alpha=0.3, axis="y", which="both")
    fig.suptitle("ggml's block formats: 32 elements share one fp16 scale; error vs bits, per block, and in "
                 "llama.cpp's own test", fontsize=12)
    return fig


def quant_block_layout(x, fmt, backend="python"):
    """One block of 32 floats in ggml format ``fmt``, byte by byte, from :func:`kvref.quant.quantize`.

    The codes are read back from the bytes here, by the rules written out in ``kvref/quant.py`` (q8_0: byte 2 + j is
    the int8 code of element j; 4/5-bit formats: byte j of qs holds element j in its low nibble and element j + 16 in
    its high nibble, bit j of the little-endian uint32 qh is the 5th bit of element j), and the values rebuilt from
    them must equal :func:`kvref.quant.dequantize` (else AssertionError).

    Returns a dict: format, x (32 float32), bytes (list of ints), d and m (the stored fp16 scale and minimum as
    floats; m None for the symmetric formats), d_bits (fp16 bit pattern), codes (the integer q_j of each element),
    zero (the code of 0.0: 8, 16 or 0), dequantized (32 floats), and fields: one (first byte, n bytes, name) per
    field (d, m, qh, qs).
    """
    x = np.ascontiguousarray(np.asarray(x, np.float32).reshape(quant.BLOCK))
    fid = quant.format_id(fmt)
    raw = quant.quantize(x, fmt, backend=backend)
    data = raw.tolist()
    m_at, qh_at, qs_at, block_bytes = quant.layout(fid)
    d_bits = data[0] | data[1] << 8
    d = float(np.array([d_bits], np.uint16).view(np.float16)[0])
    m = None
    if m_at >= 0:
        m = float(np.array([data[m_at] | data[m_at + 1] << 8], np.uint16).view(np.float16)[0])
    qs = data[qs_at:block_bytes]
    if fmt == "q8_0":
        codes = [b - 256 if b >= 128 else b for b in qs]
        zero = 0
    else:
        qh = sum(data[qh_at + k] << (8 * k) for k in range(4)) if qh_at >= 0 else 0
        codes = [0] * quant.BLOCK
        for j in range(quant.BLOCK // 2):
            codes[j] = (qs[j] & 0x0F) | (((qh >> j) & 1) << 4)
            codes[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)
        zero = {"q4_0": 8, "q5_0": 16}.get(fmt, 0)
    rebuilt = np.float32(d) * (np.array(codes, np.float32) - np.float32(zero))
    if m is not None:
        rebuilt = rebuilt + np.float32(m)
    dequantized = quant.dequantize(raw, fmt, x.shape, backend=backend)
    if not np.array_equal(rebuilt, dequantized):
        raise AssertionError(f"the {fmt} bytes read here disagree with kvref.quant.dequantize")
    fields = [(0, 2, "d")]
    if m_at >= 0:
        fields.append((m_at, 2, "m"))
    if qh_at >= 0:
        fields.append((qh_at, 4, "qh"))
    fields.append((qs_at, block_bytes - qs_at, "qs"))
    return {"format": fmt, "x": x, "bytes": data, "d": d, "d_bits": d_bits, "m": m, "codes": codes, "zero": zero,
            "dequantized": dequantized, "fields": fields}


def quant_blocks_figure(x=None, formats=("q8_0", "q4_0"), seed=3):
    """For each format (:func:`quant_block_layout`): the 32 values of one block and their dequantized values (top),
    and the block's bytes in memory order, each labelled with the element(s) it stores (bottom; one byte per unit
    of width, so the sizes compare: 34 bytes for q8_0, 18 for q4_0, against 64 in fp16). ``x`` defaults to 32
    N(0, 1) values."""
    from matplotlib.patches import Rectangle

    if x is None:
        x = np.random.default_rng(seed).standard_normal(quant.BLOCK).astype(np.float32)
    layouts = [quant_block_layout(x, fmt) for fmt in formats]
    width = max(len(b["bytes"]) for b in layouts)
    fig = Figure(figsize=(16, 4.2 * len(layouts)), layout="constrained")
    grid = fig.add_gridspec(2 * len(layouts), 1, height_ratios=[1.6, 0.75] * len(layouts))
    lo_color, hi_color = "#6baed6", "#fd8d3c"
    for row, b in enumerate(layouts):
        fmt = b["format"]
        nibbles = fmt != "q8_0"
        ax = fig.add_subplot(grid[2 * row])
        j = np.arange(quant.BLOCK)
        colors = [lo_color if (not nibbles or k < 16) else hi_color for k in j]
        ax.bar(j, b["x"], 0.7, color=colors, alpha=0.55, label="x_j (float32)")
        ax.plot(j, b["dequantized"], "k_", ms=14, mew=2, label="dequantized x~_j")
        for k in j:
            ax.annotate(str(b["codes"][k]), (k, b["x"][k]), xytext=(0, 3 if b["x"][k] >= 0 else -3),
                        textcoords="offset points", ha="center", va="bottom" if b["x"][k] >= 0 else "top",
                        fontsize=7)
        ax.axhline(0, color="#999999", lw=0.6)
        ax.set_xticks(j, [f"{k}" for k in j], fontsize=7)
        ax.set_xlim(-0.7, quant.BLOCK - 0.3)
        span = float(np.abs(b["x"]).max())
        ax.set_ylim(-span * 1.35, span * 1.35)
        ax.set_xlabel("element j (number above a bar: its stored code q_j)", fontsize=8)
        err = float(np.abs(b["dequantized"] - b["x"]).max())
        if fmt == "q8_0":
            rule = f"d = amax/127 = {b['x'][np.argmax(np.abs(b['x']))]:.4f}/127 -> fp16 {b['d']:.6g};  " \
                   "q_j = roundf(x_j / d);  x~_j = d·q_j"
        elif fmt in ("q4_0", "q5_0"):
            half = b["zero"]
            rule = f"d = M/-{half} with M the signed extreme -> fp16 {b['d']:.6g};  q_j = min({2 * half - 1}, " \
                   f"trunc(x_j/d + {half}.5));  x~_j = d·(q_j - {half})"
        else:
            rule = f"d = range/{15 if fmt == 'q4_1' else 31} -> fp16 {b['d']:.6g}, m = min -> fp16 {b['m']:.6g};  " \
                   "x~_j = d·q_j + m"
        ax.set_title(f"{fmt}: {rule};  max |x - x~| = {err:.4f}", fontsize=10)
        if nibbles:
            from matplotlib.patches import Patch

            handles, labels = ax.get_legend_handles_labels()
            ax.legend(handles=[Patch(color=lo_color, alpha=0.55, label="x_j, j = 0-15: low nibbles of qs[0..15]"),
                               Patch(color=hi_color, alpha=0.55, label="x_j, j = 16-31: high nibbles of qs[0..15]")]
                      + [h for h, label in zip(handles, labels) if label.startswith("dequantized")],
                      fontsize=7.5, loc="upper right", ncol=3)
        else:
            ax.legend(fontsize=7.5, loc="upper right", ncol=2)

        ax = fig.add_subplot(grid[2 * row + 1])
        field_colors = {"d": "#bdbdbd", "m": "#d9d9d9", "qh": "#c7e9c0", "qs": "white"}
        for first, count, name in b["fields"]:
            for k in range(first, first + count):
                value = b["bytes"][k]
                if name == "d":
                    text = f"d {'lo' if k == first else 'hi'}\n0x{value:02x}"
                elif name == "m":
                    text = f"m {'lo' if k == first else 'hi'}\n0x{value:02x}"
                elif name == "qh":
                    text = f"qh[{k - first}]\n0x{value:02x}\nbits {8 * (k - first)}-{8 * (k - first) + 7}"
                elif not nibbles:
                    q = k - first
                    text = f"0x{value:02x}\nx{q}\n{b['codes'][q]:+d}"
                else:
                    q = k - first
                    text = f"0x{value:02x}\nlo x{q}={value & 15}\nhi x{q + 16}={value >> 4}"
                face = field_colors[name]
                ax.add_patch(Rectangle((k, 0), 1, 1, facecolor=face, edgecolor="#555555", lw=0.8))
                if name == "qs" and nibbles:  # low nibble (listed first) on top
                    ax.add_patch(Rectangle((k, 0.5), 1, 0.5, facecolor=lo_color, alpha=0.35, lw=0))
                    ax.add_patch(Rectangle((k, 0), 1, 0.5, facecolor=hi_color, alpha=0.35, lw=0))
                ax.text(k + 0.5, 0.5, text, ha="center", va="center", fontsize=6.3 if nibbles else 6.6)
        ax.set_xlim(0, width)
        ax.set_ylim(-0.05, 1.05)
        ax.set_yticks([])
        ax.set_xticks(np.arange(0, len(b["bytes"]) + 1, 2))
        ax.tick_params(labelsize=7)
        bits = 8 * len(b["bytes"]) / quant.BLOCK
        ax.set_xlabel(f"byte offset in the block: {len(b['bytes'])} bytes for 32 elements = {bits:g} bits per "
                      f"element (fp16: 64 bytes; fields: " + ", ".join(f"{name} at byte {first}"
                                                                       for first, _, name in b["fields"]) + ")",
                      fontsize=8)
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.suptitle("One block of 32 values in ggml's formats, byte by byte (kvref.quant.quantize, byte-identical to "
                 "ggml's reference quantizers)", fontsize=12)
    return fig

