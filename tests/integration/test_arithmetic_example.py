"""The arithmetic example's one command (examples/arithmetic/run.sh) end to end, shortened to a few steps: the
random model, the task, the SFT run, GRPO from its saved weights, and the report with its figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_run_sh_goes_from_a_random_model_to_the_report(tmp_path):
    out = tmp_path / "arithmetic"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PY": sys.executable, "TORCHRUN": f"{sys.executable} -m "
           "torch.distributed.run", "SFT_STEPS": "3", "GRPO_STEPS": "2",
           "SFT_WARMUP": "1", "GRPO_WARMUP": "1"}
    proc = subprocess.run(["bash", "examples/arithmetic/run.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["points"]) == ["random model", "after SFT (3 steps)", "after GRPO (2 steps)"]
    for point in report["points"].values():
        assert sorted(point) == ["hard", "heldout"]
        for metrics in point.values():
            assert sorted(metrics) == ["accuracy", "pass@1", "pass@2", "pass@4"]
            assert 0 <= metrics["pass@1"] <= metrics["pass@2"] <= metrics["pass@4"] <= 1
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| heldout | accuracy |" in proc.stdout
