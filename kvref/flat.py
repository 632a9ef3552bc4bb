"""The flat cache: one contiguous row of ``max_tokens`` slots per sequence. This file is its whole algorithm.

Addressing (ARCHITECTURE.md, "a cache is a map from (sequence, position) to a slot"):

    slot(seq, p) = p                            in the sequence's own row
    storage      kv[layer, 0=K|1=V, seq, kv_head, slot, dim]        head-major, see kvref/shapes.py

A step of the model, the same for every variant:

1. **plan** (host Python, once per step): validate, then compute ``positions[i, t] = length[seq_i] + t`` and
   ``slots[i, t] = slot(positions[i, t])`` for the ``T`` new tokens of each sequence. Overflow
   (``length + T > max_tokens``) raises :class:`CacheOverflowError` here, before anything changes (seed 001 added
   first and checked afterwards, leaving its position past the end).
2. **write** (per layer, compiled): ``kv[layer, K, seq_i, h, slots[i, t], :] = k_new[i, t, h, :]``, same for V.
   The layer index is part of every address, so one layer can never overwrite another (seed 000).
3. **attend** (per layer, compiled): the query at position p sees slots ``0..p`` (causal, including itself), so a
   chunk of T tokens attends causally within itself (chunked prefill) and a single token is plain decode.
4. **advance** (host, once per step): ``length[seq_i] += T``.

``reset`` is O(1): it sets lengths to 0. No slot at or past a sequence's length is ever read, so nothing needs
zeroing (seed 001 zeroed the whole buffer, O(capacity)).

The functions marked ``@register_jitable`` are the spec. Called directly they run as plain Python (backend
"python"); ``kvref/cpu/flat.py`` compiles the very same functions with ``numba.njit``, and ``kvref/cuda/flat.py``
calls them from CUDA kernels as device functions.
"""

import itertools
from dataclasses import dataclass

import numpy as np
from numba.extending import register_jitable

from .attention import WORK_COLUMNS, attend_group, default_scale
from .errors import CacheOverflowError, DTypeError, IndexOutOfRangeError, ShapeError, StaleStepError
from .shapes import CacheShape, buffer_dims, check_index, check_positive_int


# ---------------------------------------------------------------------------------------------------------------
# Spec: addressing, write, attend
# ---------------------------------------------------------------------------------------------------------------
@register_jitable
def flat_slot(position):
    """Slot of token position ``p`` in its sequence's row: ``p`` itself."""
    return position


@register_jitable
def write_one(kv, layer, seq_ids, slots, k_new, v_new, i, t, h, d):
    """Store element d of head h of new token t of step-sequence i (one CUDA thread does exactly this).

    kv[layer, 0, seq_ids[i], h, slots[i, t], d] = k_new[i, t, h, d]    and the same for V (index 1).
    """
    seq = seq_ids[i]
    slot = slots[i, t]
    kv[layer, 0, seq, h, slot, d] = k_new[i, t, h, d]
    kv[layer, 1, seq, h, slot, d] = v_new[i, t, h, d]


@register_jitable
def write_tokens(kv, layer, seq_ids, slots, k_new, v_new):
    """Scatter the new K/V of one layer into their slots.

    kv:     (layers, 2, batch, kv_heads, max_tokens, D) storage (float32, or uint16 fp16 bits)
    k_new:  (n_seq, T, kv_heads, D) same dtype as kv; v_new likewise
    slots:  (n_seq, T) int64 from the plan; seq_ids: (n_seq,) int64
    """
    n_seq, n_tokens, kv_heads, head_dim = k_new.shape
    for i in range(n_seq):
        for t in range(n_tokens):
            for h in range(kv_heads):
                for d in range(head_dim):
                    write_one(kv, layer, seq_ids, slots, k_new, v_new, i, t, h, d)


@register_jitable
def attend_one(kv, layer, seq_ids, positions, q, scale, out, work, i, t, h):
    """Attention of the G query heads of KV head h, for new token t of step-sequence i.

    A query at position p sees slots 0..p of its sequence: n_visible = p + 1 (the flat cache keeps every token).
    Query heads h*G .. h*G+G-1 share KV head h (GQA; G = q_heads // kv_heads).
    """
    seq = seq_ids[i]
    group = q.shape[2] // kv.shape[3]
    first = h * group
    n_visible = positions[i, t] + 1
    attend_group(q[i, t, first:first + group], kv[layer, 0, seq, h], kv[layer, 1, seq, h], n_visible, scale,
                 out[i, t, first:first + group], work)


@register_jitable
def work_item(item, n_tokens, kv_heads):
    """Unflatten a work item: item = (i * T + t) * kv_heads + h  ->  (i, t, h). Parallel schedules number their
    (step-sequence, token, KV head) triples this way."""
    return item // (n_tokens * kv_heads), (item // kv_heads) % n_tokens, item % kv_heads


@register_jitable
def attend_tokens(kv, layer, seq_ids, positions, q, scale, out):
    """Decode attention (T = 1) or causal chunked prefill (T > 1) of one layer for every new token.

    q:    (n_seq, T, q_heads, D) float32;  out: same shape, float32, overwritten
    positions: (n_seq, T) int64 absolute positions of the new tokens (already written to the cache)
    """
    n_seq, n_tokens, q_heads, head_dim = q.shape
    group = q_heads // kv.shape[3]
    work = np.empty((group, WORK_COLUMNS), np.float32)
    for i in range(n_seq):
        for t in range(n_tokens):
            for h in range(kv.shape[3]):
                attend_one(kv, layer, seq_ids, positions, q, scale, out, work, i, t, h)


# ---------------------------------------------------------------------------------------------------------------
# The cache object: host-side plan and validation; the compiled work goes to the backend's twin functions.
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One planned forward step: ``T`` new tokens for each sequence in ``seq_ids``.

    positions[i, t] = length[seq_ids[i]] + t (absolute positions); slots[i, t] = where they are stored.
    ``version`` ties the step to the one cache, in the one state, it was planned against (versions are unique
    across caches, so a Step from another cache is rejected too).
    """

    seq_ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    version: int

    @property
    def num_tokens(self):
        """T, new tokens per sequence in this step."""
        return self.positions.shape[1]


#: every state change of every cache draws a new version, so a Step fits exactly one cache in one state
_VERSIONS = itertools.count(1)


class FlatCache:
    """A contiguous KV cache for a batch of sequences with their own lengths.

    shape:      CacheShape (layers, q_heads, kv_heads, head_dim, dtype float32|float16)
    batch:      number of sequences (rows)
    max_tokens: slots per sequence
    backend:    "python" (the spec as plain Python), "cpu" (numba.njit) or "cuda" (numba.cuda kernels)

    Use per step::

        step = cache.plan(num_tokens)              # validates; raises CacheOverflowError before any change
        for layer in range(shape.layers):
            cache.write(step, layer, k, v)         # k, v: (n_seq, T, kv_heads, head_dim)
            o = cache.attend(step, layer, q)       # q: (n_seq, T, q_heads, head_dim) float32
        cache.advance(step)
    """

    variant = "flat"

    def __init__(self, shape, batch=1, max_tokens=2048, backend="cpu"):
        if not isinstance(shape, CacheShape):
            raise ShapeError("shape", "a kvref.CacheShape", type(shape).__name__)
        check_positive_int("batch", batch)
        check_positive_int("max_tokens", max_tokens)
        from .backends import backend_ops

        self.shape = shape
        self.batch = int(batch)
        self.max_tokens = int(max_tokens)
        self.backend = backend
        self._ops = backend_ops("flat", backend)
        self._kv = self._ops.zeros(buffer_dims(shape, self.batch, self.max_tokens), shape.storage_dtype)
        self._lengths = np.zeros(self.batch, np.int64)
        self._version = next(_VERSIONS)

    # --- reading the state ---------------------------------------------------------------------------------
    @property
    def kv(self):
        """The storage array (layers, 2, batch, kv_heads, max_tokens, head_dim) as NumPy: a read-only view on the
        host backends, a copy for CUDA. Only write() changes the cache."""
        view = self._ops.to_host(self._kv).view()
        view.setflags(write=False)
        return view

    @property
    def lengths(self):
        """Tokens stored per sequence (a copy)."""
        return self._lengths.copy()

    @property
    def nbytes(self):
        """Bytes of K/V storage actually allocated (the metadata is a few bytes per sequence)."""
        return int(self._kv.nbytes)

    def get_seq_length(self, seq=0):
        """Tokens stored for sequence ``seq``."""
        check_index("seq", seq, self.batch)
        return int(self._lengths[seq])

    def get_max_cache_shape(self):
        """Capacity of one sequence in tokens (``max_tokens``)."""
        return self.max_tokens

    def remaining_capacity(self, seq=0):
        """Tokens sequence ``seq`` can still take: max_tokens - length."""
        return self.max_tokens - self.get_seq_length(seq)

    def is_full(self, seq=0):
        """True when sequence ``seq`` has no free slot."""
        return self.remaining_capacity(seq) == 0

    def keys(self, layer, seq=0):
        """Stored keys of one layer and sequence: (kv_heads, length, head_dim) in the cache's dtype (a copy)."""
        return self._stored(layer, seq, 0)

    def values(self, layer, seq=0):
        """Stored values of one layer and sequence: (kv_heads, length, head_dim) (a copy)."""
        return self._stored(layer, seq, 1)

    def _stored(self, layer, seq, kv_index):
        check_index("layer", layer, self.shape.layers)
        check_index("seq", seq, self.batch)
        n = int(self._lengths[seq])
        rows = np.array(self._ops.to_host(self._kv[layer, kv_index, seq])[:, :n])
        return rows.view(self.shape.public_dtype)

    def stats(self):
        """A dict describing the cache: capacity, use, bytes, dtype and layout."""
        used = int(self._lengths.sum())
        capacity = self.batch * self.max_tokens
        token_bytes = 2 * self.shape.layers * self.shape.kv_heads * self.shape.head_dim * self.shape.element_bytes
        return {
            "variant": self.variant,
            "backend": self.backend,
            "layout": "head_major",
            "dtype": self.shape.dtype,
            "element_bytes": self.shape.element_bytes,
            "batch": self.batch,
            "max_tokens": self.max_tokens,
            "lengths": self._lengths.tolist(),
            "tokens_used": used,
            "tokens_capacity": capacity,
            "utilization": used / capacity,
            "bytes_per_token": token_bytes,
            "bytes_used": used * token_bytes,
            "nbytes": self.nbytes,
        }

    def state(self):
        """A deep snapshot of everything the cache holds (for tests: equal snapshots = identical caches)."""
        return {"kv": self.kv.copy(), "lengths": self._lengths.copy(), "version": self._version}

    # --- planning and running a step -------------------------------------------------------------------------
    def _seq_ids(self, seq_ids):
        if seq_ids is None:
            return np.arange(self.batch, dtype=np.int64)
        ids = np.asarray(seq_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ShapeError("seq_ids", "a non-empty 1-D sequence of integers", repr(seq_ids))
        for s in ids.tolist():
            check_index("seq_ids", s, self.batch)
        if len(set(ids.tolist())) != ids.size:
            raise ShapeError("seq_ids", "distinct sequence indices", ids.tolist())
        return ids.astype(np.int64)

    def plan(self, num_tokens=1, seq_ids=None):
        """Plan a step of ``num_tokens`` new tokens for each sequence in ``seq_ids`` (default: all).

        Raises CacheOverflowError if any sequence would exceed ``max_tokens``; the cache is not changed either way.
        """
        check_positive_int("num_tokens", num_tokens)
        ids = self._seq_ids(seq_ids).copy()
        for s in ids.tolist():
            if int(self._lengths[s]) + int(num_tokens) > self.max_tokens:  # Python ints: no int64 wrap-around
                raise CacheOverflowError(
                    "num_tokens", f"<= remaining capacity {self.max_tokens - self._lengths[s]} of sequence {s}",
                    num_tokens, detail="nothing was written")
        positions = self._lengths[ids][:, None] + np.arange(num_tokens, dtype=np.int64)[None, :]
        slots = np.empty_like(positions)
        for i in range(positions.shape[0]):
            for t in range(positions.shape[1]):
                slots[i, t] = flat_slot(positions[i, t])
        for array in (ids, positions, slots):
            array.setflags(write=False)  # a Step is a record of the plan, not something to edit
        return Step(ids, positions, slots, self._version)

    def _check_step(self, step):
        if not isinstance(step, Step):
            raise StaleStepError("step", "a Step from this cache's plan()", type(step).__name__)
        if step.version != self._version:
            raise StaleStepError("step", f"a step planned at cache version {self._version}",
                                 f"version {step.version}", detail="the cache changed since plan(); plan again")
        fresh = self.plan(step.num_tokens, step.seq_ids)  # re-validates the sequences and the capacity
        if not (np.array_equal(fresh.positions, step.positions) and np.array_equal(fresh.slots, step.slots)):
            raise StaleStepError("step", "the positions and slots that plan() returned", "edited arrays")

    def _check_array(self, name, a, dims, dtype):
        if not isinstance(a, np.ndarray) and not self._ops.is_device_array(a):
            raise DTypeError(name, "a NumPy array", type(a).__name__)
        if tuple(a.shape) != tuple(dims):
            raise ShapeError(name, f"shape {tuple(dims)}", tuple(a.shape))
        if np.dtype(a.dtype) != np.dtype(dtype):
            raise DTypeError(name, f"dtype {np.dtype(dtype).name}", np.dtype(a.dtype).name)

    def write(self, step, layer, k_new, v_new):
        """Write one layer's new K and V, each (n_seq, T, kv_heads, head_dim) in the cache's dtype."""
        self._check_step(step)
        check_index("layer", layer, self.shape.layers)
        dims = (step.seq_ids.size, step.num_tokens, self.shape.kv_heads, self.shape.head_dim)
        self._check_array("k_new", k_new, dims, self.shape.public_dtype)
        self._check_array("v_new", v_new, dims, self.shape.public_dtype)
        k_store = self._ops.as_storage(k_new, self.shape.storage_dtype)
        v_store = self._ops.as_storage(v_new, self.shape.storage_dtype)
        self._ops.write_tokens(self._kv, layer, step.seq_ids, step.slots, k_store, v_store)

    def attend(self, step, layer, q, scale=None, out=None):
        """Attention output of one layer for the step's tokens: (n_seq, T, q_heads, head_dim) float32.

        The step's own K/V must have been written for this layer. ``scale`` defaults to 1/sqrt(head_dim).
        """
        self._check_step(step)
        check_index("layer", layer, self.shape.layers)
        dims = (step.seq_ids.size, step.num_tokens, self.shape.q_heads, self.shape.head_dim)
        self._check_array("q", q, dims, np.float32)
        if out is None:
            out = np.empty(dims, np.float32)
        else:
            self._check_array("out", out, dims, np.float32)
            if isinstance(out, np.ndarray) and isinstance(q, np.ndarray) and np.shares_memory(out, q):
                raise ShapeError("out", "an array that does not overlap q", "an array sharing memory with q")
        scale = default_scale(self.shape.head_dim) if scale is None else np.float32(scale)
        self._ops.attend_tokens(self._kv, layer, step.seq_ids, step.positions, q, scale, out)
        return out

    def advance(self, step):
        """Commit the step: ``length[seq] += T`` for its sequences. Call once, after every layer was written."""
        self._check_step(step)
        self._lengths[step.seq_ids] = step.positions[:, -1] + 1
        self._version = next(_VERSIONS)

    def append(self, k_new, v_new, seq_ids=None):
        """Write all layers of a step at once and advance: k_new, v_new are (layers, n_seq, T, kv_heads, head_dim).

        Validates every layer before writing any, so a bad call changes nothing.
        """
        if not isinstance(k_new, np.ndarray) or k_new.ndim != 5:
            raise ShapeError("k_new", "a 5-D array (layers, n_seq, T, kv_heads, head_dim)",
                             getattr(k_new, "shape", type(k_new).__name__))
        ids = self._seq_ids(seq_ids)
        step = self.plan(k_new.shape[2], ids)
        dims = (self.shape.layers, ids.size, step.num_tokens, self.shape.kv_heads, self.shape.head_dim)
        self._check_array("k_new", k_new, dims, self.shape.public_dtype)
        self._check_array("v_new", v_new, dims, self.shape.public_dtype)
        for layer in range(self.shape.layers):
            self.write(step, layer, k_new[layer], v_new[layer])
        self.advance(step)
        return step

    # --- shrinking ------------------------------------------------------------------------------------------
    def reset(self, seq=None):
        """Forget every token (or those of sequence ``seq``). O(1): only lengths change; no slot is zeroed."""
        if seq is None:
            self._lengths[:] = 0
        else:
            check_index("seq", seq, self.batch)
            self._lengths[seq] = 0
        self._version = next(_VERSIONS)

    def crop(self, max_length, seq=None):
        """Keep the first ``max_length`` tokens (Hugging Face semantics: a negative value drops that many).

        A sequence already shorter than the target keeps its length.
        """
        if isinstance(max_length, (bool, np.bool_)) or not isinstance(max_length, (int, np.integer)):
            raise ShapeError("max_length", "an integer", repr(max_length))
        max_length = int(max_length)  # a Python int: NumPy's small integer types would overflow below
        seqs = range(self.batch) if seq is None else [seq]
        if seq is not None:
            check_index("seq", seq, self.batch)
        targets = {}
        for s in seqs:
            target = max_length if max_length >= 0 else int(self._lengths[s]) + max_length
            if target < 0:
                raise IndexOutOfRangeError("max_length", f">= -{int(self._lengths[s])} for sequence {s}",
                                           max_length)
            targets[s] = min(target, int(self._lengths[s]))
        for s, target in targets.items():
            self._lengths[s] = target
        self._version = next(_VERSIONS)
