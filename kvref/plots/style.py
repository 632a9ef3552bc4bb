"""What every figure module of :mod:`kvref.plots` shares: writing a figure (:func:`save`), byte counts in binary
units (:func:`format_bytes`, :func:`short_bytes`, :func:`bytes_axis`), context labels, and the colours that mean the
same thing in every figure (the cached path or kvref's choice in blue, the no-cache path or a defect in red, a
seed's claim in grey, one colour per model preset and per ggml format, one per tier of the two-tier cache)."""

import os

from .. import memory

MODEL_COLORS = {
    "gpt2": "#7f7f7f", "tinyllama-1.1b": "#17becf", "llama-2-7b": "#1f77b4", "llama-3-8b": "#d62728",
    "mistral-7b": "#ff7f0e", "phi-2": "#9467bd", "phi-4": "#2ca02c",
}
CACHED_COLOR = "#1f77b4"
RECOMPUTE_COLOR = "#d62728"
SEED_COLOR = "#7f7f7f"

QUANT_COLORS = {"f16": "#7f7f7f", "q8_0": "#1f77b4", "q5_1": "#9467bd", "q5_0": "#17becf", "q4_1": "#bcbd22",
                "q4_0": "#2ca02c"}
STORE_COLOR = "#6baed6"
TAIL_COLOR = "#fd8d3c"
EVICTED_COLOR = "#e0e0e0"


def save(fig, name, out_dir, formats=("png", "svg")):
    """Write ``fig`` as ``out_dir/name.png`` and ``out_dir/name.svg`` (or the ``formats`` given); returns the paths.

    The PNG's draw runs the figure's layout engine (constrained layout); the SVG reuses the positions it found
    instead of running it again (a third of an SVG's drawing time), and the engine is restored afterwards."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    engine = fig.get_layout_engine()
    try:
        for ext in formats:
            path = os.path.join(out_dir, f"{name}.{ext}")
            fig.savefig(path, format=ext, dpi=110 if ext == "png" else None)
            paths.append(path)
            fig.set_layout_engine("none")
    finally:
        fig.set_layout_engine(engine)
    return paths


def format_bytes(n):
    """Bytes in binary units: ``1.00 GiB`` from 1 GiB up, ``88.0 MiB`` below, ``512 B`` under 1 KiB."""
    if n >= memory.GIB:
        return f"{n / memory.GIB:.2f} GiB"
    if n >= memory.MIB:
        return f"{n / memory.MIB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


def short_bytes(n):
    """Bytes in binary units without trailing zeros: ``128 MiB``, ``1 GiB``, ``1.56 GiB``."""
    for unit, size in (("GiB", memory.GIB), ("MiB", memory.MIB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{int(n)} B"


def bytes_axis(ax, axis="y"):
    """Label an axis of byte counts with binary units."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: short_bytes(v) if v >= 1 else "0")
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(fmt)


def context_label(n):
    """A context length for an axis: ``4k`` for 4096, ``8k`` for 8192, the number itself otherwise."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


