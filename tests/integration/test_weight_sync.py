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
    # q/k/v biases; Megatron's vocabulary padded from 512 to 576 (a multiple of 96 x 2), so split at row 288 where
    # vLLM splits at 256; the layers line up and are not gathered.
    ("tiny_model_qwen2", 2, 2, "collective", 96),
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
        if transport == "collective" and tp == engine_tp:
            # Aligned layouts: each rank's own pieces suffice for every layer (the vocabulary is split differently,
            # so its two tensors are still gathered). Qwen2's split tensors per layer: q/k/v weight and bias,
            # o_proj, fc1, fc2; 2 layers.
            assert rank["num_not_gathered"] == 5 * 2
