"""The CPU backend: the spec functions compiled with ``numba.njit``. Nothing here rewrites an algorithm.

* :func:`compile_spec` applies ``numba.njit`` to a spec function (with on-disk caching when enabled).
* ``fast_math`` gives two spec primitives a faster compiled form (fp16 widening, exp); tests prove each equal to
  its spec over its whole domain or within a stated bound.
* each ``kvref/cpu/<variant>.py`` lists the compiled twins of that variant's spec, plus ``prange`` schedules whose
  bodies call the spec.

On-disk caching of compiled code is opt-in (``KVREF_NUMBA_CACHE=1``): Numba's cache does not notice when a spec
function in *another* file changes (numba/numba#8396), and a read-only install without a cache directory would fail
at import. Compiling all CPU kernels takes a few seconds per process.
"""

import os

import numba

from . import fast_math  # noqa: F401  (registers the compiled forms of the primitives before anything compiles)

#: LLVM fast-math flags for the attention loops: re-association lets dot products and sums use SIMD lanes.
#: No 'nnan'/'ninf': the online softmax starts from -inf, and NaN scores must propagate. For finite inputs the
#: results differ from the spec only by rounding order.
ATTENTION_FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})


def cache_enabled():
    """True when KVREF_NUMBA_CACHE=1: compiled functions are then cached on disk (NUMBA_CACHE_DIR is honoured)."""
    return os.environ.get("KVREF_NUMBA_CACHE", "0") == "1"


def compile_spec(fn, fastmath=False, parallel=False):
    """``numba.njit`` of a spec function; falls back to no caching where the cache cannot be written."""
    options = {"fastmath": set(fastmath) if fastmath else False, "parallel": parallel}
    if cache_enabled():
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available" on a read-only install
            pass
    return numba.njit(**options)(fn)
