"""Golden vectors: a versioned, language-neutral suite that checks any KV-cache kernel or cache against kvref.

* ``python -m kvref.golden write DIR [--size large]`` writes a suite; ``golden/v1/`` is the committed one.
* ``python -m kvref.golden check DIR --impl module:object`` runs an implementation on every case it supports and
  prints a table; the exit status is non-zero on any failure.
* ``python -m kvref.golden list DIR`` and ``show DIR CASE`` describe the cases.

The file format and the calling convention are in ``docs/golden-format.md``; :func:`compare` is
:func:`kvref.check.compare`.
"""

from ..check import Comparison, compare
from .format import FORMAT, FORMAT_VERSION, SuiteError, load_case, read_manifest

__all__ = ["Comparison", "FORMAT", "FORMAT_VERSION", "SuiteError", "compare", "load_case", "read_manifest"]
