"""The CPU backend: the spec functions compiled with ``numba.njit``. Nothing here rewrites an algorithm.

* :func:`compile_spec` applies ``numba.njit`` to a spec function, with compiled code cached on disk.
* :func:`choose_schedule` is the one choice between a variant's serial loop and its ``prange`` schedule.
* ``fast_math`` gives a few spec primitives a faster compiled form (fp16 widening, exp, the quantizers' block
  reductions); tests prove each equal to its spec over its whole domain or within a stated bound.
* each ``kvref/cpu/<variant>.py`` lists the compiled twins of that variant's spec, plus ``prange`` schedules whose
  bodies call the spec.

**The on-disk cache** (on by default; ``KVREF_NUMBA_CACHE=0`` turns it off). Numba's own cache notices when the file
of a cached function changes, but not when a spec function in *another* file that it calls does (numba/numba#8396),
so a plain ``cache=True`` can run stale code. kvref therefore caches in a folder named after a hash of all of its own
sources, ``$NUMBA_CACHE_DIR/kvref-<hash>`` (default ``~/.cache/kvref/numba-<hash>``): any edit anywhere in kvref
gives a new folder, so nothing stale is ever loaded. Where no folder can be written (a read-only install), it
compiles without caching. A cold process compiles every kernel it uses (tens of seconds); a warm one loads them.
"""

import hashlib
import os
from pathlib import Path

import numba
from numba.core import config

from . import fast_math  # noqa: F401  (registers the compiled forms of the primitives before anything compiles)

#: LLVM fast-math flags for the attention loops: re-association lets dot products and sums use SIMD lanes.
#: No 'nnan'/'ninf': the online softmax starts from -inf, and NaN scores must propagate. For finite inputs the
#: results differ from the spec only by rounding order.
ATTENTION_FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})


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


def source_hash():
    """sha256 (16 hex digits) of every kvref source file, paths included: the key of the compiled-code cache."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(numba.__version__.encode())
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


_CACHE_DIR = []


def cache_dir():
    """The folder compiled code is cached in: ``$NUMBA_CACHE_DIR/kvref-<hash>`` or ``~/.cache/kvref/numba-<hash>``."""
    if not _CACHE_DIR:
        base = os.environ.get("NUMBA_CACHE_DIR")
        folder = Path(base) / "kvref-" if base else Path.home() / ".cache" / "kvref" / "numba-"
        _CACHE_DIR.append(str(folder) + source_hash())
    return _CACHE_DIR[0]


def compile_spec(fn, fastmath=False, parallel=False):
    """``numba.njit`` of a spec function, cached on disk in :func:`cache_dir` (falls back to no caching where that
    folder cannot be written)."""
    options = {"fastmath": set(fastmath) if fastmath else False, "parallel": parallel}
    if cache_enabled():
        saved = config.CACHE_DIR
        config.CACHE_DIR = cache_dir()  # read once, when the dispatcher picks its cache locator (now)
        try:
            return numba.njit(cache=True, **options)(fn)
        except (RuntimeError, OSError):  # "cannot cache function ...: no locator available" on a read-only install
            pass
        finally:
            config.CACHE_DIR = saved
    return numba.njit(**options)(fn)
