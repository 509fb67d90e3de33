"""Colocated GRPO end to end: real Megatron-core and real in-process vLLM, tiny model, fp32, CPU.

Each step's `train/train_rollout_logprob_abs_diff` compares the trainer's logprobs with the engine's for the
tokens the engine just sampled. From step 2 on, the engine runs on weights it received from the trainer after
the previous optimizer step, so a small difference there is the proof that the sync was exact.
"""

from __future__ import annotations

import math

import pytest

from tests.conftest import ROOT, read_metrics, run_ranks

pytestmark = pytest.mark.integration

COMMON = ["--apply-chat-template", "--rm-type", "letter", "--rollout-batch-size", "4",
          "--n-samples-per-prompt", "4", "--rollout-max-response-len", "12", "--micro-batch-size", "4",
          "--lr", "1e-2", "--seed", "7"]


def check_steps(records: list[dict], num_steps: int) -> None:
    assert [r["step"] for r in records] == list(range(1, num_steps + 1))
    for r in records:
        # fp32: mean <= 1e-5 and max <= 1e-4 over every sampled token of the step
        assert r["train/train_rollout_logprob_abs_diff"] <= 1e-5, r
        assert r["train/train_rollout_logprob_max_abs_diff"] <= 1e-4, r
        for key in ("train/pg_loss", "train/entropy_loss", "train/kl_loss", "train/grad_norm"):
            assert math.isfinite(r[key]), (key, r)
        assert r["train/grad_norm"] > 0, "no gradient: the step could not have changed the weights"
    norms = [r["train/param_norm"] for r in records]
    assert all(abs(a - b) > 1e-6 for a, b in zip(norms, norms[1:])), f"weights did not change: {norms}"


LAYOUTS = [  # ranks, train TP, train PP, engine TP, transport, sync format, model family
    (2, 2, 1, 2, "shm", "direct", "qwen3"),
    (2, 1, 1, 1, "collective", "reload", "qwen3"),  # training data parallel 2, two engines
    (2, 2, 1, 1, "shm", "direct", "qwen2"),
    (2, 1, 1, 2, "collective", "reload", "llama"),
    (2, 1, 2, 1, "shm", "direct", "qwen3"),  # pipeline of two stages, each rank its own engine
    (4, 2, 2, 2, "collective", "direct", "llama"),  # TP2 x PP2 on 4 ranks, two engines of TP2: layouts line up,
    #                                                  so nothing is all-gathered, stages broadcast one piece
    (4, 4, 1, 2, "shm", "direct", "qwen3_kv4"),  # TP4 training, two engines of TP2
]


@pytest.mark.parametrize("nproc,tp,pp,engine,transport,sync_format,family", LAYOUTS,
                         ids=[f"{n}ranks-train_tp{t}pp{p}-engine_tp{e}-{x}-{s}-{f}" for n, t, p, e, x, s, f in LAYOUTS])
def test_three_grpo_steps(request, letters_data, tmp_path, nproc, tp, pp, engine, transport, sync_format, family):
    model = request.getfixturevalue({"qwen3": "tiny_model", "qwen2": "tiny_model_qwen2",
                                     "llama": "tiny_model_llama", "qwen3_kv4": "tiny_model_kv4"}[family])
    log_dir = tmp_path / "run"
    proc = run_ranks(nproc, ROOT / "run.py", "--hf-checkpoint", str(model), "--prompt-data", str(letters_data),
                     "--num-rollout", "3", "--tensor-model-parallel-size", str(tp),
                     "--pipeline-model-parallel-size", str(pp),
                     "--rollout-num-gpus-per-engine", str(engine), "--weight-sync-transport", transport,
                     "--weight-sync-format", sync_format,
                     "--update-weight-buffer-size", str(256 << 10), "--log-dir", str(log_dir), *COMMON)
    assert proc.returncode == 0
    records = read_metrics(log_dir)
    check_steps(records, 3)
    assert records[0]["rollout/num_samples"] == 16  # 4 prompts x 4 samples gathered from every engine


def test_engine_started_without_weights_gets_the_trainers_before_the_first_rollout(tiny_model, letters_data,
                                                                                  tmp_path):
    """`--vllm-load-format dummy`: the engine starts from random weights; the first sync happens before step 1,
    so the very first rollout already agrees with the trainer."""
    log_dir = tmp_path / "run"
    proc = run_ranks(2, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data),
                     "--num-rollout", "1", "--tensor-model-parallel-size", "2", "--rollout-num-gpus-per-engine", "2",
                     "--vllm-load-format", "dummy", "--log-dir", str(log_dir), *COMMON)
    assert proc.returncode == 0
    (record,) = read_metrics(log_dir)
    assert record["train/train_rollout_logprob_max_abs_diff"] <= 1e-4


def test_kl_loss_against_reference(tiny_model, letters_data, tmp_path):
    """Single-process debug mode (`python run.py`, a world of one) with the KL loss on: the reference model
    equals the initial weights, so the KL is 0 at step 1 and grows once the policy moves."""
    log_dir = tmp_path / "run"
    proc = run_ranks(0, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data),
                     "--num-rollout", "3", "--use-kl-loss", "--kl-loss-coef", "0.1", "--log-dir", str(log_dir),
                     *COMMON)
    assert proc.returncode == 0
    records = read_metrics(log_dir)
    check_steps(records, 3)
    assert abs(records[0]["train/kl_loss"]) < 1e-6
    assert records[2]["train/kl_loss"] > 1e-6
