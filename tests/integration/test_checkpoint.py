"""Save and resume: the resumed run continues from the checkpoint's weights, optimizer, learning-rate schedule and
data position, in the layout that wrote it or in another one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, read_metrics, run_ranks

pytestmark = pytest.mark.integration

COMMON = ["--apply-chat-template", "--rm-type", "letter", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
          "--rollout-max-response-len", "12", "--micro-batch-size", "4", "--lr", "1e-2", "--seed", "5"]
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


def train(model, data, log_dir, num_rollout: int, tp: int, pp: int, engine: int, *flags: str):
    return run_ranks(2, ROOT / "run.py", "--hf-checkpoint", str(model), "--prompt-data", str(data),
                     "--num-rollout", str(num_rollout), "--tensor-model-parallel-size", str(tp),
                     "--pipeline-model-parallel-size", str(pp), "--rollout-num-gpus-per-engine", str(engine),
                     "--log-dir", str(log_dir), *flags, *COMMON)


def test_a_checkpoint_written_under_tp2_resumes_under_tp1_and_pp2(tiny_model, letters_data, tmp_path):
    ckpt, hf = tmp_path / "ckpt", tmp_path / "hf"
    # First launch of `--load X --save X`: nothing to load yet, so the run starts from --hf-checkpoint.
    first = train(tiny_model, letters_data, tmp_path / "tp2", 2, 2, 1, 2, "--load", str(ckpt), "--save", str(ckpt),
                  "--save-hf", str(hf))
    assert first.returncode == 0
    assert "no checkpoint inside; starting from --hf-checkpoint" in first.stderr
    saved = load_file(hf / "iter_0000002" / "model.safetensors")  # the TP2 trainer's weights after step 2
    written = read_metrics(tmp_path / "tp2")
    assert [r["step"] for r in written] == [1, 2]
    # --save-hf wrote an HF model that transformers loads, holding exactly the trained weights: its parameter norm
    # is the trainer's `train/param_norm` after step 2.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf / "iter_0000002", dtype=torch.float32)
    norm = torch.sqrt(sum(p.double().pow(2).sum() for p in model.parameters())).item()
    assert norm == pytest.approx(written[-1]["train/param_norm"], rel=1e-9)

    # The same checkpoint, resharded: each layout holds exactly the saved parameters.
    for ranks, layout in ((1, []), (2, ["--pipeline-model-parallel-size", "2"])):
        out = tmp_path / f"export_{ranks}"
        proc = run_ranks(ranks, "-m", "vime_spmd.tools.export_hf", "--out", str(out), "--hf-checkpoint",
                         str(tiny_model), "--load", str(ckpt), *layout)
        assert proc.returncode == 0
        exported = load_file(out / "model.safetensors")
        assert sorted(exported) == sorted(saved)
        assert all(torch.equal(exported[name], saved[name]) for name in saved), layout

    # Step 3 under PP2 (each rank its own engine; the checkpoint is also the KL reference) and under TP1 x DP2
    # (relaunching `--load X --save X`, keeping one checkpoint, without optimizer state): the engine gets the
    # resharded weights, the data continues.
    pp2 = train(tiny_model, letters_data, tmp_path / "pp2", 3, 1, 2, 1, "--load", str(ckpt), "--ref-load", str(ckpt),
                "--use-kl-loss", "--kl-loss-coef", "0.1")
    assert pp2.returncode == 0
    tp1 = train(tiny_model, letters_data, tmp_path / "tp1", 3, 1, 1, 2, "--load", str(ckpt), "--save", str(ckpt),
                "--keep-last-n-checkpoints", "1", "--no-save-optim")
    assert tp1.returncode == 0
    (after_pp2,), (after_tp1,) = read_metrics(tmp_path / "pp2"), read_metrics(tmp_path / "tp1")
    for after in (after_pp2, after_tp1):
        assert after["step"] == 3
        assert after["train/train_rollout_logprob_abs_diff"] <= 1e-5
        assert after["data/position"] == written[-1]["data/position"] + 4
    # One optimizer step per rollout: every micro-batch's loss is taken before it, with the policy still equal to
    # the reference, so the KL term is exactly 0 (against the initial weights it would not be).
    assert after_pp2["train/kl_loss"] == 0.0
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000003", "latest_checkpointed_iteration.txt"]


def test_a_weights_only_checkpoint_keeps_the_schedules_position(tiny_model, letters_data, tmp_path):
    """--no-save-optim: the resumed optimizer starts afresh, but the learning rate continues where the schedule was
    (step 3 at EXPECTED_LR[2], not at the schedule's start, 0)."""
    ckpt = tmp_path / "ckpt"
    for steps, flags in ((2, ["--save", str(ckpt), "--no-save-optim"]), (3, ["--load", str(ckpt)])):
        proc = run_ranks(1, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data),
                         "--num-rollout", str(steps), "--log-dir", str(tmp_path / f"run{steps}"), *flags, *COMMON,
                         *SCHEDULE)
        assert proc.returncode == 0
    assert [r["train/lr"] for r in read_metrics(tmp_path / "run2")] == pytest.approx(EXPECTED_LR[:2], abs=1e-12)
    (after,) = read_metrics(tmp_path / "run3")
    assert after["step"] == 3 and after["train/lr"] == pytest.approx(EXPECTED_LR[2], rel=1e-12)


def test_a_load_folder_that_is_not_a_checkpoint_is_refused_before_any_work(tiny_model, letters_data, tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    proc = run_ranks(0, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data),
                     "--load", str(tmp_path), timeout_s=120)
    assert proc.returncode == 2
    assert f"--load {tmp_path}: latest_checkpointed_iteration.txt names step 4 but" in proc.stderr
