"""Which backends can run here, and the per-backend operations a cache calls.

A backend is a module with the same function names and argument order for every variant:

    python: kvref.flat            the spec itself, run as plain Python
    cpu:    kvref.cpu.flat        the same functions compiled with numba.njit (+ a prange schedule)
    cuda:   kvref.cuda.flat       CUDA kernels that call the same functions as device functions

``numba.cuda`` is imported only when the cuda backend is asked for, because whether it runs the CUDA simulator is
fixed at ``import numba`` time (``NUMBA_ENABLE_CUDASIM=1``).
"""

import importlib
import os

import numpy as np

from .errors import BackendUnavailableError

NAMES = ("python", "cpu", "cuda")


def _cuda_status():
    try:
        from numba import cuda
    except Exception as exc:  # numba-cuda missing or broken
        return False, f"numba.cuda cannot be imported: {exc}"
    if getattr(cuda, "implementation", None) != "NVIDIA":
        return False, "numba.cuda is numba's deprecated built-in target; install numba-cuda"
    from numba.core import config

    if config.ENABLE_CUDASIM:
        return True, "CUDA simulator (NUMBA_ENABLE_CUDASIM=1): correct but slow, for tests"
    try:
        if cuda.is_available():
            return True, f"GPU: {cuda.get_current_device().name}"
    except Exception as exc:
        return False, f"no usable GPU: {exc}"
    return False, ("no CUDA GPU or driver found; set NUMBA_ENABLE_CUDASIM=1 before importing numba to use the "
                   "simulator")


def backends():
    """``{name: (available, reason)}`` for "python", "cpu" and "cuda"."""
    result = {"python": (True, "the spec run as plain Python: slow, readable, debuggable")}
    try:
        import numba

        result["cpu"] = (True, f"numba {numba.__version__} njit, {numba.config.NUMBA_NUM_THREADS} threads")
    except Exception as exc:
        result["cpu"] = (False, f"numba cannot be imported: {exc}")
    result["cuda"] = _cuda_status()
    return result


class HostOps:
    """Operations for backends whose arrays live in host memory (python, cpu)."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):  # write_tokens, attend_tokens, ... from the backend module
        return getattr(self.module, name)

    @staticmethod
    def zeros(dims, dtype):
        return np.zeros(dims, dtype)

    @staticmethod
    def full(dims, fill, dtype):
        """A new array of ``dims`` filled with ``fill`` (zeros are mapped lazily by the OS)."""
        return np.zeros(dims, dtype) if fill == 0 else np.full(dims, fill, dtype)

    @staticmethod
    def memory_limit():
        """Bytes of memory an allocation may ask for: this machine's physical memory."""
        return host_memory_bytes()

    @staticmethod
    def to_host(a):
        return a

    @staticmethod
    def from_host(a):
        """The backend's array for host array a (the array itself here)."""
        return a

    @staticmethod
    def copy(a):
        """A private copy of a (C-contiguous)."""
        return np.array(a, order="C")

    @staticmethod
    def is_device_array(a):
        return False

    @staticmethod
    def as_storage(a, storage_dtype):
        """float16 arrays become their uint16 bit patterns (zero-copy); others pass through."""
        if a.dtype == storage_dtype and a.flags.c_contiguous:
            return a
        return np.ascontiguousarray(a).view(storage_dtype)


#: host bookkeeping arrays (a pooled cache's block tables) are allocated through this, whatever the backend
HOST = HostOps(None)


def host_memory_bytes():
    """This machine's physical memory in bytes (what no array kvref allocates can exceed)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: assume 1 TiB, NumPy still refuses what fails
        return 2**40


def backend_ops(variant, backend):
    """The operations object for ``variant`` ("flat", ...) on ``backend``; raises if it cannot run here."""
    if backend not in NAMES:
        raise BackendUnavailableError("backend", f"one of {NAMES}", repr(backend))
    if backend == "python":
        return HostOps(importlib.import_module(f"kvref.{variant}"))
    available, reason = backends()[backend]
    if not available:
        raise BackendUnavailableError("backend", f"an available backend", repr(backend), detail=reason)
    if backend == "cpu":
        return HostOps(importlib.import_module(f"kvref.cpu.{variant}"))
    module = importlib.import_module(f"kvref.cuda.{variant}")
    return module.OPS


