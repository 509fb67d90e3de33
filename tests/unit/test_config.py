"""The command line users coming from vime/slime expect, and the checks that refuse inconsistent flags."""

from __future__ import annotations

import pytest

from vime_spmd.config import build_parser, parse_config, validate

# Flags a vime/slime user types; renaming one breaks their scripts.
SLIME_FLAGS = {
    "--hf-checkpoint", "--ref-load", "--prompt-data", "--input-key", "--label-key", "--apply-chat-template",
    "--rm-type", "--rollout-batch-size", "--n-samples-per-prompt", "--rollout-temperature", "--rollout-top-p",
    "--rollout-max-response-len", "--rollout-max-prompt-len", "--num-rollout", "--global-batch-size",
    "--micro-batch-size", "--tensor-model-parallel-size", "--pipeline-model-parallel-size",
    "--rollout-num-gpus-per-engine", "--colocate", "--advantage-estimator", "--disable-grpo-std-normalization",
    "--eps-clip", "--eps-clip-high", "--use-kl-loss", "--kl-loss-coef", "--kl-loss-type", "--entropy-coef",
    "--calculate-per-token-loss", "--lr", "--weight-decay", "--adam-beta1", "--adam-beta2", "--clip-grad",
    "--seed", "--load", "--save", "--save-interval", "--no-save-optim", "--save-hf",
}
BASE = ["--hf-checkpoint", "m", "--prompt-data", "p.jsonl"]


def test_slime_flag_names_exist_and_are_documented():
    actions = {o: a for a in build_parser()._actions for o in a.option_strings}
    assert SLIME_FLAGS <= set(actions), sorted(SLIME_FLAGS - set(actions))
    assert all(actions[flag].help for flag in SLIME_FLAGS)


def test_flags_land_in_their_component():
    cfg = parse_config(BASE + ["--rollout-batch-size", "16", "--lr", "3e-4", "--use-kl-loss", "--kl-loss-coef",
                               "0.01", "--tensor-model-parallel-size", "2", "--eps-clip-high", "0.28"])
    assert cfg.rollout.rollout_batch_size == 16
    assert cfg.optimizer.lr == 3e-4
    assert cfg.algorithm.use_kl_loss and cfg.algorithm.kl_loss_coef == 0.01 and cfg.algorithm.eps_clip_high == 0.28
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.global_batch_size == 16 * 4  # defaults to the whole rollout (4 samples per prompt)


def test_unknown_flag_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_config(BASE + ["--rollout-batchsize", "8"])
    assert "unrecognized arguments: --rollout-batchsize" in capsys.readouterr().err


@pytest.mark.parametrize("argv,world,message", [
    (["--tensor-model-parallel-size", "3"], 4, "--tensor-model-parallel-size 3 does not divide the world of 4"),
    (["--rollout-num-gpus-per-engine", "4"], 2, "--rollout-num-gpus-per-engine 4 does not divide"),
    (["--rollout-batch-size", "3"], 2, "not divisible by the 2 engines"),
    (["--global-batch-size", "6"], 1, "--global-batch-size 6 does not divide the 32 samples"),
    # 32 samples per step over 2 data-parallel ranks x micro-batch 16 is fine; x micro-batch 32 is not.
    (["--micro-batch-size", "32"], 2, "use a multiple of 64"),
    (["--pipeline-model-parallel-size", "3"], 3, "--pipeline-model-parallel-size 3: choose one of 1, 2"),
    (["--use-kl-loss"], 1, "--kl-loss-coef > 0"),
    (["--rollout-top-p", "0"], 1, "--rollout-top-p"),
    (["--keep-last-n-checkpoints", "2"], 1, "--keep-last-n-checkpoints 2: needs --save DIR"),
    (["--save", "c", "--keep-last-n-checkpoints", "0"], 1, "--keep-last-n-checkpoints 0: needs --save DIR and a value"),
    (["--save-hf-interval", "5"], 1, "--save-hf-interval 5: needs --save-hf DIR"),
])
def test_inconsistent_flags_are_refused_naming_the_flag(argv, world, message):
    cfg = parse_config(BASE + ["--rollout-batch-size", "8"] + argv)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        validate(cfg, world)
