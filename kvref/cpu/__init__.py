"""The CPU backend: the spec functions compiled with ``numba.njit``. Nothing here rewrites an algorithm.

* :func:`compile_spec` applies ``numba.njit`` to a spec function, with compiled code cached on disk.
* :func:`choose_schedule` is the one choice between a variant's serial loop and its ``prange`` schedule.
* ``fast_math`` registers ``attention.local_array`` (a stack array) and inlines the kernel's ``@inlined`` phases;
  it also gives a few spec primitives a faster compiled form (fp16 widening, exp, the quantizers' block
  reductions); tests prove each equal to its spec over its whole domain or within a stated bound.
* ``fast_quant`` gives the quantized block decode a vector form (LLVM vector IR per ggml format), bit-identical to
  the spec; it is what makes the two-tier cache's attention keep up with the fp16 flat cache.
* each ``kvref/cpu/<variant>.py`` lists the compiled twins of that variant's spec, plus ``prange`` schedules whose
  bodies call the spec.

**The on-disk cache** (on by default; ``KVREF_NUMBA_CACHE=0`` turns it off). Numba's own cache notices when the file
of a cached function changes, but not when a spec function in *another* file that it calls does (numba/numba#8396),
so a plain ``cache=True`` can run stale code. kvref therefore caches in a folder named after a hash of all of its own
sources as this process imported them (``kvref.SOURCE_HASH``), ``$NUMBA_CACHE_DIR/kvref-<hash>-<numba version>``
(default ``~/.cache/kvref/numba-<hash>-<numba version>``): an edit anywhere in kvref gives a new folder. Where that
folder cannot be written (a read-only home), nothing is cached at all (not even in Numba's fallback, a
``__pycache__`` beside the sources, which no hash keys). A cold process compiles every kernel it uses (tens of
seconds); a warm one loads them. Old folders are not removed; delete ``~/.cache/kvref`` to reclaim the space.
"""

import os
import tempfile
from pathlib import Path

import numba
from numba.core import config

#: LLVM fast-math flags for the attention loops: re-association lets dot products and sums use SIMD lanes.
#: No 'nnan'/'ninf': the online softmax starts from -inf, and NaN scores must propagate. For finite inputs the
#: results differ from the spec only by rounding order.
ATTENTION_FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})

from ..lowering import Specialisations  # noqa: E402, F401  (each variant's compiled attention, per shape)
from . import fast_math  # noqa: E402, F401  (registers the compiled forms of the primitives before anything compiles)
from . import fast_quant  # noqa: E402, F401  (registers the compiled block decode of quantized rows, likewise)



#: below this many (key row x KV head) reads a step runs on one thread: waking Numba's thread pool costs more than a
#: small decode step (about 100x more on a busy 2-core machine)
PARALLEL_MIN_ROWS = 1 << 12


def choose_schedule(rows, work_items, serial, parallel):
    """The one serial-or-parallel choice of every variant's ``attend_tokens``: the prange schedule when there is more
    than one thread, at least ``PARALLEL_MIN_ROWS`` key rows to read and more than one work item to share."""
    if numba.get_num_threads() > 1 and rows >= PARALLEL_MIN_ROWS and work_items > 1:
        return parallel
    return serial


def cache_enabled():
    """True unless KVREF_NUMBA_CACHE=0: compiled functions are then cached on disk in :func:`cache_dir`."""
    return os.environ.get("KVREF_NUMBA_CACHE", "1") != "0"


_CACHE_DIR = []


def cache_dir():
    """The folder compiled code is cached in, ``$NUMBA_CACHE_DIR/kvref-<hash>`` or ``~/.cache/kvref/numba-<hash>``
    (the hash of the sources this process imported, ``kvref.SOURCE_HASH``, and numba's version), or None when that
    folder cannot be created and written: then nothing is cached."""
    if not _CACHE_DIR:
        from .. import SOURCE_HASH

        base = os.environ.get("NUMBA_CACHE_DIR")
        folder = Path(base) / "kvref-" if base else Path.home() / ".cache" / "kvref" / "numba-"
        folder = Path(f"{folder}{SOURCE_HASH}-{numba.__version__}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError:
            folder = None
        _CACHE_DIR.append(folder and str(folder))
    return _CACHE_DIR[0]


def compile_spec(fn, fastmath=False, parallel=False):
    """``numba.njit`` of a spec function, cached on disk in :func:`cache_dir` when there is one. Numba is asked to
    cache only when that folder is writable: otherwise it would fall back to a ``__pycache__`` next to the sources,
    which is not keyed by the hash and could serve stale code."""
    options = {"fastmath": set(fastmath) if fastmath else False, "parallel": parallel}
    folder = cache_dir() if cache_enabled() else None
    if folder is None:
        return numba.njit(**options)(fn)
    saved = config.CACHE_DIR
    config.CACHE_DIR = folder  # read once, when the dispatcher picks its cache locator (now)
    try:
        return numba.njit(cache=True, **options)(fn)
    finally:
        config.CACHE_DIR = saved
