"""Weight sync transports deliver exactly the trainer's weights, bucketed, sync after sync."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, run_ranks

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("transport", ["shm", "collective"])
def test_transport_delivers_the_exact_weights(tiny_model, tmp_path, transport):
    report_path = tmp_path / "report.json"
    proc = run_ranks(2, ROOT / "tests/integration/scripts/check_sync.py", str(tiny_model), "2", transport,
                     str(report_path), timeout_s=300)
    assert proc.returncode == 0
    report = json.loads(report_path.read_text())
    assert report["transport"] == transport
    assert report["mismatches"] == []
    assert all(n > 1 for n in report["num_buckets"])  # 64 KiB buckets: the stream was really cut
