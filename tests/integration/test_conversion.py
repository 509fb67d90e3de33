"""HF Qwen3 -> Megatron shards -> HF is exact, and the Megatron model computes transformers' logits."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, run_ranks

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_megatron_matches_transformers_and_round_trips(tiny_model, tiny_model_tied, tmp_path, tp, tied):
    model = tiny_model_tied if tied else tiny_model
    report_path = tmp_path / "report.json"
    proc = run_ranks(tp, ROOT / "tests/integration/scripts/check_conversion.py", str(model), str(tp),
                     str(report_path), timeout_s=300)
    assert proc.returncode == 0
    report = json.loads(report_path.read_text())
    assert report["max_logit_abs_diff"] <= 2e-5
    assert report["exported_names_equal"]
    assert report["mismatched_tensors"] == []  # bit-exact: torch.equal on every tensor
