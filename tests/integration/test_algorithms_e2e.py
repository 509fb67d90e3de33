"""The GRPO family end to end (world of one, `python run.py`), and real-shaped data with a custom reward."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import ROOT, read_metrics, run_ranks

pytestmark = pytest.mark.integration

COMMON = ["--apply-chat-template", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
          "--rollout-max-response-len", "12", "--micro-batch-size", "8", "--lr", "1e-2", "--seed", "3",
          "--num-rollout", "2"]

ESTIMATOR_RUNS = {
    "grpo-clip_higher-dual_clip-tis-two_optimizer_steps": [
        "--advantage-estimator", "grpo", "--eps-clip-high", "0.28", "--eps-clip-c", "3", "--use-tis",
        "--tis-clip", "2", "--global-batch-size", "8"],  # 16 samples: two optimizer steps per rollout
    "dr_grpo-dynamic_sampling-overlong": ["--advantage-estimator", "grpo", "--disable-grpo-std-normalization",
                                          "--dynamic-sampling-filter-path", "check_reward_nonzero_std",
                                          "--over-sampling-batch-size", "6", "--overlong-buffer-len", "4",
                                          "--overlong-penalty-factor", "0.5"],
    "gspo-sequence_loss": ["--advantage-estimator", "gspo", "--no-calculate-per-token-loss"],
    # slime's scripts pass --use-kl-loss --kl-loss-coef 0: the KL is computed and logged, not added to the loss.
    "rloo-kl_logged_not_used": ["--advantage-estimator", "rloo", "--use-kl-loss", "--kl-loss-coef", "0"],
    "reinforce_plus_plus-kl_reward": ["--advantage-estimator", "reinforce_plus_plus", "--kl-coef", "0.05"],
    "reinforce_plus_plus_baseline-kl_reward": ["--advantage-estimator", "reinforce_plus_plus_baseline",
                                               "--kl-coef", "0.05", "--kl-loss-type", "k2"],
}


@pytest.mark.parametrize("name", list(ESTIMATOR_RUNS))
def test_estimator_trains_with_exact_sync(name, tiny_model, letters_data, tmp_path):
    log_dir = tmp_path / "run"
    proc = run_ranks(0, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data),
                     "--rm-type", "letter", "--log-dir", str(log_dir), *COMMON, *ESTIMATOR_RUNS[name])
    assert proc.returncode == 0
    records = read_metrics(log_dir)
    assert len(records) == 2
    for r in records:
        assert r["train/train_rollout_logprob_abs_diff"] <= 1e-4
        assert all(math.isfinite(r[k]) for k in ("train/pg_loss", "train/entropy_loss", "train/grad_norm"))
        assert r["train/grad_norm"] > 0
    assert records[0]["train/param_norm"] != records[1]["train/param_norm"]
    if "two_optimizer_steps" in name:
        # The second optimizer step of a rollout runs on weights the first one moved: its ratio is no longer 1.
        assert all(abs(r["train/ppo_kl"]) > 1e-6 for r in records)
    if "kl_logged" in name:
        assert records[0]["train/kl_loss"] == 0.0  # the policy still equals the reference during step 1
        assert records[1]["train/kl_loss"] > 0.0
    if "overlong" in name:
        # Shaping only subtracts; dynamic sampling kept exactly the batch it needed.
        assert all(r["rollout/reward"] <= r["rollout/raw_reward"] + 1e-9 for r in records)
        assert all(r["rollout/num_samples"] == 16 for r in records)


def test_dapo_math_shaped_data_with_custom_reward_and_metadata(tiny_model, tmp_path):
    """dapo-math-17k's schema (chat messages under `prompt`, answer under `label`) with default flags; a custom
    reward reads the record's metadata, so the mean reward proves the metadata reached it."""
    data = tmp_path / "dapo_math_17k.jsonl"
    weights = [0.25, 0.5, 0.75, 1.0]
    records = [{"prompt": [{"role": "user", "content": f"Solve {i} + {i}. Put the answer in \\boxed{{}}."}],
                "label": str(2 * i), "metadata": {"weight": w}} for i, w in enumerate(weights)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    reward = tmp_path / "my_reward.py"
    reward.write_text("async def weighted(response, label, metadata):\n    return metadata['weight']\n")
    log_dir = tmp_path / "run"
    proc = run_ranks(0, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(data),
                     "--custom-rm-path", f"{reward}:weighted", "--rollout-batch-size", "4",
                     "--n-samples-per-prompt", "2", "--rollout-max-response-len", "8", "--num-rollout", "1",
                     "--log-dir", str(log_dir))
    assert proc.returncode == 0
    (record,) = read_metrics(log_dir)
    assert record["rollout/raw_reward"] == pytest.approx(sum(weights) / len(weights))  # every prompt once
    assert record["rollout/reward_failures"] == 0


def test_math_reward_runs_on_dapo_math_shaped_data(tiny_model, tmp_path):
    data = tmp_path / "dapo_math_17k.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {i} * 3?"}],
                                        "label": str(3 * i)}) + "\n" for i in range(4)))
    log_dir = tmp_path / "run"
    proc = run_ranks(0, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(data),
                     "--rollout-batch-size", "4", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "8",
                     "--num-rollout", "1", "--log-dir", str(log_dir))
    assert proc.returncode == 0
    (record,) = read_metrics(log_dir)
    assert record["rollout/reward_failures"] == 0  # math-verify scored every response without error
    assert record["train/train_rollout_logprob_abs_diff"] <= 1e-4
