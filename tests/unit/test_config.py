"""The command line users coming from vime/slime expect, and the checks that refuse inconsistent flags."""

from __future__ import annotations

import dataclasses
import re
from typing import get_args, get_origin, get_type_hints

import pytest

from vime_spmd import rewards
from vime_spmd.config import RM_TYPES, Config, build_parser, check_config, parse_config

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
    check_config(cfg, 1)


@pytest.mark.parametrize("argv,message", [
    (["--lr", "-1"], "--lr -1.0: must be > 0"),
    (["--kl-loss-coef", "-0.1"], "--kl-loss-coef -0.1: must be >= 0"),
    (["--adam-beta2", "1"], "--adam-beta2 1.0: must be in [0, 1)"),
    (["--vllm-gpu-memory-utilization", "1.5"], "--vllm-gpu-memory-utilization 1.5: must be in (0, 1]"),
    (["--hang-timeout-s", "0"], "--hang-timeout-s 0.0: must be > 0"),
])
def test_values_out_of_range_are_refused_naming_the_flag(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_config(parse_config(BASE + argv), 1)


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
        check_config(cfg, world)


def test_sft_trains_on_one_sample_per_record_and_accepts_slimes_name():
    for name in ("sft", "sft_loss"):
        cfg = parse_config(BASE + ["--loss-type", name, "--rollout-batch-size", "8", "--n-samples-per-prompt", "4"])
        check_config(cfg, 2)
        assert cfg.sft and cfg.num_samples_per_rollout == 8 and cfg.global_batch_size == 8
    rl = parse_config(BASE + ["--rollout-batch-size", "8", "--n-samples-per-prompt", "4"])
    assert not rl.sft and rl.num_samples_per_rollout == 32


def test_sgd_is_honoured_and_refused_with_the_distributed_optimizer():
    cfg = parse_config(BASE + ["--optimizer", "sgd", "--sgd-momentum", "0"])
    check_config(cfg, 1)
    assert (cfg.optimizer.optimizer, cfg.optimizer.sgd_momentum) == ("sgd", 0.0)
    with pytest.raises(ValueError, match="--optimizer sgd with --use-distributed-optimizer"):
        check_config(parse_config(BASE + ["--optimizer", "sgd", "--use-distributed-optimizer"]), 1)
    with pytest.raises(ValueError, match="--sgd-momentum 1.0: must be in"):
        check_config(parse_config(BASE + ["--optimizer", "sgd", "--sgd-momentum", "1"]), 1)


# A bad value of every numeric flag (int or float, optional or a list of them): (value, flags it needs to apply).
# A new numeric flag without an entry here, or in NO_BAD_VALUE with the reason, fails the test below.
EVAL = ("--eval-prompt-data", "a", "x.jsonl")
BAD = {
    "--tensor-model-parallel-size": ("0",), "--pipeline-model-parallel-size": ("0",),
    "--make-vocab-size-divisible-by": ("0",), "--rollout-num-gpus-per-engine": ("0",),
    "--update-weight-buffer-size": ("0",),
    "--rollout-batch-size": ("0",), "--n-samples-per-prompt": ("0",), "--rollout-temperature": ("0",),
    "--rollout-top-p": ("1.5",), "--rollout-max-response-len": ("0",), "--rollout-max-prompt-len": ("0",),
    "--over-sampling-batch-size": ("0", "--dynamic-sampling-filter-path", "check_reward_nonzero_std"),
    "--overlong-buffer-len": ("-1",), "--overlong-penalty-factor": ("-1",), "--vllm-kv-cache-bytes": ("0",),
    "--vllm-gpu-memory-utilization": ("0",), "--rollout-top-k": ("-2",), "--rollout-stop-token-ids": ("-1",),
    "--rollout-seed": ("-1",), "--max-turns": ("0",), "--tool-timeout-s": ("0",),
    "--eps-clip": ("0",), "--eps-clip-high": ("0",), "--eps-clip-c": ("1",), "--tis-clip": ("0", "--use-tis"),
    "--tis-clip-low": ("-1", "--use-tis"), "--kl-loss-coef": ("-1",), "--kl-coef": ("-1",), "--entropy-coef": ("-1",),
    "--sgd-momentum": ("1",), "--lr": ("0",), "--weight-decay": ("-1",), "--adam-beta1": ("1",),
    "--adam-beta2": ("1",), "--clip-grad": ("0",), "--lr-warmup-iters": ("-1",), "--lr-decay-iters": ("0",),
    "--min-lr": ("-1",),
    "--reward-timeout-s": ("0",),
    "--num-rollout": ("0",), "--global-batch-size": ("0",), "--micro-batch-size": ("0",),
    "--max-tokens-per-gpu": ("0",),
    "--log-probs-max-tokens-per-gpu": ("0", "--use-dynamic-batch-size", "--max-tokens-per-gpu", "64"),
    "--seed": ("-1",),
    "--recompute-num-layers": ("0",),
    "--train-memory-margin-bytes": ("-1",),
    "--save-interval": ("0", "--save", "c"), "--keep-last-n-checkpoints": ("0", "--save", "c"),
    "--save-hf-interval": ("0", "--save-hf", "h"),
    "--eval-interval": ("0", *EVAL), "--n-samples-per-eval-prompt": ("0", *EVAL),
    "--eval-max-response-len": ("0", *EVAL), "--eval-temperature": ("-1", *EVAL), "--eval-top-p": ("0", *EVAL),
    "--log-samples-interval": ("0",),
    "--hang-timeout-s": ("0",), "--phase-timeout-s": ("0",),
}
NO_BAD_VALUE = {  # flag -> why the config alone cannot refuse any value
    "--decoder-first-pipeline-num-layers": "checked with the model's layer count in prepare (parallel.pipeline_split)",
    "--decoder-last-pipeline-num-layers": "checked with the model's layer count in prepare (parallel.pipeline_split)",
}


def numeric_flags() -> set[str]:
    numeric = set()
    for group in dataclasses.fields(Config):
        section = group.default_factory
        hints = get_type_hints(section)
        for f in dataclasses.fields(section):
            kinds = {hints[f.name], *get_args(hints[f.name])}
            kinds |= {item for kind in list(kinds) if get_origin(kind) is list for item in get_args(kind)}
            if kinds & {int, float}:
                numeric.add("--" + f.name.replace("_", "-"))
    return numeric


def test_every_numeric_flag_has_a_bad_value_or_a_reason():
    assert numeric_flags() == set(BAD) | set(NO_BAD_VALUE)


@pytest.mark.parametrize("flag", sorted(BAD))
def test_one_bad_value_makes_exactly_one_error_naming_its_flag(flag):
    value, *needs = BAD[flag]
    assert parse_config(BASE + ["--rollout-batch-size", "8", *needs]).check(world_size=1) == []
    problems = parse_config(BASE + ["--rollout-batch-size", "8", *needs, flag, value]).check(world_size=1)
    assert len(problems) == 1 and re.search(rf"{flag}(?![\w-])", problems[0]), problems


def test_every_problem_is_reported_in_one_error_and_rules_across_flags_wait_for_the_single_flags():
    with pytest.raises(ValueError) as error:
        check_config(parse_config(BASE + ["--eps-clip", "0", "--lr", "0", "--hang-timeout-s", "0",
                                          "--tensor-model-parallel-size", "3"]), 4)
    assert str(error.value) == ("3 problems: (1) --eps-clip 0.0: must be > 0; (2) --lr 0.0: must be > 0 (1e-6 is "
                                "usual for RL on a pretrained model); (3) --hang-timeout-s 0.0: must be > 0")
    with pytest.raises(ValueError) as error:  # the single flags are fine: now the rules across them
        check_config(parse_config(BASE + ["--tensor-model-parallel-size", "3", "--loss-type", "sft", "--use-tis"]), 4)
    assert str(error.value).startswith("2 problems: (1) --tensor-model-parallel-size 3 does not divide the world of 4")
    assert "(2) --use-tis: RL options" in str(error.value)


def test_the_parsed_config_is_resolved_and_frozen():
    cfg = parse_config(BASE + ["--rollout-batch-size", "8", "--attention-backend", "unfused", "--num-rollout", "5"])
    assert (cfg.data.rm_type, cfg.train.attention_backend, cfg.train.log_probs_max_tokens_per_gpu) == \
        ("math", "local", None)
    assert cfg.train.global_batch_size == cfg.global_batch_size == 32 and cfg.lr_decay_iters == 5
    assert cfg.log.log_dir.startswith("runs/")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.seed = 1
    custom = parse_config(BASE + ["--custom-rm-path", "m.f", "--use-dynamic-batch-size", "--max-tokens-per-gpu", "64"])
    assert (custom.data.rm_type, custom.train.log_probs_max_tokens_per_gpu) == ("custom", 64)
    with pytest.raises(ValueError, match="--rm-type dapo and --custom-rm-path both name a reward; keep one"):
        check_config(parse_config(BASE + ["--rm-type", "dapo", "--custom-rm-path", "m.f"]), 1)


def test_rm_type_is_one_of_the_rewards_choices():
    assert rewards.RM_TYPES is RM_TYPES
    with pytest.raises(ValueError, match=r"argument --rm-type: invalid choice: 'nonsense' \(choose from 'math'"):
        parse_config(BASE + ["--rm-type", "nonsense"])


def test_an_unknown_flag_is_not_told_to_become_an_ignored_one():
    with pytest.raises(ValueError) as error:  # --num-layers is a slime flag we accept and ignore
        parse_config(BASE + ["--num-layer", "4"])
    assert str(error.value) == "unknown flag: --num-layer; python run.py --help lists every flag"
