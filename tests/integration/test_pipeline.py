"""Pipeline parallelism in the training backend: with 2 stages (TP 1 on 2 ranks, TP 2 on 4 ranks) and 3 stages (TP 1
on 3 ranks) the actor computes transformers' logits and logprobs, exports the whole model on every rank, and one
training step updates the weights exactly as the same step without stages (same TP) does.

One torchrun per world size runs all its cases (scripts/check_pipeline.py); each test reads its case's report.
4-layer tiny models: with 2 stages each holds 2 layers, so the second stage's layers are renamed with an offset;
with 3 stages (an uneven split) the stages hold 2, 1 and 1.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, make_model, run_ranks
from tests.integration.test_training_options import check_same_step

pytestmark = pytest.mark.integration

SCRIPT = ROOT / "tests/integration/scripts/check_pipeline.py"
MODELS = {"tied": ("--num-layers", "4", "--tie-word-embeddings", "--seed", "1"),  # qwen3: q/k norms
          "untied": ("--family", "llama", "--num-layers", "4", "--seed", "2")}
# Token budgets for the synthetic samples (lengths 5, 13, 14, 6 | 14, 15, 7, 8; check_pipeline.synthetic_samples):
# with DP 2 at 28 tokens the ranks train in 2 and 3 micro-batches; one pipeline at 14 tokens runs 7, the 15-token
# sample alone over the budget. Logprob passes take their own budget.
DYNAMIC_DP2 = ("--use-dynamic-batch-size", "--max-tokens-per-gpu", "28", "--log-probs-max-tokens-per-gpu", "64")
DYNAMIC_PP2 = ("--use-dynamic-batch-size", "--max-tokens-per-gpu", "14")
RUNS = {  # world size -> case -> (model, TP, PP[, flags]); the rest of the world is data parallel
    2: {"tied-tp1-pp1": ("tied", 1, 1), "tied-tp1-pp2": ("tied", 1, 2),
        "untied-tp1-pp1": ("untied", 1, 1), "untied-tp1-pp2": ("untied", 1, 2),
        "tied-tp1-pp1-dynamic": ("tied", 1, 1, DYNAMIC_DP2), "tied-tp1-pp2-dynamic": ("tied", 1, 2, DYNAMIC_PP2)},
    4: {"tied-tp2-pp1": ("tied", 2, 1), "tied-tp2-pp2": ("tied", 2, 2), "tied-tp1-pp2-dp2": ("tied", 1, 2)},
    3: {"tied-tp1-pp3": ("tied", 1, 3)},  # 4 layers over 3 stages: the automatic split 2, 1, 1
}
CASES = [(world, case) for world, cases in RUNS.items() for case in cases]
# A step with stages against the same step without (same TP; the step is plain SGD: scripts/check_pipeline.OPTIMIZER).
SAME_STEP = [("tied-tp1-pp2", "tied-tp1-pp1"), ("untied-tp1-pp2", "untied-tp1-pp1"),
             ("tied-tp2-pp2", "tied-tp2-pp1"), ("tied-tp1-pp2-dp2", "tied-tp1-pp1"), ("tied-tp1-pp3", "tied-tp1-pp1"),
             # micro-batches by token budget against fixed ones: the loss is normalised over the step, not the group
             ("tied-tp1-pp1-dynamic", "tied-tp1-pp1"), ("tied-tp1-pp2-dynamic", "tied-tp1-pp2")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(world) -> (report dir, {case: report}), running that world's torchrun once."""
    models = {name: make_model(tmp_path_factory.mktemp(name) / "model", *args) for name, args in MODELS.items()}
    cache: dict[int, tuple] = {}

    def get(world: int):
        if world not in cache:
            out = tmp_path_factory.mktemp(f"world{world}")
            specs = [f"{case}={models[m]}:{tp},{pp}" + (":" + ",".join(flags[0]) if flags else "")
                     for case, (m, tp, pp, *flags) in RUNS[world].items()]
            proc = run_ranks(world, SCRIPT, str(out), *specs, timeout_s=300)
            assert proc.returncode == 0
            cache[world] = out, json.loads((out / "report.json").read_text())
        return cache[world]

    return get


def report_of(runs, case: str) -> tuple:
    world = next(w for w, cases in RUNS.items() if case in cases)
    out, reports = runs(world)
    return out, reports[case]


@pytest.mark.numerics
@pytest.mark.parametrize("world, case", CASES)
def test_megatron_matches_transformers_and_exports_the_whole_model(runs, world, case):
    _, report = runs(world)
    report = report[case]
    assert report["max_logit_abs_diff"] <= 2e-5
    assert report["max_logprob_abs_diff"] <= 2e-5
    assert report["logprobs_equal_on_all_ranks"]  # broadcast from the last stage
    assert report["exported_names_equal"]  # every rank exports every layer, the tied embedding once
    assert report["mismatched_tensors"] == []  # bit-exact round trip


@pytest.mark.numerics
@pytest.mark.parametrize("staged, plain", SAME_STEP)
def test_one_step_with_stages_equals_the_step_without(runs, staged, plain):
    staged_dir, a = report_of(runs, staged)
    plain_dir, b = report_of(runs, plain)
    weights_a, weights_b = torch.load(staged_dir / f"{staged}.pt"), torch.load(plain_dir / f"{plain}.pt")
    assert sorted(weights_a) == sorted(weights_b)
    # SGD moves each weight by -lr x clip x gradient, linear in the gradient: the layouts' updates differ by lr x the
    # gradients' difference, which is summation order over ~100 tokens (~100 x 6e-8 of the largest gradient: <= 1e-5
    # of the largest update), plus the rounding of w + update on each side (half an ulp of |w| <= 1: 6e-8 each).
    # Seen: 7.5e-9 of updates up to 1e-2, on AVX2 and on torch's scalar kernels.
    bound = 1e-5 * a["max_update"] + 1.2e-7 * max(w.abs().max().item() for w in weights_b.values())
    assert max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a) <= bound
    assert a["max_update"] >= 1e3 * bound  # the step moved the weights far more than the tolerance
    check_same_step(a, b)
    assert a["param_norm_before"] == pytest.approx(b["param_norm_before"], rel=1e-9)  # tied embedding counted once
    # Each side's norm in float64 of weights that agree to ~1e-8 (above): 1e-9 relative. check_same_step compared
    # the next forward's logprobs: with tied embeddings, the last stage's copy moved with the first stage's.
    assert a["param_norm_after"] == pytest.approx(b["param_norm_after"], rel=1e-9)


def test_three_layers_over_two_stages_train_in_agreement_with_the_engine(letters_data, tmp_path):
    """PP 2 does not divide 3 layers: the automatic split gives the first stage 2, the last 1 (it also computes
    the logits and the loss). Both steps keep the trainer and the engine in agreement, with each stage recomputing
    its first layer in backward (full recompute, block method)."""
    from tests.conftest import read_metrics
    from tests.integration.test_grpo_e2e import COMMON, check_steps

    model = make_model(tmp_path / "model", "--num-layers", "3", "--seed", "5")
    proc = run_ranks(2, ROOT / "run.py", "--hf-checkpoint", str(model), "--prompt-data", str(letters_data),
                     "--num-rollout", "2", "--pipeline-model-parallel-size", "2", "--log-dir", str(tmp_path / "run"),
                     "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1",
                     *COMMON)
    assert proc.returncode == 0
    check_steps(read_metrics(tmp_path / "run"), 2)


def test_impossible_pipeline_layout_is_refused_before_any_work(tmp_path, letters_data):
    """A first stage of 3 layers leaves none for the second: refused in `prepare` (here a process told it is one of 2
    ranks, so that nothing but the checks can run), one error line naming the flags, exit code 2."""
    model = make_model(tmp_path / "model", "--num-layers", "3")
    proc = run_ranks(0, ROOT / "run.py", "--hf-checkpoint", str(model), "--prompt-data", str(letters_data),
                     "--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "3",
                     timeout_s=120, env={"WORLD_SIZE": "2"})
    assert proc.returncode == 2
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "--pipeline-model-parallel-size 2, --decoder-first-pipeline-num-layers 3" in line
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("dynamic, fixed", [("tied-tp1-pp1-dynamic", "tied-tp1-pp1"),
                                            ("tied-tp1-pp2-dynamic", "tied-tp1-pp2")])
def test_token_budget_micro_batches_pad_less_than_fixed_ones(runs, dynamic, fixed):
    _, a = report_of(runs, dynamic)
    _, b = report_of(runs, fixed)
    # fixed pairs pad 18 of 100 tokens (either layout: the same pairs); by budget, DP 2: (14, 13) (6, 5) on rank 0,
    # (15) (14, 8) (7) on rank 1: 8 of 90; one pipeline: 15, 14, 14, 13, 8, (7, 6), 5: 1 of 83
    assert b["padding_ratio"] == pytest.approx(0.18)
    expected = {"tied-tp1-pp1-dynamic": 8 / 90, "tied-tp1-pp2-dynamic": 1 / 83}
    assert a["padding_ratio"] == pytest.approx(expected[dynamic])
