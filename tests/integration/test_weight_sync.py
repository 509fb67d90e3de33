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


@pytest.mark.parametrize("model,tp,engine_tp,transport,divisible_by", [
    ("tiny_model", 2, 1, "shm", 1),  # each engine rank reads both training pieces of every tensor
    ("tiny_model_tied", 1, 2, "collective", 1),  # each engine rank takes half of a whole training copy
    ("tiny_model_qwen2", 2, 2, "shm", 128),  # q/k/v biases; a padded Megatron vocabulary
    ("tiny_model_llama", 1, 1, "shm", 1),
])
def test_direct_sync_equals_vllms_own_loading(request, tmp_path, model, tp, engine_tp, transport, divisible_by):
    report_path = tmp_path / "report.json"
    proc = run_ranks(2, ROOT / "tests/integration/scripts/check_direct.py", str(request.getfixturevalue(model)),
                     str(tp), str(engine_tp), transport, str(divisible_by), str(report_path), timeout_s=300)
    assert proc.returncode == 0
    report = json.loads(report_path.read_text())
    assert report["transport"] == transport
    for rank in report["ranks"]:
        assert rank["mismatches"] == [], "engine tensors differ from what vLLM's loader put there"
        assert rank["num_buckets"] > 1  # 64 KiB buckets: the writes were really cut
        # An engine rank copies exactly the bytes it holds (its padded vocabulary rows are zeroed, not copied).
        assert rank["num_bytes"] <= rank["engine_bytes"] < 1.2 * rank["num_bytes"]
