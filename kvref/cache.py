"""Host-side bookkeeping every cache variant shares: validation, the Step record, lengths and versions.

Nothing here is an algorithm. A variant's file (``kvref/flat.py``, ``kvref/ring.py``) holds its addressing, write and
attend spec functions and a small subclass of :class:`CacheBase` that plans steps and calls its backend. This module
holds what would otherwise be repeated in each subclass: checking arguments (so that a bad call raises a clear
:mod:`kvref.errors` exception *before* anything changes), the read-only views of the state, and the version counter
that makes a Step valid for exactly one cache in one state.
"""

import itertools
from dataclasses import dataclass

import numpy as np

from .attention import default_scale
from .errors import DTypeError, ShapeError, StaleStepError
from .shapes import CacheShape, buffer_dims, check_index, check_positive_int


@dataclass(frozen=True)
class Step:
    """One planned forward step: ``T`` new tokens for each sequence in ``seq_ids``.

    positions[i, t] = length[seq_ids[i]] + t (absolute positions); slots[i, t] = where they are stored (-1: the token
    is not stored, e.g. a ring slot that a later token of the same step takes).
    ``version`` ties the step to the one cache, in the one state, it was planned against (versions are unique
    across caches, so a Step from another cache is rejected too).
    ``deferred`` (ring cache only): the step's K/V are held aside until ``advance``, because writing them at once
    would overwrite keys that the step's own earlier queries still need (see ``kvref/ring.py``).
    ``tiers`` (two-tier cache only): (n_seq, 3) int64, per sequence the tokens already migrated before the step,
    the migrated count after it and the evicted count after it (see ``kvref/two_tier.py``).
    ``tables``, ``starts``, ``copies`` (pooled cache only): the step's sequences' block tables and first held
    positions after the step, and the (source, destination) block copies of copy-on-write (see ``kvref/pooled.py``).
    """

    seq_ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    version: int
    deferred: bool = False
    tiers: np.ndarray = None
    tables: np.ndarray = None
    starts: np.ndarray = None
    copies: np.ndarray = None

    @property
    def num_tokens(self):
        """T, new tokens per sequence in this step."""
        return self.positions.shape[1]


#: every state change of every cache draws a new version, so a Step fits exactly one cache in one state
_VERSIONS = itertools.count(1)


def next_version():
    """A version number no cache has used yet."""
    return next(_VERSIONS)


def freeze(*arrays):
    """Make the arrays of a plan read-only: a Step is a record of the plan, not something to edit."""
    for array in arrays:
        array.setflags(write=False)


class CacheBase:
    """What every cache object shares. Subclasses set ``variant`` and implement ``plan``, ``write``, ``attend``,
    ``advance``, ``reset``, ``crop`` and ``_stored``.

    Storage is ``kv[layer, 0=K|1=V, seq, kv_head, slot, dim]`` (head-major, see :mod:`kvref.shapes`) with
    ``slots`` slots per sequence, on the backend's device.
    """

    variant = None

    def __init__(self, shape, batch, slots, backend, storage_dims=None):
        if not isinstance(shape, CacheShape):
            raise ShapeError("shape", "a kvref.CacheShape", type(shape).__name__)
        check_positive_int("batch", batch)
        from .backends import backend_ops

        self.shape = shape
        self.batch = int(batch)
        self.backend = backend
        self._ops = backend_ops(self.variant, backend)
        dims = buffer_dims(shape, self.batch, int(slots)) if storage_dims is None else storage_dims
        self._kv = self._ops.zeros(dims, shape.storage_dtype)
        self._lengths = np.zeros(self.batch, np.int64)
        self._version = next_version()
        # a step whose K/V are held aside between write() and advance() (ring: deferred steps; two-tier: every step)
        self._step_key = None  # (version, seq_ids, T) of the step being written
        self._written = set()  # layers written for that step
        self._pending = {}  # layer -> (k, v) held aside, in the storage dtype

    # --- reading the state ---------------------------------------------------------------------------------
    @property
    def kv(self):
        """The storage array (layers, 2, batch, kv_heads, slots, head_dim) as NumPy: a read-only view on the
        host backends, a copy for CUDA. Only write() changes the cache."""
        view = self._ops.to_host(self._kv).view()
        view.setflags(write=False)
        return view

    @property
    def lengths(self):
        """Tokens seen per sequence (a copy)."""
        return self._lengths.copy()

    @property
    def nbytes(self):
        """Bytes of K/V storage actually allocated (metadata such as lengths and slot positions is not counted)."""
        return int(self._kv.nbytes)

    @property
    def token_bytes(self):
        """Bytes one token occupies over all layers: 2 (K and V) * layers * kv_heads * head_dim * element_bytes."""
        s = self.shape
        return 2 * s.layers * s.kv_heads * s.head_dim * s.element_bytes

    def _stats_head(self):
        """The part of ``stats()`` every variant shares: which cache, backend, layout and dtype."""
        return {"variant": self.variant, "backend": self.backend, "layout": "head_major", "dtype": self.shape.dtype,
                "element_bytes": self.shape.element_bytes, "batch": self.batch}

    def get_seq_length(self, seq=0):
        """Tokens seen by sequence ``seq`` (its next token goes to this position)."""
        check_index("seq", seq, self.batch)
        return int(self._lengths[seq])

    def keys(self, layer, seq=0):
        """Stored keys of one layer and sequence in position order: (kv_heads, n, head_dim), the cache's dtype."""
        return self._stored(layer, seq, 0)

    def values(self, layer, seq=0):
        """Stored values of one layer and sequence in position order: (kv_heads, n, head_dim) (a copy)."""
        return self._stored(layer, seq, 1)

    def _rows(self, layer, seq, kv_index, slots):
        """Rows ``slots`` of one layer/sequence/K-or-V as a (kv_heads, len(slots), head_dim) copy in the public dtype."""
        rows = np.array(self._ops.to_host(self._kv[layer, kv_index, seq])[:, slots])
        return rows.view(self.shape.public_dtype)

    # --- argument checks ------------------------------------------------------------------------------------
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

    def _check_step(self, step):
        """The step must come from this cache's plan() in its current state, unedited."""
        if not isinstance(step, Step):
            raise StaleStepError("step", "a Step from this cache's plan()", type(step).__name__)
        if step.version != self._version:
            raise StaleStepError("step", f"a step planned at cache version {self._version}",
                                 f"version {step.version}", detail="the cache changed since plan(); plan again")
        fresh = self.plan(step.num_tokens, step.seq_ids)  # re-validates the sequences and the capacity
        same = fresh.deferred == step.deferred
        for name in ("seq_ids", "positions", "slots", "tiers", "tables", "starts", "copies"):
            a, b = getattr(fresh, name), getattr(step, name)
            same = same and ((a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b)))
        if not same:
            raise StaleStepError("step", "the positions and slots that plan() returned", "edited arrays")

    def _check_array(self, name, a, dims, dtype):
        if not isinstance(a, np.ndarray) and not self._ops.is_device_array(a):
            raise DTypeError(name, "a NumPy array", type(a).__name__)
        if tuple(a.shape) != tuple(dims):
            raise ShapeError(name, f"shape {tuple(dims)}", tuple(a.shape))
        if np.dtype(a.dtype) != np.dtype(dtype):
            raise DTypeError(name, f"dtype {np.dtype(dtype).name}", np.dtype(a.dtype).name)

    def _check_kv(self, step, layer, k_new, v_new):
        """Checks of write(): step, layer, and k_new/v_new of shape (n_seq, T, kv_heads, head_dim) in the cache's
        dtype. Returns them as storage arrays (fp16 as uint16 bits, zero-copy)."""
        self._check_step(step)
        check_index("layer", layer, self.shape.layers)
        dims = (step.seq_ids.size, step.num_tokens, self.shape.kv_heads, self.shape.head_dim)
        self._check_array("k_new", k_new, dims, self.shape.public_dtype)
        self._check_array("v_new", v_new, dims, self.shape.public_dtype)
        return (self._ops.as_storage(k_new, self.shape.storage_dtype),
                self._ops.as_storage(v_new, self.shape.storage_dtype))

    def _check_query(self, step, layer, q, scale, out):
        """Checks of attend(): q and out (n_seq, T, q_heads, head_dim) float32, out not overlapping q. Returns
        (out, scale) with out allocated and scale defaulted to 1/sqrt(head_dim)."""
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
        return out, scale

    def _check_crop_target(self, max_length):
        if isinstance(max_length, (bool, np.bool_)) or not isinstance(max_length, (int, np.integer)):
            raise ShapeError("max_length", "an integer", repr(max_length))
        return int(max_length)  # a Python int: NumPy's small integer types would overflow in arithmetic

    # --- steps written layer by layer ---------------------------------------------------------------------------
    def _track(self, step):
        """Start tracking a step's writes (layers written, held-aside K/V) if it is not the one being tracked."""
        key = (step.version, tuple(step.seq_ids.tolist()), step.num_tokens)
        if key != self._step_key:
            self._step_key = key
            self._written = set()
            self._pending = {}

    def _pending_snapshot(self):
        """Host copies of the held-aside K/V (for ``state()``)."""
        return {layer: (self._ops.to_host(k).copy(), self._ops.to_host(v).copy())
                for layer, (k, v) in self._pending.items()}

    def _check_written(self, step, layers, action):
        key = (step.version, tuple(step.seq_ids.tolist()), step.num_tokens)
        missing = [layer for layer in layers if key != self._step_key or layer not in self._written]
        if missing:
            raise StaleStepError("step", f"layer(s) {missing} written for this step before {action}",
                                 "not written", detail="call write(step, layer, k, v) first")

    def _bump(self):
        """The state changed: every Step planned before is now stale."""
        self._version = next_version()

    # --- a whole step at once --------------------------------------------------------------------------------
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
