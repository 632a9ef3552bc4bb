"""The units of work of ``python -m kvref.plots``, each runnable in a worker process: one unit of the backend check
(:func:`check_unit`), one figure built and written (:func:`figure_unit`, :func:`build_figure`), and the
:class:`Pool` that runs them in fresh processes or, with one job, in this one."""

import dataclasses
import time
import warnings

from ..check import check_backends
from . import cost, flat, pooled, quant, ring, two_tier
from .style import save

#: the dtypes the backend check runs
DTYPES = ("float32", "float16")

#: the check's units, (backend, variant, dtypes), the slowest first. A unit of a compiled backend runs both dtypes
#: in one process, so no two processes compile (and write the on-disk cache of) the same function at once.
CHECK_UNITS = tuple([(b, v, DTYPES) for b in ("cpu", "cuda") for v in ("two_tier", "ring", "flat", "pooled")]
                    + [("python", v, (d,)) for v in ("two_tier", "pooled", "ring", "flat") for d in DTYPES[::-1]])

#: the figures in the order they are handed to the workers: the slowest first
FIGURE_ORDER = ("two_tier_timeline", "pooled_memory", "window_conventions", "two_tier_error", "quant_error",
                "quant_blocks", "cost", "ring_timeline", "pooled_tables", "memory", "layouts", "two_tier_memory",
                "ring_memory", "chunked_prefill", "flat_timeline")

#: --quick: the smaller data of the figures whose data take longest to compute (the full run uses the defaults)
QUICK_DATA = {
    "two_tier_error_rows": dict(context=128, tails=(1, 32, 64, 96, 128), decode=8, migration_batch=16),
    "prefill_tier_rows": dict(prompts=(16, 40, 96), tail_tokens=32, decode=4, migration_batch=8),
    "quant_error_rows": dict(normal_n=4096),
}

#: the module that builds each figure (its ``<name>_figure`` function)
FIGURE_MODULES = {"memory": cost, "cost": cost, "flat_timeline": flat, "layouts": flat, "ring_timeline": ring,
                  "ring_memory": ring, "window_conventions": ring, "chunked_prefill": ring, "quant_blocks": quant,
                  "quant_error": quant, "two_tier_timeline": two_tier, "two_tier_memory": two_tier,
                  "two_tier_error": two_tier, "pooled_tables": pooled, "pooled_memory": pooled}


def check_unit(backend, variant, dtypes=DTYPES):
    """One backend and variant of :func:`kvref.check.check_backends`, in ``dtypes``; returns the rows."""
    return check_backends(names=[backend], dtypes=dtypes, variants=[variant])


def build_figure(name, quick=False, data=None):
    """Build figure ``name``; returns (figure, what index.html needs from it or None).

    ``cost`` takes ``data`` = {"timings": measure_decode_times(...)}, measured beforehand, and also returns the
    toy's work counts (:func:`kvref.plots.cost.generation_counts`, without the caches they used); ``quant_error``
    also returns its rows (the quantization table); ``quick`` uses :data:`QUICK_DATA`."""
    small = QUICK_DATA if quick else {}
    if name == "cost":
        counts = cost.generation_counts(50, 100)
        fig = cost.cost_figure(counts, data["timings"])
        return fig, {k: dataclasses.replace(v, cache=None) if hasattr(v, "cache") else v for k, v in counts.items()}
    if name == "quant_error":
        rows = quant.quant_error_rows(**small.get("quant_error_rows", {}))
        return quant.quant_error_figure(rows), rows
    if name == "two_tier_error":
        rows = two_tier.two_tier_error_rows(**small.get("two_tier_error_rows", {}))
        prefill = two_tier.prefill_tier_rows(**small.get("prefill_tier_rows", {}))
        return two_tier.two_tier_error_figure(rows, prefill), None
    return getattr(FIGURE_MODULES[name], f"{name}_figure")(), None


def figure_unit(name, out_dir, quick=False, formats=("png", "svg"), data=None):
    """Build and write one figure (:func:`build_figure`, :func:`kvref.plots.style.save`); returns (name, seconds,
    what index.html needs from it)."""
    start = time.perf_counter()
    fig, extra = build_figure(name, quick, data)
    save(fig, name, out_dir, formats)
    return name, time.perf_counter() - start, extra


class Pool:
    """Runs units of work in ``jobs`` fresh worker processes (spawned: nothing of this process's threads or compiled
    state is copied; each worker loads compiled code from the on-disk cache), or one after the other in this process
    when ``jobs`` is 1."""

    def __init__(self, jobs):
        self.jobs = jobs
        self.executor = None
        if jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.executor = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))

    def run(self, fn, calls):
        """Yield ``fn(*args)`` for every ``args`` in ``calls``, each as soon as it is done (in any order).

        If the worker processes cannot start (a script that calls :func:`kvref.plots.main` without an
        ``if __name__ == "__main__":`` guard) or die, the calls not yet done run here, in this process."""
        calls = list(calls)
        if self.executor is None:
            for args in calls:
                yield fn(*args)
            return
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        futures = {self.executor.submit(fn, *args): args for args in calls}
        done = set()
        try:
            for future in as_completed(futures):
                result = future.result()
                done.add(future)
                yield result
        except BrokenProcessPool:
            warnings.warn("kvref.plots: the worker processes stopped; running the rest in this process")
            self.close()
            self.executor = None
            for future, args in futures.items():
                if future not in done:
                    yield fn(*args)
        finally:
            for future in futures:
                future.cancel()

    def close(self):
        """Stop the workers (work not yet started is dropped)."""
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)
