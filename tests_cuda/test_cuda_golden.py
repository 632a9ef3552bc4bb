"""kvref's cuda backend against the committed golden suite (golden/v1): the check a kernel author runs with
``python -m kvref.golden check golden/v1 --impl ...``, here with kvref's own CUDA kernels (in the simulator in CI,
about 25 s for the whole suite; on a GPU with KVREF_CUDA=gpu). kvref has no dense-attention CUDA kernel, so the
dense attention cases are skipped; every cache, paged-attention and quantization case must pass.
"""

from pathlib import Path

import pytest

from kvref.golden import read_manifest
from kvref.golden.impl import Kvref
from kvref.golden.run import check_suite, format_table

SUITE = Path(__file__).resolve().parents[1] / "golden" / "v1"
CASES = read_manifest(SUITE)["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_cuda_backend_passes_the_golden_case(case):
    _, (result,) = check_suite(SUITE, Kvref("cuda"), names=[case["name"]])
    if case["kind"] == "attention":
        assert result.status == "skip" and "no method attention" in result.skipped
    else:
        assert result.status == "ok", format_table([result])
        assert not result.not_provided  # logical, physical and attention output were all compared
