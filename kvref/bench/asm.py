"""Was the compiled code vectorised? Counts of SIMD instructions in the hot loops of a Numba-compiled function.

LLVM vectorises kvref's attention loops only when the loop shapes suit it (trip counts, unroll sizes, aliasing), and
when it does not, the code still runs, silently and several times slower, with scalar ``vfmadd…ss`` instead of packed
``vfmadd…ps``. That fallback is the likeliest regression of the CPU backend, and no timing tells it apart from a slow
machine. :func:`asm_report` reads the assembly of every compiled specialisation of a dispatcher and says which it got.

**What is counted.** The text ``dispatcher.inspect_asm(sig)`` returns (AT&T syntax) holds the whole LLVM module of
the specialisation: the function, its CPython and cfunc wrappers, callees LLVM did not inline and, for a ``parallel``
function, the ``prange`` body (gufunc). Numba prints it without LLVM's loop comments, so :func:`find_loops` rebuilds
the loops from the code itself: basic blocks split at labels and after jumps, the control-flow graph of the local
jumps, dominators, and every edge to a dominating block is a back edge (a natural loop; irreducible cycles and
indirect jumps are not followed). The "hot" counts are those of the instructions in **innermost** loops (loops that
contain no other loop), over every function of the module; the "whole" counts cover every instruction. An innermost
loop is where a kernel spends its time if it spends it in loops at all, but not every innermost loop is hot: vector
loops come with scalar remainder loops and scalar copies taken when a run-time overlap check fails, so a vectorised
function still shows some scalar FMAs in innermost loops. The verdict therefore only says "SCALAR FALLBACK" when the
innermost loops hold scalar FMAs and *no* packed one; the counts beside it show the rest.

Code that Numba loaded from its on-disk cache cannot be inspected (Numba warns and returns a module without it). For
such a specialisation :func:`asm_report` compiles the same Python function again, uncached, with the same options and
signature, and reads that: the same LLVM on the same CPU gives the same code. The report says when it did.
"""

import re
import warnings
from dataclasses import dataclass, field

#: the register widths a packed instruction is counted under, widest first
WIDTHS = ("zmm", "ymm", "xmm")

_FMA = re.compile(r"^v?f(?:n)?m(?:add|sub|addsub|subadd)(?:132|213|231)(p|s)[sdh]$")
_MUL = re.compile(r"^v?mul(p|s)[sdh]$")
_ADD = re.compile(r"^v?(?:add|sub)(p|s)[sdh]$")
_CVTSI2SS = re.compile(r"^v?cvtsi2ss[lq]?$")
_CVTPH2PS = re.compile(r"^v?cvtph2ps$")
_REGISTER = re.compile(r"%(zmm|ymm|xmm)\d+")
_LABEL = re.compile(r"^([A-Za-z_.$][\w.$@]*):")
_TERMINATORS = ("ret", "retq", "ud2", "jmp", "jmpq")


def _blank_counts():
    return {"fma": {"zmm": 0, "ymm": 0, "xmm": 0, "scalar": 0}, "mul": {"zmm": 0, "ymm": 0, "xmm": 0, "scalar": 0},
            "add": {"zmm": 0, "ymm": 0, "xmm": 0, "scalar": 0}, "cvtph2ps": {"zmm": 0, "ymm": 0, "xmm": 0},
            "cvtsi2ss": 0}


def _width(operands):
    """The widest vector register named in an instruction's operands (zmm, ymm or xmm), or None."""
    found = set(_REGISTER.findall(operands))
    for width in WIDTHS:
        if width in found:
            return width
    return None


def count_instruction(counts, mnemonic, operands):
    """Add one instruction to ``counts`` (the dict of :func:`count_instructions`). Packed FMAs (``vfmadd…ps/pd`` and
    the sub/negated forms), multiplies (``vmulps``) and adds or subtracts (``vaddps``, ``vsubps``) go under the widest
    register they name (zmm, ymm or xmm); their scalar forms (``…ss``, ``…sd``) under "scalar". ``vcvtph2ps`` (fp16
    widening) is counted by width and ``vcvtsi2ss`` (an int to float conversion, one element) by itself."""
    for key, pattern in (("fma", _FMA), ("mul", _MUL), ("add", _ADD)):
        m = pattern.match(mnemonic)
        if m:
            if m.group(1) == "s":
                counts[key]["scalar"] += 1
            else:
                counts[key][_width(operands) or "xmm"] += 1
            return
    if _CVTSI2SS.match(mnemonic):
        counts["cvtsi2ss"] += 1
    elif _CVTPH2PS.match(mnemonic):
        counts["cvtph2ps"][_width(operands) or "xmm"] += 1


def _instructions(asm):
    """(kind, text, operands) per line of assembly: ("label", name, ""), ("insn", mnemonic, operands) or
    ("function", name, "") for a global label (a function's start); directives and comments are dropped."""
    out = []
    for raw in asm.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        m = _LABEL.match(line)
        if m:
            name = m.group(1)
            out.append(("label" if name.startswith(".L") else "function", name, ""))
            continue
        if not raw[:1].isspace():
            continue
        parts = line.strip().split(None, 1)
        if parts[0].startswith("."):
            continue  # a directive
        out.append(("insn", parts[0], parts[1] if len(parts) > 1 else ""))
    return out


@dataclass
class Loop:
    """One natural loop of a function: its header label, its blocks (indices into the function's blocks), whether it
    contains no other loop, and the counts of the instructions in its blocks."""

    function: str
    header: str
    blocks: frozenset
    innermost: bool = True
    counts: dict = field(default_factory=_blank_counts)


def _functions(asm):
    """Split a module's assembly into functions: [(name, [block, ...])], each block (label, [(mnemonic, operands)])."""
    functions = []
    blocks = None
    for kind, text, operands in _instructions(asm):
        if kind == "function":
            blocks = [(text, [])]
            functions.append((text, blocks))
        elif blocks is None:
            continue
        elif kind == "label":
            blocks.append((text, []))
        else:
            blocks[-1][1].append((text, operands))
            if text.startswith("j") or text in _TERMINATORS:
                blocks.append((None, []))  # a jump ends its block; what follows starts an unlabelled one
    return [(name, [b for b in blocks if b[0] is not None or b[1]]) for name, blocks in functions]


def _successors(blocks):
    """Control-flow edges between the blocks of one function: local jump targets plus fall-through."""
    index = {label: i for i, (label, _) in enumerate(blocks) if label}
    succ = []
    for i, (_, insns) in enumerate(blocks):
        out = set()
        last = insns[-1] if insns else None
        falls = True
        if last is not None:
            mnemonic, operands = last
            if mnemonic.startswith("j"):
                target = operands.strip()
                if target in index:
                    out.add(index[target])
                if mnemonic in ("jmp", "jmpq"):
                    falls = False
            elif mnemonic in _TERMINATORS:
                falls = False
        if falls and i + 1 < len(blocks):
            out.add(i + 1)
        succ.append(out)
    return succ


def _dominators(succ):
    """Dominator sets of the blocks reachable from block 0 (iterative data-flow); unreachable blocks are absent."""
    n = len(succ)
    pred = [set() for _ in range(n)]
    reach, stack = {0}, [0]
    while stack:
        b = stack.pop()
        for s in succ[b]:
            pred[s].add(b)
            if s not in reach:
                reach.add(s)
                stack.append(s)
    order = sorted(reach)
    dom = {b: set(reach) for b in order}
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in order[1:]:
            ps = [dom[p] for p in pred[b] if p in dom]
            new = set.intersection(*ps) | {b} if ps else {b}
            if new != dom[b]:
                dom[b], changed = new, True
    return dom, pred


def find_loops(asm):
    """The natural loops of every function in ``asm`` (a module's AT&T assembly), with per-loop instruction counts
    and which loops are innermost. See the module docstring for how loops are found and what that misses."""
    loops = []
    for name, blocks in _functions(asm):
        if not blocks:
            continue
        succ = _successors(blocks)
        dom, pred = _dominators(succ)
        bodies = {}
        for b in dom:
            for h in succ[b]:
                if h in dom.get(b, ()):  # b -> h with h dominating b: a back edge, h a loop header
                    body, stack = {h, b}, [b]
                    while stack:
                        x = stack.pop()
                        if x == h:
                            continue
                        for p in pred[x]:
                            if p in dom and p not in body:
                                body.add(p)
                                stack.append(p)
                    bodies.setdefault(h, set()).update(body)
        function_loops = []
        for h, body in sorted(bodies.items()):
            loop = Loop(name, blocks[h][0] or f"<block {h}>", frozenset(body))
            for b in body:
                for mnemonic, operands in blocks[b][1]:
                    count_instruction(loop.counts, mnemonic, operands)
            function_loops.append(loop)
        for loop in function_loops:
            loop.innermost = not any(other is not loop and other.blocks < loop.blocks for other in function_loops)
        loops += function_loops
    return loops


def count_instructions(asm):
    """Counts of the SIMD instructions of interest (see :func:`count_instruction`) over every instruction of
    ``asm``: {"fma": {"zmm", "ymm", "xmm", "scalar"}, "mul": {...}, "add": {...}, "cvtph2ps": {"zmm", "ymm", "xmm"},
    "cvtsi2ss": n}."""
    counts = _blank_counts()
    for kind, mnemonic, operands in _instructions(asm):
        if kind == "insn":
            count_instruction(counts, mnemonic, operands)
    return counts


def _add_counts(total, counts):
    for key, value in counts.items():
        if isinstance(value, dict):
            for k, v in value.items():
                total[key][k] += v
        else:
            total[key] += value


def _packed(counts, key="fma"):
    return sum(counts[key][w] for w in WIDTHS)


@dataclass
class AsmCounts:
    """The assembly of one compiled specialisation: counts in innermost loops (``hot``) and over the whole module
    (``whole``), the number of loops and innermost loops, how many innermost loops hold a packed FMA and how many
    hold scalar FMAs only, the verdict line, ``ok`` (False for a scalar fallback) and where the text came from
    ("inspected", or "recompiled" when the specialisation had been loaded from Numba's on-disk cache)."""

    signature: str
    hot: dict
    whole: dict
    loops: int
    innermost_loops: int
    packed_fma_loops: int
    scalar_fma_loops: int
    verdict: str
    ok: bool
    source: str = "inspected"

    def as_dict(self):
        """A JSON-able dict of every field."""
        return dict(vars(self))


def verdict(hot, whole, packed_fma_loops=0, scalar_fma_loops=0):
    """The one-line verdict and ok flag from the counts: "vectorised: …" when innermost loops hold packed FMAs,
    "SCALAR FALLBACK: …" (not ok) when they hold scalar FMAs and no packed one, else "no FMA in innermost loops"."""
    packed, scalar = _packed(hot), hot["fma"]["scalar"]
    if packed:
        widths = " + ".join(f"{hot['fma'][w]} {w}" for w in WIDTHS if hot["fma"][w])
        text = f"vectorised: {widths} FMAs in {packed_fma_loops} innermost loop(s), {scalar} scalar …ss"
        if scalar:
            text += f" ({scalar_fma_loops} loop(s) with scalar FMAs only: remainders, overlap fallbacks)"
        if hot["cvtsi2ss"]:
            text += f"; {hot['cvtsi2ss']} vcvtsi2ss"
        return text, True
    if scalar:
        return (f"SCALAR FALLBACK: {scalar} vfmadd…ss in {scalar_fma_loops} innermost loop(s), no packed FMA"
                + (f"; {hot['cvtsi2ss']} vcvtsi2ss" if hot["cvtsi2ss"] else "")), False
    outside = _packed(whole) + whole["fma"]["scalar"]
    return f"no FMA in innermost loops ({outside} elsewhere)", True


def analyse_asm(asm, signature="", source="inspected"):
    """:class:`AsmCounts` of one module's assembly text (what ``inspect_asm`` returns)."""
    loops = find_loops(asm)
    inner = [loop for loop in loops if loop.innermost]
    hot = _blank_counts()
    for loop in inner:
        _add_counts(hot, loop.counts)
    packed_loops = sum(1 for loop in inner if _packed(loop.counts))
    scalar_loops = sum(1 for loop in inner if not _packed(loop.counts) and loop.counts["fma"]["scalar"])
    whole = count_instructions(asm)
    line, ok = verdict(hot, whole, packed_loops, scalar_loops)
    return AsmCounts(signature, hot, whole, len(loops), len(inner), packed_loops, scalar_loops, line, ok, source)


def signature_label(sig):
    """A short name for a specialisation: the dtype, dimensions and layout of each array argument, in order."""
    parts = []
    for t in sig:
        dtype, ndim, layout = getattr(t, "dtype", None), getattr(t, "ndim", None), getattr(t, "layout", None)
        if dtype is not None and ndim is not None:
            parts.append(f"{dtype}[{ndim}d{'' if layout in (None, 'C') else ' ' + layout}]")
    return ", ".join(parts) or str(sig)


def specialisation_asm(dispatcher, sig):
    """(assembly text, source) of one compiled specialisation. When Numba loaded it from its on-disk cache (it
    then warns that inspection is disabled), the Python function is compiled again without the cache, with the same
    options and signature, and that code is returned with source "recompiled"."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asm = dispatcher.inspect_asm(sig)
    if not any("Inspection disabled for cached code" in str(w.message) for w in caught):
        return asm, "inspected"
    import numba

    options = {k: v for k, v in dispatcher.targetoptions.items() if k != "nopython"}  # njit implies it
    fresh = numba.njit(**options)(dispatcher.py_func)
    fresh.compile(sig)
    return fresh.inspect_asm(fresh.signatures[0]), "recompiled"


def asm_report(dispatcher):
    """:class:`AsmCounts` of every compiled specialisation of a Numba CPU dispatcher (each signature in
    ``dispatcher.signatures``; none if it was never called). See the module docstring for what the counts cover."""
    out = []
    for sig in list(dispatcher.signatures):
        asm, source = specialisation_asm(dispatcher, sig)
        out.append(analyse_asm(asm, signature_label(sig), source))
    return out


def attention_dispatchers(variants=("flat", "ring", "pooled", "two_tier")):
    """(name, dispatcher) of every compiled attention function of the CPU backend: each Numba dispatcher whose
    name contains "attend" in ``kvref.cpu.<variant>``, also inside a dict or list there (per-format or per-shape
    specialisations), and every specialisation its ``ATTEND`` (:class:`kvref.lowering.Specialisations`) has built
    so far, named ``<variant>.attend[G=.., D=..].<function>``; new ones are picked up without being listed here."""
    import importlib

    from numba.core.dispatcher import Dispatcher

    from ..lowering import Specialisations

    found = []
    for variant in variants:
        module = importlib.import_module(f"kvref.cpu.{variant}")
        for name, obj in sorted(vars(module).items()):
            if "attend" not in name:
                continue
            if isinstance(obj, Dispatcher):
                found.append((f"{variant}.{name}", obj))
            elif isinstance(obj, dict):
                found += [(f"{variant}.{name}[{k!r}]", v) for k, v in obj.items() if isinstance(v, Dispatcher)]
            elif isinstance(obj, (list, tuple)):
                found += [(f"{variant}.{name}[{i}]", v) for i, v in enumerate(obj) if isinstance(v, Dispatcher)]
        specialisations = getattr(module, "ATTEND", None)
        if isinstance(specialisations, Specialisations):
            for shape, compiled in sorted(specialisations.built.items()):
                label = ", ".join(f"{k}={n}" for k, n in zip(("G", "D", "kv_heads"), shape))
                found += [(f"{variant}.attend[{label}].{fn.py_func.__name__}", fn) for fn in compiled]
    return found


def asm_rows(dispatchers):
    """JSON-able rows for the report, one per compiled specialisation of each (name, dispatcher) pair: {"function",
    "signature", "verdict", "ok", "source", "hot", ...}; a dispatcher with no compiled specialisation gives one row
    with signature None. An inspection that fails gives a row with its error as the verdict (ok None)."""
    rows = []
    for name, dispatcher in dispatchers:
        if not dispatcher.signatures:
            rows.append({"function": name, "signature": None, "verdict": "not compiled in this run", "ok": None})
            continue
        try:
            reports = asm_report(dispatcher)
        except Exception as error:  # noqa: BLE001  (a report line, not a crash of a long benchmark)
            rows.append({"function": name, "signature": None, "verdict": f"inspection failed: {error!r}", "ok": None})
            continue
        rows += [{"function": name, **r.as_dict()} for r in reports]
    return rows


def compile_attention_kernels(dtypes=("float32", "float16"), q_heads=32, kv_heads=8, head_dim=128, parallel=True):
    """Compile every variant's attention for ``dtypes`` by one decode step on a tiny cache of each (flat, ring,
    pooled, two-tier; one layer, 40 tokens), without timing anything. With ``parallel`` and more than one Numba
    thread, each step is also run through the ``prange`` schedule (``kvref.cpu.PARALLEL_MIN_ROWS`` is set to 0 for
    the call and restored), so that both schedules get compiled."""
    import numba
    import numpy as np

    from .. import cpu
    from ..flat import FlatCache
    from ..pooled import PooledCache
    from ..ring import RingCache
    from ..shapes import CacheShape
    from ..two_tier import TwoTierCache

    rng = np.random.default_rng(0)
    n = 40
    saved = cpu.PARALLEL_MIN_ROWS
    try:
        for dtype in dtypes:
            shape = CacheShape(1, q_heads, kv_heads, head_dim, dtype)
            caches = [FlatCache(shape, batch=1, max_tokens=64, backend="cpu"),
                      RingCache(shape, batch=1, window=32, backend="cpu"),
                      PooledCache(shape, num_blocks=8, block_size=16, backend="cpu"),
                      TwoTierCache(shape, batch=1, tail_tokens=32, max_tokens=64, migration_batch=16, backend="cpu")]
            k = rng.standard_normal((1, 1, n, kv_heads, head_dim), dtype=np.float32).astype(dtype)
            q = rng.standard_normal((1, 1, q_heads, head_dim), dtype=np.float32)
            for cache in caches:
                for chunk in range(0, n - 1, 16):
                    end = min(chunk + 16, n - 1)
                    cache.append(np.ascontiguousarray(k[:, :, chunk:end]), np.ascontiguousarray(k[:, :, chunk:end]))
                step = cache.plan(1)
                cache.write(step, 0, np.ascontiguousarray(k[0, :, -1:]), np.ascontiguousarray(k[0, :, -1:]))
                for threshold in ((saved, 0) if parallel and numba.get_num_threads() > 1 else (saved,)):
                    cpu.PARALLEL_MIN_ROWS = threshold
                    cache.attend(step, 0, q)
    finally:
        cpu.PARALLEL_MIN_ROWS = saved


def main(argv=None):
    """``python -m kvref.bench.asm``: compile each variant's attention on tiny caches (fp32 and fp16, 32 query heads,
    8 KV heads, head_dim 128) and print the verdict of every compiled specialisation. Exit status 1 on a scalar
    fallback. Times nothing."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kvref.bench.asm", description=(
        "Compile the CPU backend's attention of every cache variant on tiny caches (fp32 and fp16, 32 query heads, "
        "8 KV heads, head_dim 128) and print, for every compiled specialisation, the packed and scalar FMAs in its "
        "innermost loops. Exit status 1 if one fell back to scalar code. Times nothing."))
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads of the tiny caches (default 8: G = 4)")
    parser.add_argument("--serial-only", action="store_true", help="do not compile the prange schedules")
    args = parser.parse_args(argv)
    compile_attention_kernels(kv_heads=args.kv_heads, parallel=not args.serial_only)
    rows = asm_rows(attention_dispatchers())
    for row in rows:
        where = f"{row['function']} ({row['signature']})" if row["signature"] else row["function"]
        print(f"{where}: {row['verdict']}" + (" [recompiled: loaded from the disk cache]"
                                             if row.get("source") == "recompiled" else ""))
    return 1 if any(row["ok"] is False for row in rows) else 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
