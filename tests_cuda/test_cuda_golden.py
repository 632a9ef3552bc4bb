"""kvref's cuda backend against the committed golden suite (golden/v1): the same check a kernel author runs with
``python -m kvref.golden check golden/v1 --impl ...``, here with kvref's own CUDA kernels (the simulator in CI).

In the simulator every CUDA thread is a Python thread, so the cases are a sample that covers every kind and every
cache variant, not the whole suite; on a GPU (KVREF_CUDA=gpu) every case runs. The dense attention cases run on the
host (kvref has no dense CUDA kernel) and are left out here.
"""

from pathlib import Path

import pytest

from conftest import ON_SIMULATOR
from kvref.golden.impl import Kvref
from kvref.golden.run import check_suite, exit_status, format_table

SUITE = Path(__file__).resolve().parents[1] / "golden" / "v1"
SAMPLE = ["flat_overflow", "flat_crop_reset", "ring_wrap_f16", "ring_chunked_prefill_deferred", "ring_sinks",
          "two_tier_migration_q8_0", "two_tier_long_prefill_q4_0", "pooled_fork_copy_on_write",
          "pooled_exhaustion", "pooled_eviction", "paged_decode_after_fork_and_reuse", "paged_decode_f16",
          "quant_q4_0", "quant_q5_1"]


@pytest.mark.parametrize("case", SAMPLE if ON_SIMULATOR else [None])
def test_cuda_backend_passes_the_golden_suite(case):
    manifest, results = check_suite(SUITE, Kvref("cuda"), names=[case] if case else None)
    table = format_table(results)
    assert results and exit_status(results) == 0, table
    if case:
        assert [r.name for r in results] == [case] and results[0].status == "ok", table
