"""Setup for the CUDA test suite. Run it in its own pytest process, from the repository root::

    python -m pytest tests_cuda                   # CUDA simulator (the default; no GPU needed)
    KVREF_CUDA=gpu python -m pytest tests_cuda    # the same tests on a real GPU (needs kvref[cu13] and a driver)

Why a separate process: whether ``numba.cuda`` is the simulator is decided once, when ``numba`` is first imported
(``NUMBA_ENABLE_CUDASIM`` is read into ``numba.core.config`` at ``import numba``; setting it later fails with
``CudaSupportError`` at driver initialisation). The simulator and real CUDA cannot share a process, and ``tests/``
imports numba (through kvref) long before any CUDA test would run. So this file sets the variable first thing,
before anything imports numba: pytest imports a directory's conftest.py before that directory's test modules.
"""

import os
import sys

if os.environ.get("KVREF_CUDA", "sim") == "gpu":
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
else:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

# If numba is already imported, the line above came too late and numba.cuda would be whatever the earlier import
# chose (usually the real driver, which fails without a GPU). That happens when a plugin, a root conftest.py or a test
# module collected earlier in the same process (plain `pytest` from the root collects tests/ too) imports kvref/numba.
assert "numba" not in sys.modules, (
    "numba was imported before tests_cuda/conftest.py could choose the CUDA simulator; run the CUDA tests in their "
    "own process: python -m pytest tests_cuda")

from numba import cuda  # noqa: E402  (must come after NUMBA_ENABLE_CUDASIM is set)
from numba.core import config  # noqa: E402

# numba-cuda provides numba.cuda as implementation "NVIDIA"; numba's deprecated built-in target says "Built-in".
assert cuda.implementation == "NVIDIA", (
    f"numba.cuda is {cuda.implementation!r}, not numba-cuda's; pip install 'numba-cuda<0.31'")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import zlib  # noqa: E402

#: True when the kernels run in the CUDA simulator (one Python thread per CUDA thread: keep launches tiny)
ON_SIMULATOR = bool(config.ENABLE_CUDASIM)

# tests/oracle.py holds the independent float64 NumPy references; import it as `oracle`, as tests/ does.
TESTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
if TESTS_DIR not in sys.path:
    sys.path.append(TESTS_DIR)


def pytest_configure(config):
    """Refuse to share a process with other test directories (see the module docstring; also, tests/conftest.py and
    this file are both imported as the module ``conftest``, and ``from conftest import ...`` would get the wrong one);
    with KVREF_CUDA=gpu, stop at once if there is no GPU rather than fail every test."""
    here = os.path.dirname(os.path.abspath(__file__))
    base = str(config.invocation_params.dir)
    outside = [arg for arg in config.args
               if os.path.commonpath([here, os.path.abspath(os.path.join(base, arg.split("::")[0]))]) != here]
    if outside:
        pytest.exit(f"tests_cuda must run in its own pytest process (the CUDA simulator is chosen at numba import); "
                    f"got also {outside}. Run: python -m pytest tests_cuda", returncode=4)
    if not ON_SIMULATOR and not cuda.is_available():
        pytest.exit("KVREF_CUDA=gpu but no usable CUDA GPU/driver here (unset KVREF_CUDA to use the simulator)",
                    returncode=4)


def pytest_report_header(config):
    if ON_SIMULATOR:
        return "kvref CUDA tests: CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
    return f"kvref CUDA tests: GPU {cuda.get_current_device().name}"


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's node id: reproducible, different per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
