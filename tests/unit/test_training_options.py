"""Pure parts of the training options: the learning-rate schedule's values, the pipeline split, and the checks that
refuse impossible option combinations with the fix."""

from __future__ import annotations

import math

import pytest

from vime_spmd.config import check_config, parse_config
from vime_spmd.parallel import pipeline_split
from vime_spmd.train.megatron.schedule import build_scheduler

BASE = ["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--rollout-batch-size", "8"]


class FakeOptimizer:
    """What the scheduler touches: param_groups (Megatron's carry max_lr/min_lr; a norm group has wd_mult 0)."""

    def __init__(self, lr: float, min_lr: float) -> None:
        self.param_groups = [{"max_lr": lr, "min_lr": min_lr, "wd_mult": 1.0},
                             {"max_lr": lr, "min_lr": min_lr, "wd_mult": 0.0}]


def lrs(style: str, num_steps: int, warmup: int = 2, decay: int = 6, lr: float = 1e-3, min_lr: float = 1e-4):
    """The learning rate of each of `num_steps` optimizer steps, stepping the scheduler after each, as the actor."""
    cfg = parse_config(BASE + ["--lr", str(lr), "--min-lr", str(min_lr), "--lr-decay-style", style,
                               "--lr-warmup-iters", str(warmup), "--weight-decay", "0.1"])
    optimizer = FakeOptimizer(lr, min_lr)
    scheduler = build_scheduler(optimizer, cfg.optimizer, decay)
    out = []
    for _ in range(num_steps):
        out.append(optimizer.param_groups[0]["lr"])
        scheduler.step(1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # norms and biases: no decay
    return out, scheduler


# lr 1e-3, min 1e-4, warmup W=2, decay D=6; n = optimizer steps taken before the step.
# warmup n <= 2: n/2 * 1e-3 -> 0, 5e-4, 1e-3. Then r = (n - 2) / 4 for n = 3..6, min after n > 6.
LINEAR = [0.0, 5e-4, 1e-3,
          1e-4 + 0.75 * 9e-4,  # r = 0.25: 7.75e-4
          1e-4 + 0.5 * 9e-4,  # 5.5e-4
          1e-4 + 0.25 * 9e-4,  # 3.25e-4
          1e-4, 1e-4]  # r = 1, then past D
COSINE = [0.0, 5e-4, 1e-3,
          1e-4 + 0.5 * (math.cos(math.pi / 4) + 1) * 9e-4,  # 0.853553 * 9e-4 + 1e-4 = 8.681981e-4
          1e-4 + 0.5 * 9e-4,  # cos(pi/2) = 0: 5.5e-4
          1e-4 + 0.5 * (math.cos(3 * math.pi / 4) + 1) * 9e-4,  # 0.146447 * 9e-4 + 1e-4 = 2.318019e-4
          1e-4, 1e-4]
CONSTANT = [0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]


@pytest.mark.parametrize("style, expected", [("linear", LINEAR), ("cosine", COSINE), ("constant", CONSTANT)])
def test_schedule_follows_megatrons_formula(style, expected):
    got, _ = lrs(style, len(expected))
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_schedule_resumes_at_its_step():
    _, scheduler = lrs("cosine", 4)
    cfg = parse_config(BASE + ["--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine",
                               "--lr-warmup-iters", "2", "--weight-decay", "0.1"])
    optimizer = FakeOptimizer(1e-3, 1e-4)
    resumed = build_scheduler(optimizer, cfg.optimizer, 6)
    resumed.load_state_dict(scheduler.state_dict())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(COSINE[4])


def test_default_decay_spans_the_runs_optimizer_steps():
    # 10 rollouts x (8 prompts x 4 samples = 32) / global batch 16 = 20 optimizer steps
    cfg = parse_config(BASE + ["--num-rollout", "10", "--global-batch-size", "16"])
    assert cfg.lr_decay_iters == 20
    assert parse_config(BASE + ["--lr-decay-iters", "7"]).lr_decay_iters == 7


@pytest.mark.parametrize("layers, pp, first, last, split", [
    (4, 2, None, None, [2, 2]),
    (3, 2, None, None, [2, 1]),  # automatic: the last stage (logits, loss) gets the fewer layers
    (4, 3, None, None, [2, 1, 1]),
    (11, 4, None, None, [3, 3, 3, 2]),  # middle stages 11 // 4 + 1: no stage above ceil(11 / 4) = 3
    (5, 4, None, None, [2, 1, 1, 1]),
    (3, 2, 1, None, [1, 2]),
    (10, 4, 1, 3, [1, 3, 3, 3]),
    (10, 4, None, 1, [3, 3, 3, 1]),
])
def test_pipeline_split(layers, pp, first, last, split):
    assert pipeline_split(layers, pp, first, last) == split


@pytest.mark.parametrize("layers, pp, first, last, message", [
    (3, 2, 3, None, "remaining 0 must split evenly"),
    (4, 2, 1, 2, "first and last stages must hold all"),
    (10, 4, 1, 2, "remaining 7 must split evenly"),
    (2, 3, None, None, "only 2 layers, fewer than the stages"),
    (4, 1, 2, None, "need --pipeline-model-parallel-size >= 2"),
    (4, 2, 0, None, "at least one layer"),
])
def test_impossible_pipeline_split_is_refused_naming_the_flags(layers, pp, first, last, message):
    with pytest.raises(ValueError, match=message) as e:
        pipeline_split(layers, pp, first, last)
    assert f"--pipeline-model-parallel-size {pp}" in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--sequence-parallel"], "needs --tensor-model-parallel-size > 1"),
    (["--recompute-granularity", "full"], "needs --recompute-method uniform|block and --recompute-num-layers"),
    (["--recompute-method", "uniform"], "apply to --recompute-granularity full only"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"], "full only"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "0"],
     "--recompute-num-layers 0: must be at least 1"),
    (["--min-lr", "1e-3", "--lr", "1e-4"], r"--min-lr 0.001: must be in \[0, --lr 0.0001\]"),
    (["--lr-warmup-iters", "10"], "--lr-warmup-iters 10 must be smaller than --lr-decay-iters 10"),
    (["--lr-decay-iters", "0"], "decay >= 1"),
])
def test_inconsistent_training_options_are_refused_with_the_fix(argv, message):
    cfg = parse_config(BASE + argv)  # 10 rollouts of one optimizer step: 10 optimizer steps
    with pytest.raises(ValueError, match=message):
        check_config(cfg, 2)
