"""The golden suite's files: one folder, ``manifest.json`` plus one ``.safetensors`` file per case.

``docs/golden-format.md`` describes the format for readers in any language; this module writes and reads it.

* A case file is plain safetensors: an 8-byte little-endian header length N, N bytes of JSON (each tensor's dtype,
  shape and ``data_offsets``, plus ``__metadata__`` = {"format": "kvref-golden 1"}), then the raw little-endian
  bytes. It is written by the ``safetensors`` package, which orders the tensors by dtype size and name, so the same
  tensors always give the same bytes. (It is given exactly one metadata key: safetensors writes a metadata map of
  several keys in a random order.)
* ``manifest.json`` is written with sorted keys and a fixed indent, so it too is byte-identical from run to run.
* Each case in the manifest carries the sha256 of its file; :func:`load_case` refuses a file whose hash differs,
  and :func:`read_manifest` a manifest of another format or version.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import KVCacheError

#: the format's name and version, written into every manifest and case file
FORMAT = "kvref-golden"
FORMAT_VERSION = 1
#: the one metadata entry of every case file
FILE_METADATA = {"format": f"{FORMAT} {FORMAT_VERSION}"}
#: safetensors dtype name of each NumPy dtype a suite uses
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "uint8": "U8"}


class SuiteError(KVCacheError):
    """A suite folder that cannot be checked: missing or unreadable file, wrong format or version, wrong sha256, a
    case name it does not have. Names the file (or argument), the expected and the actual value."""


def sha256_file(path):
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def case_bytes(tensors):
    """The bytes of one case file: ``tensors`` (name -> NumPy array of a dtype in :data:`SAFETENSORS_DTYPES`)."""
    from safetensors.numpy import save

    for name, a in tensors.items():
        if a.dtype.name not in SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name}: dtype {a.dtype} is not one of {sorted(SAFETENSORS_DTYPES)}")
    return save({name: np.ascontiguousarray(a) for name, a in tensors.items()}, metadata=FILE_METADATA)


def manifest_bytes(manifest):
    """The bytes of ``manifest.json``: sorted keys, two-space indent, a final newline."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def read_manifest(folder):
    """The manifest of the suite in ``folder`` as a dict; SuiteError if it is missing, or of another format or
    version."""
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SuiteError(str(path), "a readable JSON manifest", f"{type(exc).__name__}: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise SuiteError(f"{path} format", repr(FORMAT), repr(manifest.get("format")))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SuiteError(f"{path} format_version", f"{FORMAT_VERSION} (the version this checker reads)",
                         repr(manifest.get("format_version")))
    return manifest


def find_case(manifest, name):
    """The manifest entry of case ``name``; SuiteError listing the names if there is none."""
    for case in manifest["cases"]:
        if case["name"] == name:
            return case
    raise SuiteError("case", f"one of {', '.join(c['name'] for c in manifest['cases'])}", repr(name))


def load_case(folder, case):
    """The tensors of one case (name -> NumPy array), after checking its file's sha256 against the manifest."""
    from safetensors.numpy import load

    path = Path(folder) / case["file"]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SuiteError(str(path), "a readable case file", f"{type(exc).__name__}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != case["sha256"]:
        raise SuiteError(f"{path} sha256", f"{case['sha256']} (the manifest's)", digest,
                         detail="the file changed since the suite was written")
    return load(data)
