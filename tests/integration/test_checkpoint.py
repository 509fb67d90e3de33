"""Save and resume: the resumed run continues from the checkpoint's weights, optimizer (here the distributed one,
its state sharded over the 2 data-parallel ranks), learning-rate schedule and data position."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT, read_metrics, run_ranks

pytestmark = pytest.mark.integration

COMMON = ["--apply-chat-template", "--rm-type", "letter", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
          "--rollout-max-response-len", "12", "--micro-batch-size", "4", "--lr", "1e-2", "--seed", "5",
          "--use-distributed-optimizer"]
# Cosine from 1e-2 to 1e-3 over 3 optimizer steps after 1 of warmup (n: steps already taken; schedule.py):
# n = 0: 0 (warmup from 0), n = 1: 1e-2, n = 2: r = (2 - 1) / (3 - 1) = 0.5, 1e-3 + (cos(pi / 2) + 1) / 2 * 9e-3.
SCHEDULE = ["--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--lr-decay-iters", "3", "--min-lr", "1e-3"]
EXPECTED_LR = [0.0, 1e-2, 5.5e-3]


def test_resume_continues_where_the_checkpoint_stopped(tiny_model, letters_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    first = run_ranks(2, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data),
                      "--num-rollout", "2", "--save", str(ckpt), "--save-interval", "1",
                      "--log-dir", str(tmp_path / "a"), *COMMON, *SCHEDULE)
    assert first.returncode == 0
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000001", "iter_0000002",
                                                      "latest_checkpointed_iteration.txt"]
    second = run_ranks(2, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data),
                       "--num-rollout", "3", "--load", str(ckpt), "--log-dir", str(tmp_path / "b"), *COMMON,
                       *SCHEDULE)
    assert second.returncode == 0
    before, (after,) = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert after["step"] == 3
    # The engine was started from the initial weights; after step 2 at lr 1e-2 (step 1: warmup, lr 0) the policy
    # differs from them by far more than 1e-5, so this agreement shows the engine received the checkpoint's weights.
    assert after["train/train_rollout_logprob_abs_diff"] <= 1e-5
    assert after["data/position"] == before[-1]["data/position"] + 4  # the next 4 prompts, not the first 4
    assert after["train/param_norm"] != before[-1]["train/param_norm"]
    # The schedule resumed at its step: a restarted one would give step 3 the warmup's 0.
    assert [r["train/lr"] for r in before + [after]] == pytest.approx(EXPECTED_LR, rel=1e-12)

    # The checkpoint exports as an HF model that transformers loads, holding exactly the trained weights: its
    # parameter norm is the trainer's `train/param_norm` after step 2.
    exported = tmp_path / "exported"
    proc = run_ranks(2, "-m", "vime_spmd.tools.export_hf", "--out", str(exported), "--hf-checkpoint",
                     str(tiny_model), "--load", str(ckpt), "--use-distributed-optimizer")
    assert proc.returncode == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    norm = torch.sqrt(sum(p.double().pow(2).sum() for p in model.parameters())).item()
    assert norm == pytest.approx(before[-1]["train/param_norm"], rel=1e-9)


def test_resuming_from_an_empty_folder_is_refused_before_any_work(tiny_model, letters_data, tmp_path):
    proc = run_ranks(0, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data),
                     "--load", str(tmp_path), timeout_s=120)
    assert proc.returncode == 2
    assert f"--load {tmp_path}: no latest_checkpointed_iteration.txt" in proc.stderr
