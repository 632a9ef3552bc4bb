"""What the compiled targets share: how :func:`kvref.attention.local_array` is lowered (one stack or CUDA
local-memory array), and :class:`Specialisations`, the compiled attention of a variant per compile-time shape.

The spec's ``local_array(shape)`` is ``np.empty(shape, float32)`` in plain Python. Compiled, with every dimension a
compile-time constant (a Numba integer literal), it becomes one ``alloca`` of prod(shape) float32 in the entry
block of the function being compiled (``cgutils.alloca_once``), wrapped as a C-contiguous array with no meminfo
(nothing to free, no reference counting). On the CPU that is the stack; NVVM places an ``alloca`` in CUDA local
memory, which is what ``cuda.local.array`` does. Because LLVM sees where the memory comes from, it knows that the
array aliases no argument: it drops the run-time overlap checks around the vector loops and keeps small blocks of it
in registers (``../shared/reference/grouped_attention_facts.md``, item 1).

``kvref/cpu/fast_math.py`` registers this for ``numba.njit`` and ``kvref/cuda/__init__.py`` for numba-cuda, each
through its target's ``type_callable`` / ``lower_builtin``: a Python-level overload could not return the array in
CUDA (numba-cuda refuses a device function that returns an array it did not receive).
"""

import math

from numba.core import cgutils


def literal_shape(shape):
    """The dimensions of ``shape``, a Numba tuple type, as Python ints when every one is a positive integer
    literal; else None (not a compile-time shape, so no compiled form)."""
    values = [getattr(t, "literal_value", None) for t in getattr(shape, "types", ())]
    if values and all(isinstance(v, int) and v > 0 for v in values):
        return tuple(values)
    return None


def lower_local_array(context, builder, signature, args):
    """Codegen of ``local_array(shape)``: one entry-block alloca of prod(shape) float32 as a C-contiguous array."""
    dims = literal_shape(signature.args[0])
    array_type = signature.return_type
    element = context.get_data_type(array_type.dtype)
    itemsize = context.get_abi_sizeof(element)
    data = cgutils.alloca_once(builder, element, size=math.prod(dims))
    intp = cgutils.intp_t
    strides = [itemsize * math.prod(dims[axis + 1:]) for axis in range(len(dims))]
    array = context.make_array(array_type)(context, builder)
    context.populate_array(array, data=data, shape=[intp(n) for n in dims], strides=[intp(n) for n in strides],
                           itemsize=intp(itemsize), meminfo=None)
    return array._getvalue()


class Specialisations:
    """A variant's compiled attention, one specialisation per compile-time shape, built on first use.

    ``build(*shape)`` returns the compiled functions for one shape (G and D; the pooled cache adds its KV heads).
    It compiles closures (``numba.njit`` functions, CUDA kernels) whose free variables are the shape: Numba freezes a closure variable as a constant, so the
    spec functions they call receive integer *literals*, and ``attention.local_array`` can make its arrays on the
    stack and LLVM can unroll the loops over G (kvref/attention.py, "Specialisation"). Any positive shape can be
    specialised; there is no general fallback path.
    """

    def __init__(self, build):
        self.build = build
        self.built = {}

    def __call__(self, *shape):
        key = tuple(int(n) for n in shape)
        if key not in self.built:
            self.built[key] = self.build(*key)
        return self.built[key]
