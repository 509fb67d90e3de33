"""Record and replay (slime's --save-debug-rollout-data / --load-debug-rollout-data): a replay of a recorded run's
rollouts trains without an engine and computes the recorded run's training metrics exactly."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, product_traceback, read_metrics, run_ranks
from tests.integration.test_grpo_e2e import COMMON

pytestmark = pytest.mark.integration


def test_a_replay_trains_without_an_engine_and_repeats_the_recorded_metrics(tiny_model, letters_data, tmp_path):
    rollouts = tmp_path / "rollouts" / "{rollout_id}.pt"
    runs = {}
    for name, flag in (("recorded", "--save-debug-rollout-data"), ("replayed", "--load-debug-rollout-data")):
        proc = run_ranks(2, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data),
                         "--num-rollout", "2", "--log-dir", str(tmp_path / name), flag, str(rollouts), *COMMON)
        assert proc.returncode == 0
        runs[name] = proc, read_metrics(tmp_path / name)
    assert sorted(p.name for p in rollouts.parent.iterdir()) == ["1.pt", "2.pt"]
    (recorded_proc, recorded), (replayed_proc, replayed) = runs["recorded"], runs["replayed"]
    assert "weight sync:" in recorded_proc.stderr  # the recorded run built an engine and a sync ...
    assert "weight sync:" not in replayed_proc.stderr and "no engine" in replayed_proc.stderr  # ... the replay none
    assert len(recorded) == len(replayed) == 2
    for a, b in zip(recorded, replayed):
        keys = [k for k in a if not k.startswith(("perf/", "memory/"))]
        assert keys and all(k in b for k in keys)
        assert {k: b[k] for k in keys} == {k: a[k] for k in keys}  # exactly: losses, norms, rewards, data position
    assert recorded[1]["train/grad_norm"] > 0  # the steps trained


def test_a_missing_recorded_step_is_named(tiny_model, letters_data, tmp_path):
    proc = run_ranks(1, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data),
                     "--num-rollout", "1", "--log-dir", str(tmp_path / "log"), "--load-debug-rollout-data",
                     str(tmp_path / "none" / "{rollout_id}.pt"), *COMMON)
    assert proc.returncode == 1
    assert "error: --load-debug-rollout-data: no recorded rollout for step 1" in proc.stderr
    assert not product_traceback(proc.stderr)  # one error line, not a traceback through our code
