"""Cache shapes, model presets and byte offsets.

A KV cache is sized by **KV heads**, not query heads (seed 000 sized a Phi-4 cache with its 40 query heads; the model
has 10 KV heads, so that cache was 4x too large). With grouped-query attention (GQA) every group of
``group_size = q_heads // kv_heads`` query heads shares one K/V head.

Storage layout used by every dense kvref cache (head-major)::

    kv[layer, kv_index, seq, kv_head, slot, dim]      kv_index 0 = K, 1 = V

One buffer holds all layers, K before V inside a layer, so the byte offsets of seed 000 are explicit functions:

    layer_bytes    = 2 * batch * kv_heads * max_tokens * head_dim * element_bytes
    layer_offset   = layer * layer_bytes
    k_offset       = layer_offset
    v_offset       = layer_offset + layer_bytes / 2

Why head-major: decode attention for one KV head reads ``kv[l, 0, s, h, 0:n, :]``, one contiguous run of
``n * head_dim`` elements. Seed 001 used the token-major layout ``[max_tokens, kv_heads, head_dim]``, in which the
same read jumps by ``kv_heads * head_dim`` elements from token to token. Both element-offset formulas are below
(:func:`element_offset`), and the tests check both against NumPy strides.
"""

from dataclasses import dataclass

import numpy as np

from .errors import DTypeError, IndexOutOfRangeError, ShapeError

#: storage dtypes: name -> (element size in bytes, NumPy dtype of the stored array).
#: fp16 is stored as uint16 bit patterns because Numba has no float16 on the CPU.
STORAGE_DTYPES = {
    "float32": (4, np.float32),
    "float16": (2, np.uint16),
}


def check_positive_int(name, value):
    """Raise ShapeError unless ``value`` is an int >= 1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ShapeError(name, "an integer >= 1", repr(value))


def check_index(name, value, upper, what=""):
    """Raise IndexOutOfRangeError unless ``0 <= value < upper`` (and value is an integer); ``what`` says what the
    bound is, e.g. "tokens held by sequence 2"."""
    expected = f"an integer in [0, {upper})" + (f" ({what})" if what else "")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise IndexOutOfRangeError(name, expected, repr(value))
    if not 0 <= value < upper:
        raise IndexOutOfRangeError(name, expected, value)


@dataclass(frozen=True)
class CacheShape:
    """The per-token geometry of a KV cache.

    layers:   number of transformer layers (each has its own K and V)
    q_heads:  query heads (``num_attention_heads``)
    kv_heads: key/value heads (``num_key_value_heads``); must divide q_heads
    head_dim: elements per head (``hidden_size // num_attention_heads`` unless the config says otherwise)
    dtype:    storage dtype, "float32" or "float16"
    """

    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("layers", "q_heads", "kv_heads", "head_dim"):
            check_positive_int(name, getattr(self, name))
        if self.q_heads % self.kv_heads:
            raise ShapeError("kv_heads", f"a divisor of q_heads={self.q_heads}", self.kv_heads)
        if self.dtype not in STORAGE_DTYPES:
            raise DTypeError("dtype", f"one of {sorted(STORAGE_DTYPES)}", repr(self.dtype))

    @property
    def group_size(self):
        """G = q_heads // kv_heads: query heads per KV head (1 for MHA, q_heads for MQA)."""
        return self.q_heads // self.kv_heads

    @property
    def element_bytes(self):
        """Bytes per stored element: 4 for float32, 2 for float16."""
        return STORAGE_DTYPES[self.dtype][0]

    @property
    def storage_dtype(self):
        """NumPy dtype of the stored array (uint16 bit patterns for float16)."""
        return np.dtype(STORAGE_DTYPES[self.dtype][1])

    @property
    def public_dtype(self):
        """NumPy dtype that callers pass in and read out (float16 for a float16 cache)."""
        return np.dtype(self.dtype)

    def with_dtype(self, dtype):
        """The same geometry with another storage dtype."""
        return CacheShape(self.layers, self.q_heads, self.kv_heads, self.head_dim, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Presets. Every number is copied from the model's published config.json on the Hugging Face Hub (named per row).
# head_dim = hidden_size // num_attention_heads unless the config has its own head_dim.
# ---------------------------------------------------------------------------------------------------------------
PRESETS = {
    # openai-community/gpt2: n_layer 12, n_head 12, n_embd 768 (MHA: every head has its own K/V)
    "gpt2": CacheShape(layers=12, q_heads=12, kv_heads=12, head_dim=64),
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0: num_hidden_layers 22, num_attention_heads 32, num_key_value_heads 4,
    # hidden_size 2048 (seed 003's "12 layers, 12 heads" row is wrong)
    "tinyllama-1.1b": CacheShape(layers=22, q_heads=32, kv_heads=4, head_dim=64),
    # meta-llama/Llama-2-7b-hf: num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 32, hidden_size 4096
    "llama-2-7b": CacheShape(layers=32, q_heads=32, kv_heads=32, head_dim=128),
    # meta-llama/Meta-Llama-3-8B: num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 8, hidden_size 4096
    "llama-3-8b": CacheShape(layers=32, q_heads=32, kv_heads=8, head_dim=128),
    # mistralai/Mistral-7B-v0.1: num_hidden_layers 32, num_attention_heads 32, num_key_value_heads 8,
    # hidden_size 4096, sliding_window 4096
    "mistral-7b": CacheShape(layers=32, q_heads=32, kv_heads=8, head_dim=128),
    # microsoft/phi-2: num_hidden_layers 32, num_attention_heads 32, num_key_value_heads null (= 32), hidden_size 2560
    "phi-2": CacheShape(layers=32, q_heads=32, kv_heads=32, head_dim=80),
    # microsoft/phi-4: num_hidden_layers 40, num_attention_heads 40, num_key_value_heads 10, hidden_size 5120
    # (seed 000 sized this model's cache with HEADS = 40)
    "phi-4": CacheShape(layers=40, q_heads=40, kv_heads=10, head_dim=128),
}


def preset(name, dtype="float16"):
    """The CacheShape of a published model, e.g. ``preset("llama-3-8b")``; fp16 storage unless ``dtype`` says."""
    if name not in PRESETS:
        raise ShapeError("name", f"one of {sorted(PRESETS)}", repr(name))
    return PRESETS[name].with_dtype(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Byte offsets (seed 000: every layer must bind its own offset, never offset 0).
# ---------------------------------------------------------------------------------------------------------------
def layer_bytes(shape, batch, max_tokens):
    """Bytes of one layer, K and V: 2 * batch * kv_heads * max_tokens * head_dim * element_bytes."""
    return 2 * batch * shape.kv_heads * max_tokens * shape.head_dim * shape.element_bytes


def layer_offset(shape, batch, max_tokens, layer):
    """Byte offset of ``layer`` in the whole buffer: layer * layer_bytes."""
    check_index("layer", layer, shape.layers)
    return layer * layer_bytes(shape, batch, max_tokens)


def k_offset(shape, batch, max_tokens, layer):
    """Byte offset of layer ``layer``'s K block: K comes first in a layer."""
    return layer_offset(shape, batch, max_tokens, layer)


def v_offset(shape, batch, max_tokens, layer):
    """Byte offset of layer ``layer``'s V block: right after its K block."""
    return layer_offset(shape, batch, max_tokens, layer) + layer_bytes(shape, batch, max_tokens) // 2


LAYOUTS = ("head_major", "token_major")


def buffer_dims(shape, batch, max_tokens, layout="head_major"):
    """Array dimensions of the whole buffer in ``layout``.

    head_major:  (layers, 2, batch, kv_heads, max_tokens, head_dim)   -- kvref's storage
    token_major: (layers, 2, batch, max_tokens, kv_heads, head_dim)   -- seed 001's [max_context, heads, dim] per layer
    """
    if layout == "head_major":
        return (shape.layers, 2, batch, shape.kv_heads, max_tokens, shape.head_dim)
    if layout == "token_major":
        return (shape.layers, 2, batch, max_tokens, shape.kv_heads, shape.head_dim)
    raise ShapeError("layout", f"one of {LAYOUTS}", repr(layout))


def element_offset(shape, batch, max_tokens, layer, kv_index, seq, head, slot, dim, layout="head_major"):
    """Byte offset of one element.

    head_major:  ((((layer*2 + kv)*batch + seq)*kv_heads + head)*max_tokens + slot)*head_dim + dim
    token_major: ((((layer*2 + kv)*batch + seq)*max_tokens + slot)*kv_heads + head)*head_dim + dim

    times ``element_bytes``. Token ``slot`` of one head is ``head_dim`` elements after token ``slot - 1`` in
    head-major order, but ``kv_heads * head_dim`` elements after it in token-major order.
    """
    check_index("layer", layer, shape.layers)
    check_index("kv_index", kv_index, 2)
    check_index("seq", seq, batch)
    check_index("head", head, shape.kv_heads)
    check_index("slot", slot, max_tokens)
    check_index("dim", dim, shape.head_dim)
    block = (layer * 2 + kv_index) * batch + seq
    if layout == "head_major":
        index = ((block * shape.kv_heads + head) * max_tokens + slot) * shape.head_dim + dim
    elif layout == "token_major":
        index = ((block * max_tokens + slot) * shape.kv_heads + head) * shape.head_dim + dim
    else:
        raise ShapeError("layout", f"one of {LAYOUTS}", repr(layout))
    return index * shape.element_bytes
