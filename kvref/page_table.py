"""Page tables in the formats of FlashInfer and vLLM, built from the pooled cache's books, and a validator.

``../shared/reference/peer_systems.md`` A2-A3 has the sources:

- FlashInfer, CSR over pages (:func:`flashinfer_page_table`): ``kv_indptr`` (n + 1,) int32, ``kv_indices``
  (kv_indptr[-1],) int32, each sequence's pages in order, and ``kv_last_page_len`` (n,) int32 with
  ``0 < last_page_len <= page_size``, so that ``length = page_size * (pages - 1) + last_page_len``. FlashInfer's
  kernels do not check these invariants; :func:`validate_page_table` does, on any page table.
- vLLM: ``slot_mapping``, the slot ``block * B + offset`` of each new token of a step (a Step's ``slots``), and
  ``block_tables`` (n, max_blocks) int32 padded with -1, plus ``seq_lens`` (:func:`vllm_block_tables`).

With eviction a sequence's page list starts at its first held block; if e is not a multiple of B, that page's first
``e % B`` rows are evicted tokens, which FlashInfer (it has no start offset) would attend to.
"""

import numpy as np

from .errors import PageTableError, ShapeError

__all__ = ["flashinfer_page_table", "validate_page_table", "vllm_block_tables"]


def flashinfer_page_table(books, seq_ids, block_size):
    """FlashInfer's paged-KV description of sequences ``seq_ids`` (each holding at least one token: FlashInfer
    requires 0 < last_page_len): a dict of int32 arrays ``kv_indptr``, ``kv_indices``, ``kv_last_page_len``, plus
    ``page_size``."""
    indptr, indices, last = [0], [], []
    for s in seq_ids:
        length = int(books.lengths[s])
        if length == int(books.starts[s]):
            raise ShapeError("seq_ids", "sequences holding at least one token", f"sequence {s} holds none")
        indices.extend(int(b) for b in books.tables[s, :books.held_blocks(s, block_size)])
        indptr.append(len(indices))
        last.append(length - (-(-length // block_size) - 1) * block_size)
    return {"kv_indptr": np.array(indptr, np.int32), "kv_indices": np.array(indices, np.int32),
            "kv_last_page_len": np.array(last, np.int32), "page_size": block_size}


def vllm_block_tables(books, seq_ids):
    """vLLM's ``block_tables`` (n, max_blocks) int32 padded with -1 and ``seq_lens`` (n,) int32 (without eviction;
    with eviction, column c is logical block e // B + c)."""
    return books.tables[seq_ids].astype(np.int32), books.lengths[seq_ids].astype(np.int32)


def validate_page_table(kv_indptr, kv_indices, kv_last_page_len, page_size, num_pages=None, seq_lens=None):
    """Check FlashInfer's page-table invariants (its kernels do not); returns the sequence lengths (int64).

    - the three arrays are 1-D int32 (FlashInfer: "int64 can cause indexing errors");
    - len(kv_indptr) = n + 1 = len(kv_last_page_len) + 1, kv_indptr[0] = 0, non-decreasing, kv_indptr[-1] =
      len(kv_indices);
    - every sequence has at least one page, and ``0 < kv_last_page_len[i] <= page_size``;
    - page ids are in [0, num_pages) (>= 0 when num_pages is not given), and a sequence lists a page at most once;
    - with ``seq_lens``: ``page_size * (pages_i - 1) + kv_last_page_len[i] == seq_lens[i]``.

    Raises :class:`kvref.errors.PageTableError` naming the array, the expected and the actual value.
    """
    arrays = {"kv_indptr": kv_indptr, "kv_indices": kv_indices, "kv_last_page_len": kv_last_page_len}
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray) or a.ndim != 1:
            raise PageTableError(name, "a 1-D NumPy array", getattr(a, "shape", type(a).__name__))
        if a.dtype != np.int32:
            raise PageTableError(name, "dtype int32", a.dtype.name)
    if isinstance(page_size, (bool, np.bool_)) or not isinstance(page_size, (int, np.integer)) or page_size < 1:
        raise PageTableError("page_size", "an integer >= 1", repr(page_size))
    n = kv_last_page_len.size
    if kv_indptr.size != n + 1:
        raise PageTableError("kv_indptr", f"length len(kv_last_page_len) + 1 = {n + 1}", kv_indptr.size)
    if kv_indptr[0] != 0:
        raise PageTableError("kv_indptr", "kv_indptr[0] == 0", int(kv_indptr[0]))
    pages = np.diff(kv_indptr.astype(np.int64))
    if np.any(pages < 0):
        i = int(np.flatnonzero(pages < 0)[0])
        raise PageTableError("kv_indptr", "non-decreasing entries", f"kv_indptr[{i + 1}] < kv_indptr[{i}]")
    if kv_indptr[-1] != kv_indices.size:
        raise PageTableError("kv_indptr", f"kv_indptr[-1] == len(kv_indices) = {kv_indices.size}", int(kv_indptr[-1]))
    if np.any(pages == 0):
        i = int(np.flatnonzero(pages == 0)[0])
        raise PageTableError("kv_indptr", "at least one page per sequence", f"sequence {i} with 0 pages")
    bad = np.flatnonzero((kv_last_page_len < 1) | (kv_last_page_len > page_size))
    if bad.size:
        i = int(bad[0])
        raise PageTableError("kv_last_page_len", f"0 < last_page_len <= page_size={page_size}",
                             f"{int(kv_last_page_len[i])} for sequence {i}")
    upper = np.iinfo(np.int32).max if num_pages is None else num_pages
    bad = np.flatnonzero((kv_indices < 0) | (kv_indices >= upper))
    if bad.size:
        i = int(bad[0])
        raise PageTableError("kv_indices", f"page ids in [0, {upper})", f"kv_indices[{i}] = {int(kv_indices[i])}")
    for i in range(n):
        own = kv_indices[kv_indptr[i]:kv_indptr[i + 1]]
        if np.unique(own).size != own.size:
            raise PageTableError("kv_indices", "each page at most once per sequence", f"a repeated page in sequence {i}")
    lengths = page_size * (pages - 1) + kv_last_page_len.astype(np.int64)
    if seq_lens is not None:
        seq_lens = np.asarray(seq_lens)
        if seq_lens.shape != (n,) or not np.array_equal(seq_lens, lengths):
            raise PageTableError("seq_lens", f"page_size * (pages - 1) + last_page_len = {lengths.tolist()}",
                                 np.asarray(seq_lens).tolist())
    return lengths
