"""Shared pytest setup for the CPU test suite.

* puts tests/ on sys.path, so every test module can ``from oracle import ...`` whatever pytest's import mode;
* ``BACKENDS``: the host backends every variant is checked on (CUDA is tested in tests_cuda/);
* ``rng``: a seeded NumPy generator per test.
"""

import os
import sys
import zlib

import numpy as np
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

#: host backends every cache is tested on
BACKENDS = ("python", "cpu")


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's node id: reproducible, different per test."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param
