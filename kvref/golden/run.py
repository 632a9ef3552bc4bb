"""Check an implementation against a golden suite: run each case it supports, compare every expected tensor.

:func:`check_suite` returns one :class:`CaseResult` per case; :func:`format_table` prints them as one row per case
(its worst tensor, or its first failure) plus, under a failing case, a line per failing tensor that names the case,
the step and the tensor. ``python -m kvref.golden check`` exits 1 if any case fails or none ran, 2 if the suite
itself is broken (a wrong sha256, format or version).
"""

import importlib
import importlib.util
import inspect
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..check import compare
from .format import find_case, load_case, read_manifest

#: the method each kind of step calls (a cache case needs ``open_cache`` and, on its cache, the op's method)
METHODS = {"attention": "attention", "paged_attention": "paged_attention", "quantize": "quantize",
           "dequantize": "dequantize"}
#: the ops of a cache case: each is the name of the cache object's method
CACHE_OPS = ("append", "crop", "reset", "fork", "add_sequence", "release", "evict")


@dataclass
class Check:
    """One tensor of one step: its comparison, or an error message (ok False) when the step could not run."""

    step: str
    op: str
    tensor: str
    comparison: object = None
    message: str = ""

    @property
    def ok(self):
        """True iff the tensor was compared and is within its tolerance."""
        return self.comparison is not None and self.comparison.ok

    @property
    def ratio(self):
        """Worst error / tolerance (inf when the step could not run)."""
        return math.inf if self.comparison is None else self.comparison.ratio


@dataclass
class CaseResult:
    """What checking one case found: ``status`` is "ok", "FAIL" or "skip" (with ``reason``)."""

    name: str
    kind: str
    checks: list = field(default_factory=list)
    skipped: str = ""
    not_provided: list = field(default_factory=list)
    refusals: list = field(default_factory=list)  # "stepNN refused with <its error> (kvref: <kvref's>)"

    @property
    def status(self):
        """"skip" (not supported), "ok" (every check passed) or "FAIL"."""
        if self.skipped:
            return "skip"
        return "ok" if self.checks and all(c.ok for c in self.checks) else "FAIL"

    @property
    def failures(self):
        """The checks that failed."""
        return [c for c in self.checks if not c.ok]


def as_numpy(x):
    """A NumPy array from NumPy, anything with ``__array__`` (torch tensors), or DLPack."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "__array__"):
        return np.asarray(x)
    if hasattr(x, "__dlpack__"):
        return np.from_dlpack(x)
    return np.asarray(x)


def load_impl(spec):
    """The implementation ``module:object`` names (module dotted, or a path to a .py file); a class is
    instantiated without arguments."""
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(f"--impl expects module:object, got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        name = f"kvref_golden_impl_{path.stem}"  # its own name: a file called numpy.py replaces nothing
        loader = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module
        loader.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    impl = module
    for part in attribute.split("."):
        impl = getattr(impl, part)
    return impl() if inspect.isclass(impl) else impl


def describe(impl):
    """The implementation's ``name`` attribute, else its class name."""
    return getattr(impl, "name", type(impl).__name__)


def compare_named(step, desc, actual, tensors, checks, transform=None):
    """Compare ``actual`` with the expected tensor ``desc`` names; append the Check."""
    expected = tensors[desc["tensor"]]
    mask = None
    if "mask" in desc:
        mask = tensors[desc["mask"]] >= 0
    if transform is not None:
        expected, mask = transform(expected, mask)
    result = compare(as_numpy(actual), expected, desc["tensor"], desc["atol"], desc["rtol"], mask=mask)
    checks.append(Check(step["name"], step["op"], desc["tensor"], result))


def fail(step, tensor, message, checks):
    """Record a check that could not be compared (the step raised, or an expected error did not come)."""
    checks.append(Check(step["name"], step["op"], tensor, None, message))


def call_expected(result, step, fn, *args):
    """Call fn; an exception is a failed check of the step's first expected tensor."""
    name = next(iter(step["expected"].values()))["tensor"]
    try:
        return True, fn(*args)
    except Exception as exc:  # the implementation's own error, reported, not raised
        fail(step, name, f"raised {type(exc).__name__}: {exc}", result.checks)
        return False, None


# ---------------------------------------------------------------------------------------------------------------
# Kinds of case
# ---------------------------------------------------------------------------------------------------------------
def check_kernel_case(impl, case, tensors, result):
    """attention, paged_attention, quantize/dequantize: one call per step, compare its output."""
    c = case["config"]
    for step in case["steps"]:
        method = getattr(impl, METHODS[step["op"]], None)
        if method is None:
            result.not_provided.append(f"{step['name']} ({step['op']}: no method {METHODS[step['op']]})")
            continue
        inputs = {name: tensors[d["tensor"]] for name, d in step["inputs"].items()}
        if step["op"] == "attention":
            args = (inputs["q"], inputs["k"], inputs["v"], inputs["q_positions"], inputs["k_positions"], c["scale"],
                    c["window"], c["sinks"])
        elif step["op"] == "paged_attention":
            args = (inputs["q"], inputs["k_pages"], inputs["v_pages"], inputs["kv_indptr"], inputs["kv_indices"],
                    inputs["kv_last_page_len"], c["scale"])
        elif step["op"] == "quantize":
            args = (inputs["x"], c["format"])
        else:
            args = (inputs["blocks"], c["format"], c["head_dim"])
        ran, actual = call_expected(result, step, method, *args)
        if ran:
            (desc,) = step["expected"].values()
            compare_named(step, desc, actual, tensors, result.checks)
    if not result.checks:
        missing = sorted({METHODS[step["op"]] for step in case["steps"]})
        result.skipped = f"no method {', '.join(missing)}"


def keeps_past_only(cache, case):
    """True for a ring implementation with Hugging Face's convention: between steps it keeps the W - 1 most recent
    tokens (the next query brings its own key), where kvref keeps W."""
    return case["variant"] == "ring" and getattr(cache, "window_convention", "kvref") == "hf"


def trim_to_past(window):
    """Expected logical tensor -> its last W - 1 positions (axis 0 for positions, axis 1 for k/v)."""
    def transform(expected, mask):
        axis = 0 if expected.ndim == 1 else 1
        n = expected.shape[axis]
        keep = min(n, window - 1)
        return np.take(expected, range(n - keep, n), axis=axis), mask
    return transform


def check_cache_case(impl, case, tensors, result):
    """Replay a cache case step by step; after each, compare the logical content and whatever physical layout the
    implementation reports. A step that raises where none was expected ends the case."""
    opener = getattr(impl, "open_cache", None)
    cache = None if opener is None else opener(case["variant"], case["config"])
    if cache is None:
        result.skipped = "no open_cache" if opener is None else f"open_cache gives no {case['variant']} cache"
        return
    missing = sorted({s["op"] for s in case["steps"] if not hasattr(cache, s["op"])})
    if missing:
        result.skipped = f"the cache has no {', '.join(missing)}"
        return
    ids = {}  # the case's sequence id -> the implementation's
    for step in case["steps"]:
        args = step["args"]
        inputs = {name: tensors[d["tensor"]] for name, d in step["inputs"].items()}
        if step["op"] == "append":
            mapped = [ids.get(s, s) for s in args["seq_ids"]]
            try:
                out = cache.append(mapped, inputs["k"], inputs["v"], inputs.get("q"))
            except Exception as exc:
                if step["error"] and not isinstance(exc, NotImplementedError):
                    out = None  # refused, as it must be: the state is compared below
                    result.refusals.append(f"{step['name']} refused with {type(exc).__name__} (kvref: "
                                           f"{step['error']})")
                elif step["error"]:
                    fail(step, f"{step['name']}/op", "raised NotImplementedError, which is not a refusal (an "
                         "implementation that cannot run a case says so with supports(case))", result.checks)
                    return
                else:
                    fail(step, f"{step['name']}/op", f"append raised {type(exc).__name__}: {exc}", result.checks)
                    return
            else:
                if step["error"]:
                    fail(step, f"{step['name']}/op", f"expected an error ({step['error']} in kvref), none was "
                         "raised", result.checks)
                    return
            for name, desc in step["expected"].items():
                if out is None:
                    result.not_provided.append(desc["tensor"])
                else:
                    compare_named(step, desc, out, tensors, result.checks)
        else:
            seq = args.get("seq")
            call = {"crop": lambda: cache.crop(ids.get(seq, seq), args["max_length"]),
                    "reset": lambda: cache.reset(ids.get(seq, seq)), "fork": lambda: cache.fork(ids.get(seq, seq)),
                    "add_sequence": lambda: cache.add_sequence(), "release": lambda: cache.release(ids.get(seq, seq)),
                    "evict": lambda: cache.evict(ids.get(seq, seq), args["num_tokens"])}[step["op"]]
            try:
                made = call()
            except Exception as exc:
                fail(step, f"{step['name']}/op", f"{step['op']} raised {type(exc).__name__}: {exc}", result.checks)
                return
            if step["op"] in ("fork", "add_sequence"):
                ids[args["child"]] = made
        check_state(cache, case, step, tensors, ids, result)


def check_state(cache, case, step, tensors, ids, result):
    """Compare the logical content of each sequence the step records, then the physical layout the implementation
    reports (the names it does not report are listed as not provided)."""
    transform = None
    if keeps_past_only(cache, case):
        if case["config"].get("sinks", 0):  # which W - 1 would it keep: the sinks, or the latest? Not defined
            fail(step, f"{step['name']}/state", "window_convention 'hf' is not defined with attention sinks",
                 result.checks)
            return
        transform = trim_to_past(case["config"]["window"])
    seqs = sorted({int(name.split("/")[0][3:]) for name in step["logical"]})
    for s in seqs:
        try:
            read = dict(zip(("positions", "k", "v"), cache.read(ids.get(s, s))))
        except Exception as exc:
            fail(step, f"{step['name']}/state/seq{s}", f"read raised {type(exc).__name__}: {exc}", result.checks)
            continue
        for part in ("positions", "k", "v"):
            desc = step["logical"][f"seq{s}/{part}"]
            compare_named(step, desc, read[part], tensors, result.checks, transform)
    physical = getattr(cache, "physical", None)
    layout = {} if physical is None else physical()
    for name, desc in step["physical"].items():
        if name in layout:
            compare_named(step, desc, layout[name], tensors, result.checks)
        else:
            result.not_provided.append(desc["tensor"])


def declined(impl, case):
    """Why ``impl`` declines ``case`` up front, or "" to run it. An implementation may have ``supports(case) ->
    bool | str`` (case: the manifest's case dict): True runs the case; False, or a string saying why, skips it."""
    supports = getattr(impl, "supports", None)
    answer = True if supports is None else supports(case)
    if not isinstance(answer, str) and answer:  # True, 1, np.True_: run it
        return ""
    return answer if isinstance(answer, str) and answer else "the implementation does not support it"


def check_suite(folder, impl, names=None):
    """Check ``impl`` on every case of the suite in ``folder`` (or those ``names`` lists). Returns (manifest, list
    of CaseResult). Raises SuiteError for a broken suite (manifest, version or sha256)."""
    manifest = read_manifest(folder)
    cases = manifest["cases"] if not names else [find_case(manifest, name) for name in names]
    results = []
    for case in cases:
        tensors = load_case(folder, case)
        result = CaseResult(case["name"], case["kind"])
        try:  # whatever the implementation raises outside a step (supports, open_cache, physical) fails the case
            result.skipped = declined(impl, case)
            if not result.skipped:
                check = check_cache_case if case["kind"] == "cache" else check_kernel_case
                check(impl, case, tensors, result)
        except Exception as exc:
            result.skipped = ""
            result.checks.append(Check("-", case["kind"], "-", None, f"raised {type(exc).__name__}: {exc}"))
        results.append(result)
    return manifest, results


def exit_status(results):
    """0 if at least one case ran and none failed, else 1."""
    ran = [r for r in results if r.status != "skip"]
    return 0 if ran and all(r.status == "ok" for r in ran) else 1


def tolerance_text(comparison):
    """The tolerance column: "exact" or "atol+rtol|e|"."""
    if comparison is None:
        return "-"
    if comparison.atol == 0 and comparison.rtol == 0:
        return "exact"
    return f"{comparison.atol:.0e}+{comparison.rtol:.0e}|e|"


def format_table(results, verbose=False, max_failures=8):
    """The result table: one row per case (and, with ``verbose``, one per tensor)."""
    lines = [f"{'case':38} {'op':16} {'tensor':34} {'max err':>10} {'tolerance':>15}  result"]
    lines.append("-" * len(lines[0]))
    skipped = {}  # reason -> case names (one line per reason unless verbose)
    for r in results:
        if r.status == "skip":
            if verbose:
                lines.append(f"{r.name:38} {'-':16} {'-':34} {'-':>10} {'-':>15}  skip ({r.skipped})")
            skipped.setdefault(r.skipped, []).append(r.name)
            continue
        shown = r.failures[0] if r.failures else max(r.checks, key=lambda c: c.ratio)
        err = "-" if shown.comparison is None else f"{shown.comparison.max_abs:.3g}"
        partial = f" ({len(r.not_provided)} not compared)" if r.status == "ok" and r.not_provided else ""
        lines.append(f"{r.name:38} {shown.op:16} {shown.tensor:34} {err:>10} "
                     f"{tolerance_text(shown.comparison):>15}  {r.status}{partial}")
        if verbose:
            lines.extend(f"    ok   case {r.name}, {refusal}" for refusal in r.refusals)
        rows = r.checks if verbose else r.failures[:max_failures]
        for c in rows:
            detail = c.message or c.comparison.message or f"max err {c.comparison.max_abs:.3g}"
            lines.append(f"    {'FAIL' if not c.ok else 'ok  '} case {r.name}, {c.step}, tensor {c.tensor}: {detail}")
        if not verbose and len(r.failures) > max_failures:
            lines.append(f"    ... and {len(r.failures) - max_failures} more failing tensors in case {r.name}")
    ran = [r for r in results if r.status != "skip"]
    failed = [r for r in ran if r.status == "FAIL"]
    if skipped and not verbose:
        lines.append("")
        for reason, names in skipped.items():
            lines.extend(textwrap.wrap(f"skipped, {reason}: {', '.join(names)}", 120, subsequent_indent="    "))
    lines.append("")
    lines.append(f"{len(results)} cases: {len(ran) - len(failed)} ok, {len(failed)} FAIL, "
                 f"{len(results) - len(ran)} skipped (not supported by the implementation)")
    not_provided = sum(len(r.not_provided) for r in ran)
    if not_provided:
        lines.append(f"{not_provided} expected tensors were not compared because the implementation does not report "
                     "them (physical layout, attention output)")
    if not ran:
        lines.append("FAIL: no case ran; the implementation supports none of the suite's operations")
    return "\n".join(lines)
