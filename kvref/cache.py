"""The one lifecycle every cache variant shares: plan -> write (per layer) -> attend (per layer) -> advance.

Nothing here is an algorithm. A variant's file (``kvref/flat.py``, ``ring.py``, ``two_tier.py``, ``pooled.py``)
holds its addressing, write and attend spec functions and a small subclass of :class:`CacheBase` that fills in the
hooks below. This module holds what every variant does the same way:

* **checking arguments** before anything changes, so a bad call raises a clear :mod:`kvref.errors` exception and
  leaves the cache exactly as it was (sizes that cannot be allocated, too many tokens, wrong arrays, a bad scale);
* **the step rule**: a :class:`Step` fits one cache in one state (a version that every change bumps), and a step's
  layers must be written before they are attended, and all of them before ``advance``;
* ``positions = lengths + arange(T)``, ``reset``, ``crop`` (Hugging Face semantics) and ``append``.

A variant declares its part, like Hugging Face's ``CacheLayerMixin``, with abstract methods::

    _plan(ids, positions)             -> its Step (slots, and whatever else the step needs)
    _write(step, layer, k, v)          store one layer (or hold it aside until advance)
    _attend(step, layer, q, scale, out)
    _commit(step)                      what advance does beyond ``length += T``
    _reset(seqs), _crop(targets)       forget tokens
    _stored(layer, seq, kv_index), get_max_cache_shape(), remaining_capacity(seq), stats(), state()
    _step_bytes_per_token()            what a step holds until advance (the step-size bound); has a default

and may add a guard where it differs (``_check_capacity``, ``_check_crop``, ``_check_values``), as
``DynamicSlidingWindowLayer.crop`` adds its own guard before calling ``super().crop``.
"""

import dataclasses
import functools
import itertools
import math
from abc import ABC, abstractmethod

import numpy as np

from .attention import default_scale
from .errors import (AllocationError, DTypeError, IndexOutOfRangeError, InvalidValueError, ShapeError,
                     StaleStepError)
from .shapes import CacheShape, buffer_dims, check_index, check_positive_int

#: positions stay below 2**31 (llama.cpp's llama_pos is an int32 too): the one limit of a cache that never fills
MAX_POSITIONS = 2**31


@dataclasses.dataclass(frozen=True, eq=False)
class Step:
    """One planned forward step: ``T`` new tokens for each sequence in ``seq_ids``. Each variant extends it with
    the fields its step needs (``FlatStep``, ``RingStep``, ``TwoTierStep``, ``PooledStep``).

    positions[i, t] = length[seq_ids[i]] + t (absolute positions); slots[i, t] = where they are stored (-1: the
    token is not stored, e.g. a ring slot that a later token of the same step takes).
    ``cache_id`` and ``version`` tie the step to the one cache, in the one state, it was planned against.
    """

    seq_ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    cache_id: int
    version: int

    @property
    def num_tokens(self):
        """T, new tokens per sequence in this step."""
        return self.positions.shape[1]


#: every state change of every cache draws a new version, so a Step fits exactly one cache in one state
_VERSIONS = itertools.count(1)
_CACHE_IDS = itertools.count(1)


def next_version():
    """A version number no cache has used yet."""
    return next(_VERSIONS)


def freeze(*arrays):
    """Immutable copies of the arrays of a plan: a Step is a record of the plan, not something to edit.

    Each copy is backed by a ``bytes`` object, so it is read-only and NumPy refuses to make it writeable again
    (``setflags(write=True)`` raises ValueError). With every field immutable and the Step a frozen dataclass, the
    step plan() returned is recognised by the identity of the object and of its fields alone: write, attend and
    advance need neither to re-plan nor to compare its bytes (:meth:`CacheBase._check_step`)."""
    return tuple(np.ndarray(a.shape, a.dtype, a.tobytes()) for a in arrays)


#: how many of the steps planned at one cache version are remembered for the fast check of write/attend/advance
PLANNED_KEPT = 8


def field_objects(step):
    """The objects a Step's fields hold: the same objects (compared with ``is``) = an unedited step, because its
    arrays are immutable (:func:`freeze`)."""
    return tuple(getattr(step, name) for name in step_fields(type(step)))


def same_objects(a, b):
    """True when the two tuples hold the very same objects, position by position."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


@functools.lru_cache(maxsize=None)
def step_fields(step_type):
    """The field names of a Step class (dataclasses.fields, read once per class)."""
    return tuple(field.name for field in dataclasses.fields(step_type))


def type_name(a):
    """``module.Class`` of an object, e.g. ``torch.Tensor`` (what a user passed instead of a NumPy array)."""
    kind = type(a)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__.split('.')[0]}.{kind.__name__}"


def check_integer(name, value):
    """Raise ShapeError unless ``value`` is an integer (not a bool); returns it as a Python int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ShapeError(name, "an integer", repr(value))
    return int(value)  # a Python int: NumPy's small integer types would overflow in arithmetic


def allocate(ops, argument, dims, dtype, fill=0):
    """An array of ``dims`` on the backend, filled with ``fill``; sizes that cannot be allocated raise
    :class:`AllocationError` stating the bytes, before anything is allocated."""
    nbytes = math.prod(int(n) for n in dims) * np.dtype(dtype).itemsize  # Python ints: exact
    limit = ops.memory_limit()
    if nbytes > limit:
        raise AllocationError(argument, f"a size that fits in the {limit} bytes of memory here",
                              f"{nbytes} bytes ({nbytes / 2**30:.4g} GiB) for an array of shape {tuple(dims)}")
    try:
        return ops.full(dims, fill, dtype)
    except (MemoryError, ValueError, OverflowError) as exc:
        raise AllocationError(argument, "a size that can be allocated", f"{nbytes} bytes", detail=str(exc)) from None


class CacheBase(ABC):
    """What every cache object shares (see the module docstring for the hooks a variant fills in).

    Storage is ``kv[layer, 0=K|1=V, seq, kv_head, slot, dim]`` (head-major, see :mod:`kvref.shapes`) with
    ``slots`` slots per sequence, on the backend's device (a variant may give other ``storage_dims``).
    """

    variant = None
    #: the Step record of this variant
    step_type = Step
    #: True where a written step must be advanced before anything else changes (pooled: its writes may already have
    #: gone into blocks that the plan's dry run freed by eviction and handed out again)
    written_step_must_advance = False
    #: True where a step's K/V may be held aside until advance (ring deferred steps, two-tier): that copy counts
    #: toward what a step may hold
    holds_step_aside = False

    def __init__(self, shape, batch, slots, backend, storage_dims=None, size_argument="max_tokens"):
        if not isinstance(shape, CacheShape):
            raise ShapeError("shape", "a kvref.CacheShape", type(shape).__name__)
        check_positive_int("batch", batch)
        from .backends import backend_ops

        self.shape = shape
        self.batch = int(batch)
        self.backend = backend
        self._ops = backend_ops(self.variant, backend)
        dims = buffer_dims(shape, self.batch, int(slots)) if storage_dims is None else storage_dims
        self._memory_limit = self._ops.memory_limit()  # read once (on CUDA it asks the driver)
        self._kv = allocate(self._ops, size_argument, dims, shape.storage_dtype)
        self._lengths = np.zeros(self.batch, np.int64)
        self._id = next(_CACHE_IDS)
        self._version = next_version()
        # the step being written: its key (version, seq_ids, T), the layers written, K/V held aside until advance
        self._step_key = None
        self._written = set()
        self._pending = {}
        # id(step) -> (step, its field objects, its key) of the steps plan() returned in this version
        self._planned = {}

    # --- what a variant declares ----------------------------------------------------------------------------
    @abstractmethod
    def get_max_cache_shape(self):
        """The most tokens one sequence holds (Hugging Face's name)."""

    @abstractmethod
    def remaining_capacity(self, seq=0):
        """Tokens sequence ``seq`` can still take before the cache refuses (or overwrites, or evicts)."""

    @abstractmethod
    def stats(self):
        """A dict describing the cache: use, bytes, dtype, layout."""

    @abstractmethod
    def state(self):
        """A deep snapshot of everything the cache holds (for tests: equal snapshots = identical caches)."""

    @abstractmethod
    def _stored(self, layer, seq, kv_index):
        """Held keys (kv_index 0) or values (1) of one layer and sequence in position order."""

    @abstractmethod
    def _plan(self, ids, positions):
        """The variant's Step for sequences ``ids`` and their new ``positions`` (n_seq, T). Changes nothing."""

    @abstractmethod
    def _write(self, step, layer, k_store, v_store):
        """Store one layer's new K/V (storage dtype), or hold them aside until ``_commit``."""

    @abstractmethod
    def _attend(self, step, layer, q, scale, out):
        """Attention of one layer for the step's tokens into ``out``."""

    @abstractmethod
    def _commit(self, step):
        """What ``advance`` does before ``length += T`` (store held-aside K/V, migrate, take blocks...)."""

    @abstractmethod
    def _reset(self, seqs):
        """Forget every token of ``seqs`` (lengths and the variant's own books)."""

    @abstractmethod
    def _crop(self, targets):
        """Cut each sequence ``s`` of ``targets`` to ``targets[s]`` tokens (already checked)."""

    # guards a variant may add (the defaults accept)
    def _check_capacity(self, ids, num_tokens):
        """Refuse a step the variant cannot hold (flat: overflow; pooled: more than max_tokens). Changes nothing."""

    def _check_crop(self, seq, length, target, max_length):
        """Refuse a crop the variant cannot do exactly (ring: wrapped; two-tier: evicted)."""

    def _check_values(self, name, a):
        """Refuse values the variant cannot store (two-tier: NaN/inf cannot be quantized)."""

    def _first_held(self, seq):
        """The first position sequence ``seq`` holds (pooled eviction moves it; a crop cannot go below it)."""
        return 0

    def _step_bytes_per_token(self):
        """Bytes a step holds per new token until advance: the plan's arrays (positions, slots, ...: int64) and, where
        the variant holds the K/V aside (ring deferred steps, two-tier), a copy of them for every layer."""
        return 3 * 8 + (self.token_bytes if self.holds_step_aside else 0)

    # --- reading the state ---------------------------------------------------------------------------------
    @property
    def kv(self):
        """The storage array as NumPy: a read-only view on the host backends, a copy for CUDA. Only write() changes
        the cache."""
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

    def _pending_bytes(self):
        """Bytes of K/V held aside for the step being written."""
        return sum(int(k.nbytes) + int(v.nbytes) for k, v in self._pending.values())

    def _tracking_state(self):
        """The step being written, for ``state()``: its key, the layers written and host copies of held-aside K/V."""
        pending = {layer: (self._ops.to_host(k).copy(), self._ops.to_host(v).copy())
                   for layer, (k, v) in self._pending.items()}
        return {"version": self._version, "step_key": self._step_key, "written": sorted(self._written),
                "pending": pending}

    def get_seq_length(self, seq=0):
        """Tokens seen by sequence ``seq`` (its next token goes to this position)."""
        check_index("seq", seq, self.batch)
        return int(self._lengths[seq])

    def is_full(self, seq=0):
        """True when sequence ``seq`` takes no further token without refusing, overwriting or evicting."""
        return self.remaining_capacity(seq) == 0

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

    def _sequences(self, seq):
        """The sequences a call with ``seq`` touches: every one for None, else ``[seq]`` (checked)."""
        if seq is None:
            return list(range(self.batch))
        check_index("seq", seq, self.batch)
        return [int(seq)]

    def _check_step(self, step):
        """The step must come from this cache's plan() in its current state, unedited: the very object plan()
        returned, holding the very (immutable) arrays it was given, or else a step whose every field equals a fresh
        plan's."""
        if not isinstance(step, Step):
            raise StaleStepError("step", f"a {self.step_type.__name__} from this cache's plan()", type_name(step))
        if step.cache_id != self._id:
            raise StaleStepError("step", "a step planned by this cache",
                                 f"a {type(step).__name__} from another cache", detail="plan it on this cache")
        if step.version != self._version:
            raise StaleStepError("step", f"a step planned at cache version {self._version}",
                                 f"version {step.version}", detail="the cache changed since plan(); plan again")
        if self._as_planned(step) is not None:
            # the very object plan() returned at this version, holding the very (immutable) arrays it was given:
            # nothing to re-plan (the write/attend/advance of every layer used to re-plan here, the most of a step's
            # host time) and nothing to compare
            self._check_not_mid_step("planning another step", self._key(step))
            return
        self._planned.pop(id(step), None)  # an edited step's saved key no longer describes it
        fresh = self.plan(step.num_tokens, step.seq_ids)  # re-validates the sequences and the capacity
        if type(step) is not type(fresh):
            raise StaleStepError("step", f"a {type(fresh).__name__}", type(step).__name__)
        for field in dataclasses.fields(fresh):
            a, b = getattr(fresh, field.name), getattr(step, field.name)
            same = np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
            if not same:
                raise StaleStepError("step", f"the {field.name} that plan() returned", f"edited {field.name}")

    def _check_array(self, name, a, dims, dtype):
        if type(a) is np.ndarray and a.shape == dims and a.dtype == dtype:  # the common case, at once
            return
        if not isinstance(a, np.ndarray) and not self._ops.is_device_array(a):
            raise DTypeError(name, "a NumPy array", type_name(a))
        if tuple(a.shape) != tuple(dims):
            raise ShapeError(name, f"shape {tuple(dims)}", tuple(a.shape))
        given, wanted = np.dtype(a.dtype), np.dtype(dtype)
        if given != wanted:
            if given.newbyteorder("=") == wanted:  # the same type in the other byte order
                raise DTypeError(name, f"dtype {wanted.name} in native byte order",
                                 f"{given.name} {'big' if given.byteorder == '>' else 'little'}-endian "
                                 f"({given.str})")
            raise DTypeError(name, f"dtype {wanted.name}", given.name)

    def _check_kv(self, step, layer, k_new, v_new):
        """Checks of write(): step, layer, and k_new/v_new of shape (n_seq, T, kv_heads, head_dim) in the cache's
        dtype. Returns them as storage arrays (fp16 as uint16 bits, zero-copy)."""
        self._check_step(step)
        check_index("layer", layer, self.shape.layers)
        dims = (step.seq_ids.size, step.num_tokens, self.shape.kv_heads, self.shape.head_dim)
        self._check_array("k_new", k_new, dims, self.shape.public_dtype)
        self._check_array("v_new", v_new, dims, self.shape.public_dtype)
        self._check_values("k_new", k_new)
        self._check_values("v_new", v_new)
        return (self._ops.as_storage(k_new, self.shape.storage_dtype),
                self._ops.as_storage(v_new, self.shape.storage_dtype))

    def _check_scale(self, scale):
        """``scale``: None (1/sqrt(head_dim)) or a finite real number > 0; returns it as float32."""
        if scale is None:
            return default_scale(self.shape.head_dim)
        if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)):
            raise DTypeError("scale", "None or a real number (int or float)", f"{type_name(scale)} {scale!r}")
        value = np.float32(scale)
        if not (math.isfinite(float(value)) and value > 0):
            raise InvalidValueError("scale", "a finite number > 0 (as float32)", repr(scale))
        return value

    def _check_query(self, step, layer, q, scale, out):
        """Checks of attend(): q and out (n_seq, T, q_heads, head_dim) float32, out writeable and not overlapping q.
        Returns (out, scale) with out allocated and scale checked (default 1/sqrt(head_dim))."""
        self._check_step(step)
        check_index("layer", layer, self.shape.layers)
        dims = (step.seq_ids.size, step.num_tokens, self.shape.q_heads, self.shape.head_dim)
        self._check_array("q", q, dims, np.float32)
        scale = self._check_scale(scale)
        if out is None:
            return np.empty(dims, np.float32), scale
        self._check_array("out", out, dims, np.float32)
        if isinstance(out, np.ndarray):
            if not out.flags.writeable:
                raise InvalidValueError("out", "a writeable array", "a read-only array")
            if isinstance(q, np.ndarray) and np.shares_memory(out, q):
                raise ShapeError("out", "an array that does not overlap q", "an array sharing memory with q")
        return out, scale

    def _check_step_size(self, ids, num_tokens):
        """Positions stay below 2**31, and what a step holds until advance must fit in memory: refused with
        IndexOutOfRangeError before anything is allocated."""
        longest = max(int(self._lengths[s]) for s in ids.tolist())
        if longest + num_tokens > MAX_POSITIONS:
            raise IndexOutOfRangeError("num_tokens", f"<= {MAX_POSITIONS - longest} (positions stay below 2**31)",
                                       num_tokens, detail="nothing was changed")
        per_token = ids.size * self._step_bytes_per_token()
        limit = self._memory_limit
        if num_tokens * per_token > limit:
            raise IndexOutOfRangeError(
                "num_tokens", f"<= {limit // per_token} (a step holds {per_token} bytes per token until advance, "
                f"and {limit} bytes of memory are here)", num_tokens, detail="nothing was changed")

    # --- the step being written ----------------------------------------------------------------------------
    def _as_planned(self, step):
        """The saved (step, field objects, key) when ``step`` is the very object plan() returned at this version,
        still holding the very (immutable) arrays it was given; else None."""
        known = self._planned.get(id(step))
        if known is not None and known[0] is step and same_objects(known[1], field_objects(step)):
            return known
        return None

    def _key(self, step):
        """What identifies a step while it is written: (version, seq_ids, T) (kept with a step plan() returned)."""
        known = self._as_planned(step)
        if known is not None:
            return known[2]
        return step.version, tuple(step.seq_ids.tolist()), step.num_tokens

    def _track(self, step):
        """Start tracking a step's writes (layers written, held-aside K/V) if it is not the one being tracked."""
        key = self._key(step)
        if key != self._step_key:
            self._step_key = key
            self._written = set()
            self._pending = {}

    def _check_written(self, step, layers, action):
        key = self._key(step)
        missing = [layer for layer in layers if key != self._step_key or layer not in self._written]
        if missing:
            raise StaleStepError("step", f"layer(s) {missing} written for this step before {action}",
                                 "not written", detail="call write(step, layer, k, v) first")

    def _check_not_mid_step(self, action, key=None):
        """Where a written step must be advanced: after its first write, only that step's own calls (plan, write,
        attend, advance; ``key`` is the planned step's) and a whole ``reset()`` may run; anything else raises
        StaleStepError."""
        if not self.written_step_must_advance:
            return
        mid_step = self._written and self._step_key is not None and self._step_key[0] == self._version
        if mid_step and key != self._step_key:
            raise StaleStepError("step", f"advance() of the step already written before {action}",
                                 "a written step that was not advanced",
                                 detail="a written step must be advanced (or the cache reset)")

    def _end_step(self):
        """The state changed: forget the step being written, and make every Step planned before stale."""
        self._step_key, self._written, self._pending, self._planned = None, set(), {}, {}
        self._version = next_version()

    # --- the lifecycle ---------------------------------------------------------------------------------------
    def plan(self, num_tokens=1, seq_ids=None):
        """Plan a step of ``num_tokens`` new tokens for each sequence in ``seq_ids`` (default: all).

        Validates everything and computes ``positions[i, t] = length[seq_i] + t`` and the slots; the cache is not
        changed. Raises (before any allocation) when the variant cannot take the step.
        """
        check_positive_int("num_tokens", num_tokens)
        num_tokens = int(num_tokens)
        ids = self._seq_ids(seq_ids).copy()
        self._check_capacity(ids, num_tokens)
        self._check_step_size(ids, num_tokens)
        positions = self._lengths[ids][:, None] + np.arange(num_tokens, dtype=np.int64)[None, :]
        step = self._plan(ids, positions)  # its own refusals (overflow, exhaustion) first, as if no step were written
        key = self._key(step)
        self._check_not_mid_step("planning another step", key)
        if len(self._planned) >= PLANNED_KEPT:
            self._planned.pop(next(iter(self._planned)))  # the oldest: a Step planned long ago re-plans to check
        self._planned[id(step)] = (step, field_objects(step), key)
        return step

    def write(self, step, layer, k_new, v_new):
        """Write one layer's new K and V, each (n_seq, T, kv_heads, head_dim) in the cache's dtype."""
        k_store, v_store = self._check_kv(step, layer, k_new, v_new)  # re-plans: refuses another step mid-step
        self._store_layer(step, layer, k_store, v_store)

    def _store_layer(self, step, layer, k_store, v_store):
        """The write of one layer, every check done: store (or hold aside) its K/V and record the layer written."""
        self._track(step)
        self._write(step, layer, k_store, v_store)
        self._written.add(layer)

    def attend(self, step, layer, q, scale=None, out=None):
        """Attention output of one layer for the step's tokens: (n_seq, T, q_heads, head_dim) float32.

        The step's own K/V must have been written for this layer. ``scale`` defaults to 1/sqrt(head_dim).
        """
        out, scale = self._check_query(step, layer, q, scale, out)
        self._check_written(step, [layer], "attend()")
        self._attend(step, layer, q, scale, out)
        return out

    def advance(self, step):
        """Commit the step: ``length[seq] += T`` for its sequences. Every layer must have been written."""
        self._check_step(step)
        self._check_written(step, range(self.shape.layers), "advance()")
        self._commit(step)
        self._lengths[step.seq_ids] = step.positions[:, -1] + 1
        self._end_step()

    def append(self, k_new, v_new, seq_ids=None):
        """Write all layers of a step at once and advance: k_new, v_new are (layers, n_seq, T, kv_heads, head_dim).

        Validates every layer before writing any, so a bad call changes nothing.
        """
        for name, a in (("k_new", k_new), ("v_new", v_new)):
            if not isinstance(a, np.ndarray) and not self._ops.is_device_array(a):
                raise DTypeError(name, "a NumPy array", type_name(a))
            if a.ndim != 5:
                raise ShapeError(name, "a 5-D array (layers, n_seq, T, kv_heads, head_dim)", tuple(a.shape))
        ids = self._seq_ids(seq_ids)
        step = self.plan(k_new.shape[2], ids)
        dims = (self.shape.layers, ids.size, step.num_tokens, self.shape.kv_heads, self.shape.head_dim)
        for name, a in (("k_new", k_new), ("v_new", v_new)):
            self._check_array(name, a, dims, self.shape.public_dtype)
            self._check_values(name, a)
        storage = self.shape.storage_dtype
        for layer in range(self.shape.layers):  # all checked above: each layer is only stored
            self._store_layer(step, layer, self._ops.as_storage(k_new[layer], storage),
                        self._ops.as_storage(v_new[layer], storage))
        self.advance(step)
        return step

    def reset(self, seq=None):
        """Forget every token (or those of sequence ``seq``), and any step being written. Where a written step must
        be advanced, only a whole reset may end it."""
        seqs = self._sequences(seq)
        if seq is not None:
            self._check_not_mid_step("reset(seq)")
        self._reset(seqs)
        self._end_step()

    def crop(self, max_length, seq=None):
        """Keep the first ``max_length`` tokens (Hugging Face semantics: a negative value drops that many).

        A sequence already shorter than the target keeps its length. Every sequence is checked before any changes.
        """
        max_length = check_integer("max_length", max_length)
        targets = {}
        for s in self._sequences(seq):
            length, first = int(self._lengths[s]), self._first_held(s)
            target = max_length if max_length >= 0 else length + max_length
            if target < first:
                raise IndexOutOfRangeError(
                    "max_length", f">= {first} for sequence {s} (its first held position)" if max_length >= 0 else
                    f">= -{length - first} for sequence {s}", max_length)
            target = min(target, length)
            self._check_crop(s, length, target, max_length)
            targets[s] = target
        self._check_not_mid_step("crop")
        self._crop(targets)
        self._end_step()
