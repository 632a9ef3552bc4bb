"""The CUDA backend: ``numba.cuda`` kernels that map threads onto the spec functions. Nothing here rewrites an algorithm.

Each ``kvref/cuda/<variant>.py`` computes a thread's indices and calls the very same ``@register_jitable`` spec
functions that ``kvref/<variant>.py`` runs as plain Python and ``kvref/cpu`` compiles with ``numba.njit``; numba-cuda
compiles them as device functions. Each module exposes ``OPS``, the operations object a cache calls (same interface
as :class:`kvref.backends.HostOps`, with device arrays).

**Which numba.cuda.** ``numba.cuda`` must come from the ``numba-cuda`` package (``implementation == "NVIDIA"``).
Without that package, ``from numba import cuda`` silently gives numba's deprecated built-in target
(``implementation == "Built-in"``), which kvref does not support.

**The simulator rule.** Whether ``numba.cuda`` is the CUDA simulator is fixed when ``numba`` is first imported:
set ``NUMBA_ENABLE_CUDASIM=1`` in the environment *before anything imports numba* (kvref itself imports numba).
Setting it later fails with ``CudaSupportError`` at driver initialisation. The simulator and a real GPU cannot be
used in one process, so the CUDA tests (``tests_cuda/``) run in their own pytest process::

    python -m pytest tests_cuda                   # simulator (the default; no GPU needed)
    KVREF_CUDA=gpu python -m pytest tests_cuda    # the same tests on a real GPU

The simulator does no type checking, so passing there proves the thread mapping, not that the kernels compile for
a GPU; ``tests/test_ptx.py`` compiles every kernel to sm_90 PTX (needs ``pip install kvref[cu13]``, no GPU).

This package is imported only when a cache asks for ``backend="cuda"`` (see :mod:`kvref.backends`), so
``import kvref`` never touches ``numba.cuda``.
"""

from numba import cuda

if getattr(cuda, "implementation", None) != "NVIDIA":
    raise ImportError(
        "kvref.cuda needs numba.cuda from the numba-cuda package (cuda.implementation == 'NVIDIA'); found "
        f"{getattr(cuda, 'implementation', 'unknown')!r}, numba's deprecated built-in CUDA target. "
        "Install it with: pip install 'numba-cuda<0.31' (or 'kvref[cu13]' for a CUDA 13 toolchain)")
