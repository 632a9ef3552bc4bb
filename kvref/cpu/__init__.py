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

import math
import os
import tempfile
from pathlib import Path

import numba
import numpy as np
from numba import prange
from numba.core import config

#: LLVM fast-math flags for the attention loops: re-association lets dot products and sums use SIMD lanes.
#: No 'nnan'/'ninf': the online softmax starts from -inf, and NaN scores must propagate. For finite inputs the
#: results differ from the spec only by rounding order.
ATTENTION_FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})

from ..lowering import Specialisations  # noqa: E402, F401  (each variant's compiled attention, per shape)
from . import fast_math  # noqa: E402, F401  (registers the compiled forms of the primitives before anything compiles)
from . import fast_quant  # noqa: E402, F401  (registers the compiled block decode of quantized rows, likewise)
from ..attention import merge_parts  # noqa: E402
from ..flat import work_item  # noqa: E402



#: below this many (key row x KV head) reads a step runs on one thread: waking Numba's thread pool costs more than a
#: small decode step (about 100x more on a busy 2-core machine)
PARALLEL_MIN_ROWS = 1 << 12
#: split-K gives each part at least this many key rows (64 tiles): a part's fixed cost (its scratch, saving its
#: state, its share of the merge: about G x D x 3 floats) is then under 1% of the rows it reads
MIN_PART_ROWS = 2048
#: the head split is kept when it keeps at least this share of the threads busy (items / (ceil(items / P) * P))
HEAD_SPLIT_BALANCE = 0.9


def choose_parts(rows, work_items, threads=None):
    """The one schedule choice of every variant's ``attend_tokens``, by the shape of the work.

    rows: the key rows the step reads (summed over its work items); work_items: its (sequence, token, KV head)
    triples; threads: the thread pool's size (``numba.get_num_threads()``). Returns

    * 0: serial, one thread (one thread only, or under ``PARALLEL_MIN_ROWS`` rows: waking the pool costs more);
    * 1: the **head split**: ``prange`` over the work items, each one whole online softmax. Kept when the items
      fill the threads evenly (``HEAD_SPLIT_BALANCE``): e.g. 32 KV heads, or 8 KV heads x 4 sequences, on 2 threads;
    * P >= 2: the **key split** (split-K, flash-decoding): each item's keys are cut into P shares of whole tiles
      (``attention.key_share``), the items x P parts run over the threads (``attend_part``), then each item's P
      partial states are merged (``attention.merge_parts``). P = threads / gcd(items, threads), so the parts fill
      the threads exactly (1 item on 2 threads: 2 parts; 3 items on 2 threads: 6 parts), and no part gets under
      ``MIN_PART_ROWS`` rows. This is what one long sequence needs: Gemma-2B has a single KV head, so the head split
      leaves one of two threads idle (and 63 of 64 on a server).
    """
    threads = numba.get_num_threads() if threads is None else threads
    if threads <= 1 or rows < PARALLEL_MIN_ROWS or work_items < 1:
        return 0
    busy = work_items / (-(-work_items // threads) * threads)
    if busy >= HEAD_SPLIT_BALANCE:
        return 1
    parts = threads // math.gcd(work_items, threads)
    return max(1, min(parts, rows // work_items // MIN_PART_ROWS))


def choose_schedule(rows, work_items, serial, parallel):
    """The serial-or-head-split choice for a schedule that has no key split (:func:`choose_parts`): the ``prange``
    schedule when there is more than one thread, at least ``PARALLEL_MIN_ROWS`` key rows and more than one item."""
    if work_items > 1 and choose_parts(rows, work_items) >= 1:
        return parallel
    return serial


def split_state(n_seq, n_tokens, kv_heads, parts, group, head_dim):
    """The partial states of a split-K step: ``part_acc`` (n_seq, T, kv_heads, P, G, D) and ``part_m_l``
    (n_seq, T, kv_heads, P, G, 2), float32 (``attention.merge_tokens``)."""
    dims = (n_seq, n_tokens, kv_heads, parts, group)
    return np.empty(dims + (head_dim,), np.float32), np.empty(dims + (2,), np.float32)


def run_attention(schedules, rows, state_dims, args, out, parts=None):
    """Run one step's attention on the schedule :func:`choose_parts` picks.

    schedules: (serial, parallel, split), one variant's compiled schedules for one shape: ``serial(*args, out)`` and
    ``parallel(*args, out)`` write ``out``; ``split(*args, part_acc, part_m_l)`` fills the partial states of every
    (item, part), which :data:`MERGE_TOKENS` then merges into ``out``. rows: the key rows the step reads;
    state_dims: (n_seq, T, kv_heads, G, D); parts: the choice when the caller made it (else
    ``choose_parts(rows, n_seq * T * kv_heads)``)."""
    serial, parallel, split = schedules
    n_seq, n_tokens, kv_heads, group, head_dim = state_dims
    if parts is None:
        parts = choose_parts(rows, n_seq * n_tokens * kv_heads)
    if parts == 0:
        serial(*args, out)
    elif parts == 1:
        parallel(*args, out)
    else:
        part_acc, part_m_l = split_state(n_seq, n_tokens, kv_heads, parts, group, head_dim)
        split(*args, part_acc, part_m_l)
        MERGE_TOKENS(group, head_dim)(part_acc, part_m_l, out)


def _specialise_merge(group, head_dim):
    """``attention.merge_tokens`` with G and D frozen, one ``prange`` iteration per work item (i, t, h); the body
    is the spec's merge (``attention.merge_parts``)."""

    def merge(part_acc, part_m_l, out):
        n_seq, n_tokens, kv_heads = part_acc.shape[:3]
        for item in prange(n_seq * n_tokens * kv_heads):
            i, t, h = work_item(item, n_tokens, kv_heads)
            merge_parts(part_acc[i, t, h], part_m_l[i, t, h], out[i, t, h * group:(h + 1) * group], group,
                        head_dim)

    return compile_spec(merge, fastmath=ATTENTION_FASTMATH, parallel=True)


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


#: ``attention.merge_tokens`` over the threads, per shape (G, D): split-K's second pass
MERGE_TOKENS = Specialisations(_specialise_merge)
