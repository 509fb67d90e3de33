"""The command line users coming from vime/slime expect, and the checks that refuse inconsistent flags."""

from __future__ import annotations

import re

import pytest

from vime_spmd.config import build_parser, parse_config, validate
from vime_spmd.config.checks import check_ranges

# Flags a vime/slime user types; renaming one breaks their scripts.
SLIME_FLAGS = {
    "--hf-checkpoint", "--ref-load", "--prompt-data", "--input-key", "--label-key", "--apply-chat-template",
    "--rm-type", "--rollout-batch-size", "--n-samples-per-prompt", "--rollout-temperature", "--rollout-top-p",
    "--rollout-max-response-len", "--rollout-max-prompt-len", "--num-rollout", "--global-batch-size",
    "--micro-batch-size", "--tensor-model-parallel-size", "--pipeline-model-parallel-size",
    "--rollout-num-gpus-per-engine", "--colocate", "--advantage-estimator", "--disable-grpo-std-normalization",
    "--eps-clip", "--eps-clip-high", "--use-kl-loss", "--kl-loss-coef", "--kl-loss-type", "--entropy-coef",
    "--calculate-per-token-loss", "--lr", "--weight-decay", "--adam-beta1", "--adam-beta2", "--clip-grad",
    "--seed",
    "--eval-prompt-data", "--eval-interval", "--n-samples-per-eval-prompt", "--eval-max-response-len",
    "--eval-temperature", "--eval-top-p", "--rollout-stop", "--rollout-stop-token-ids", "--rollout-top-k",
    "--rollout-seed", "--use-wandb", "--wandb-project", "--wandb-group", "--log-samples-interval",
    "--load", "--save", "--save-interval", "--no-save-optim", "--save-hf",
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


def test_unknown_flag_is_refused_with_the_closest_known_one():
    with pytest.raises(ValueError, match=r"^unknown flag: --rollout-batchsize \(did you mean --rollout-batch-size\?\)"):
        parse_config(BASE + ["--rollout-batchsize", "8"])
    with pytest.raises(ValueError, match=r"^unknown flags: --zzz, --yyy; python run.py --help"):
        parse_config(BASE + ["--zzz", "--yyy", "1"])
    with pytest.raises(ValueError, match="argument --lr: invalid float value: 'x'"):
        parse_config(BASE + ["--lr", "x"])


def test_slime_script_flags_that_do_not_apply_are_named_in_one_warning(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    # From slime's Qwen3-4B script: Ray placement, MODEL_ARGS, dropout, kernels, SGLang, and sizes we support as 1.
    cfg = parse_config(BASE + ["--actor-num-nodes", "1", "--actor-num-gpus-per-node", "8", "--swiglu", "--num-layers",
                               "36", "--normalization", "RMSNorm", "--qk-layernorm", "--attention-dropout", "0.0",
                               "--attention-backend", "flash", "--sglang-mem-fraction-static", "0.7",
                               "--context-parallel-size", "1", "--optimizer", "adam", "--vllm-enforce-eager",
                               "--lr", "2e-6"])
    assert cfg.optimizer.lr == 2e-6 and cfg.optimizer.optimizer == "adam"  # the real flags still land
    validate(cfg, 1)
    assert cfg.train.attention_backend == "sdpa"  # Megatron-LM's "flash" is our fused causal attention
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: ignoring flags that do not apply here: --actor-num-nodes "
                           "--actor-num-gpus-per-node (no Ray")
    for flag in ("--swiglu", "--num-layers", "--normalization", "--qk-layernorm", "--attention-dropout",
                 "--sglang-mem-fraction-static", "--context-parallel-size", "--vllm-enforce-eager"):
        assert flag in line
    assert "config.json" in line and "dropout is always off" in line


def test_an_ignored_flag_is_refused_when_its_value_asks_for_something_we_cannot_do(monkeypatch):
    with pytest.raises(ValueError, match="--context-parallel-size 2: not supported.*pass --context-parallel-size 1"):
        parse_config(BASE + ["--context-parallel-size", "2"])
    with pytest.raises(ValueError, match="--expert-model-parallel-size 2: not supported"):
        parse_config(BASE + ["--expert-model-parallel-size", "2"])


def test_no_warning_on_other_ranks(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    parse_config(BASE + ["--swiglu"])
    assert capsys.readouterr().err == ""


def test_kl_loss_with_coefficient_zero_is_accepted_as_in_slime():
    cfg = parse_config(BASE + ["--rollout-batch-size", "8", "--use-kl-loss", "--kl-loss-coef", "0"])
    validate(cfg, 1)
    check_ranges(cfg)


@pytest.mark.parametrize("argv,message", [
    (["--lr", "-1"], "--lr -1.0: must be > 0"),
    (["--kl-loss-coef", "-0.1"], "--kl-loss-coef -0.1: must be >= 0"),
    (["--adam-beta2", "1"], "--adam-beta2 1.0: must be in [0, 1)"),
    (["--vllm-gpu-memory-utilization", "1.5"], "--vllm-gpu-memory-utilization 1.5: must be in (0, 1]"),
    (["--hang-timeout-s", "0"], "--hang-timeout-s 0.0: must be > 0"),
])
def test_values_out_of_range_are_refused_naming_the_flag(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_ranges(parse_config(BASE + argv))


@pytest.mark.parametrize("argv,world,message", [
    (["--tensor-model-parallel-size", "3"], 4, "--tensor-model-parallel-size 3 does not divide the world of 4"),
    (["--rollout-num-gpus-per-engine", "4"], 2, "--rollout-num-gpus-per-engine 4 does not divide"),
    (["--rollout-batch-size", "3"], 2, "not divisible by the 2 engines"),
    (["--global-batch-size", "6"], 1, "--global-batch-size 6 does not divide the 32 samples"),
    # 32 samples per step over 2 data-parallel ranks x micro-batch 16 is fine; x micro-batch 32 is not.
    (["--micro-batch-size", "32"], 2, "use a multiple of 64"),
    (["--pipeline-model-parallel-size", "0"], 1, "--pipeline-model-parallel-size 0: must be at least 1"),
    (["--rollout-top-p", "0"], 1, "--rollout-top-p"),
    (["--keep-last-n-checkpoints", "2"], 1, "--keep-last-n-checkpoints 2: needs --save DIR"),
    (["--save", "c", "--keep-last-n-checkpoints", "0"], 1, "--keep-last-n-checkpoints 0: needs --save DIR and a value"),
    (["--save-hf-interval", "5"], 1, "--save-hf-interval 5: needs --save-hf DIR"),
    (["--loss-type", "sft", "--use-kl-loss", "--kl-coef", "0.1"], 1,
     "--use-kl-loss, --kl-coef: RL options; --loss-type sft trains on the records' responses"),
    # SFT takes one sample per record: 8 records, whatever --n-samples-per-prompt says
    (["--loss-type", "sft", "--global-batch-size", "16"], 1,
     "--global-batch-size 16 does not divide the 8 samples of a rollout (--rollout-batch-size records"),
])
def test_inconsistent_flags_are_refused_naming_the_flag(argv, world, message):
    cfg = parse_config(BASE + ["--rollout-batch-size", "8"] + argv)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        validate(cfg, world)


def test_sft_trains_on_one_sample_per_record_and_accepts_slimes_name():
    for name in ("sft", "sft_loss"):
        cfg = parse_config(BASE + ["--loss-type", name, "--rollout-batch-size", "8", "--n-samples-per-prompt", "4"])
        validate(cfg, 2)
        assert cfg.sft and cfg.num_samples_per_rollout == 8 and cfg.global_batch_size == 8
    rl = parse_config(BASE + ["--rollout-batch-size", "8", "--n-samples-per-prompt", "4"])
    assert not rl.sft and rl.num_samples_per_rollout == 32


def test_sgd_is_honoured_and_refused_with_the_distributed_optimizer():
    cfg = parse_config(BASE + ["--optimizer", "sgd", "--sgd-momentum", "0"])
    validate(cfg, 1)
    assert (cfg.optimizer.optimizer, cfg.optimizer.sgd_momentum) == ("sgd", 0.0)
    with pytest.raises(ValueError, match="--optimizer sgd with --use-distributed-optimizer"):
        validate(parse_config(BASE + ["--optimizer", "sgd", "--use-distributed-optimizer"]), 1)
    with pytest.raises(ValueError, match="--sgd-momentum 1.0: must be in"):
        validate(parse_config(BASE + ["--optimizer", "sgd", "--sgd-momentum", "1"]), 1)
