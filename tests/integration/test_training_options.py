"""Training options on 2 ranks: causal SDPA attention, activation recompute, sequence parallelism, the distributed
optimizer and the learning-rate schedule change how the trainer computes, not what it computes.

scripts/check_training_options.py runs all engine-free checks in one torchrun (logits of both attention paths; one
training step per option set on the same synthetic inputs, with counts of what ran); two short GRPO runs then
check the trainer/engine logprob agreement with the options on.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, read_metrics, run_ranks
from tests.integration.test_grpo_e2e import COMMON, check_steps

pytestmark = pytest.mark.integration

SCRIPT = ROOT / "tests/integration/scripts/check_training_options.py"
FULL_UNIFORM = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
CASES = {  # name -> TP, flags; TP 1 on 2 ranks is data parallel 2
    "tp2": (2, []),
    "tp2-sp-full": (2, ["--sequence-parallel", *FULL_UNIFORM]),
    "dp2": (1, []),
    "dp2-selective": (1, ["--recompute-granularity", "selective"]),
    "dp2-block": (1, ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"]),
    # The distributed optimizer shards Adam only: Adam on both sides of its comparison.
    "dp2-adam": (1, ["--optimizer", "adam"]),
    "dp2-distopt": (1, ["--optimizer", "adam", "--use-distributed-optimizer"]),
}
SAME_MATHS = [("tp2-sp-full", "tp2"), ("dp2-selective", "dp2"), ("dp2-block", "dp2"), ("dp2-distopt", "dp2-adam")]


@pytest.fixture(scope="module")
def report(tiny_model, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("options")
    specs = [f"{name}={tp}" + (":" + ",".join(flags) if flags else "") for name, (tp, flags) in CASES.items()]
    proc = run_ranks(2, SCRIPT, str(out), str(tiny_model), "1,2", *specs, timeout_s=300)
    assert proc.returncode == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.numerics
@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_attention_gives_the_logits_of_megatrons_masked_attention(report, tp):
    result = report["attention"][f"tp{tp}"]
    assert result["max_logit_abs"] > 0.1  # logits far from zero: the tolerance below is a real bound
    assert result["max_logit_abs_diff"] <= 1e-6  # fp32, every real (non-padding) position


@pytest.mark.numerics
@pytest.mark.parametrize("flagged, plain", SAME_MATHS)
def test_options_leave_the_step_unchanged(report, flagged, plain):
    a, b = report["cases"][flagged], report["cases"][plain]
    check_same_step(a, b)


def check_same_step(a: dict, b: dict) -> None:
    """The bounds of one training step computed two ways (another layout, grouping or kernel), fp32.

    Loss metrics: sums over ~100 response tokens, reordered: a sum of n fp32 terms moves by at most ~n x 6e-8 x the
    sum of their magnitudes, so 1e-6 relative, with 1e-7 absolute for the means that cancel to near 0 (ppo_kl,
    pg_loss). grad_norm: a square root of partial sums over ~1e5 elements, reordered: 1e-6 relative (seen: 1e-7).
    Logprobs after the step: the weights agree to ~1e-7 (SGD: see check_pipeline.OPTIMIZER; Adam: the two sides
    reduce the same two gradients, and a + b is exact in either order), and a forward through a few layers in another
    order moves a logprob by ~1e-6 (seen: 5e-7 across layouts and kernel sets): 1e-5."""
    for key in ("pg_loss", "entropy_loss", "kl_loss", "pg_clipfrac", "ppo_kl"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    assert a["metrics_equal_on_all_ranks"]
    after_a, after_b = torch.tensor(a["logprobs_after"]), torch.tensor(b["logprobs_after"])
    assert (after_a - after_b).abs().max().item() <= 1e-5  # the updated weights agree


def test_recompute_runs_the_layers_again_in_backward(report):
    c = report["cases"]

    def per_micro_batch(name: str, key: str) -> float:
        return c[name][key] / c[name]["micro_batches"]

    num_layers = c["tp2"]["num_layers"]
    assert per_micro_batch("tp2", "layer_calls") == num_layers
    assert per_micro_batch("tp2-sp-full", "layer_calls") == 2 * num_layers  # full, uniform: every layer twice
    assert per_micro_batch("dp2-block", "layer_calls") == num_layers + 1  # block of 1: the first layer again
    assert per_micro_batch("dp2-selective", "layer_calls") == num_layers  # selective: the core attention
    assert per_micro_batch("dp2-selective", "core_attention_calls") == 2 * num_layers


def test_sequence_parallel_splits_the_sequence_over_tensor_parallel_ranks(report):
    plain, split = report["cases"]["tp2"]["layer_seq_lens"], report["cases"]["tp2-sp-full"]["layer_seq_lens"]
    assert split == sorted({-(-n // 2) for n in plain})  # padded to a multiple of TP, then halved


def test_distributed_optimizer_holds_half_of_the_state_on_each_of_two_ranks(report):
    plain, sharded = report["cases"]["dp2-adam"], report["cases"]["dp2-distopt"]
    assert plain["optimizer_numel"] == plain["model_numel"]
    assert sharded["optimizer_numel"] <= sharded["model_numel"] // 2 + 64  # Megatron pads buckets a little


GRPO_RUNS = {  # one 2-step GRPO run per option set; the engine samples what the options trained
    "tp2-sp-full-distopt": ["--tensor-model-parallel-size", "2", "--rollout-num-gpus-per-engine", "2",
                            "--sequence-parallel", *FULL_UNIFORM, "--use-distributed-optimizer"],
    # lr 1e-2 -> 1e-3, linear over 2 optimizer steps, no warmup: step 1 at 1e-2, step 2 at 1e-3 + 0.5 * 9e-3
    "dp2-selective-distopt-linear": ["--recompute-granularity", "selective", "--use-distributed-optimizer",
                                     "--lr-decay-style", "linear", "--lr-decay-iters", "2", "--min-lr", "1e-3"],
    # two stages, micro-batches by token budget (a few samples each), the reference's and the actor's logprob
    # passes by their own budget
    "pp2-dynamic-kl": ["--pipeline-model-parallel-size", "2", "--use-dynamic-batch-size", "--max-tokens-per-gpu",
                       "64", "--log-probs-max-tokens-per-gpu", "128", "--use-kl-loss", "--kl-loss-coef", "0.1"],
}
EXPECTED_LR = {"tp2-sp-full-distopt": [1e-2, 1e-2], "dp2-selective-distopt-linear": [1e-2, 5.5e-3],
               "pp2-dynamic-kl": [1e-2, 1e-2]}


@pytest.mark.parametrize("name", list(GRPO_RUNS))
def test_grpo_with_options_keeps_trainer_and_engine_in_agreement(tiny_model, letters_data, tmp_path, name):
    log_dir = tmp_path / "run"
    proc = run_ranks(2, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data),
                     "--num-rollout", "2", "--log-dir", str(log_dir), *COMMON, *GRPO_RUNS[name])
    assert proc.returncode == 0
    records = read_metrics(log_dir)
    check_steps(records, 2)  # logprob agreement <= 1e-5 at both steps; the weights moved
    assert [r["train/lr"] for r in records] == pytest.approx(EXPECTED_LR[name], rel=1e-12)
    assert all(0 <= r["train/padding_ratio"] < 1 for r in records)
