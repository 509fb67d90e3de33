"""Typed configuration, one dataclass per component, and the vime/slime-compatible command line.

Each field is one flag: `rollout_batch_size` is `--rollout-batch-size`. A field's `help` metadata is its
documentation. Cross-field checks live in `validate`, so that a user mistake stops the run before any work with
a message naming the flag and the fix. Bad flags that argparse can see (unknown names, wrong types) stop it too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints


def opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    hf_checkpoint: str = opt(None, "HF model directory: architecture, tokenizer and initial weights", required=True)
    ref_load: str | None = opt(None, "the reference model for KL: an HF folder, or a torch_dist checkpoint (a --save "
                                     "folder or one of its iter_* folders); default: the initial weights")


@dataclass
class ParallelConfig:
    device: str = opt("auto", "accelerator: auto, cpu, cuda or npu", choices=["auto", "cpu", "cuda", "npu"])
    tensor_model_parallel_size: int = opt(1, "training tensor-parallel size")
    pipeline_model_parallel_size: int = opt(1, "training pipeline-parallel size (stages of layers): 1 or 2")
    make_vocab_size_divisible_by: int = opt(1, "pad the Megatron vocabulary to a multiple of this (times the TP size)")
    rollout_num_gpus_per_engine: int = opt(1, "ranks per vLLM engine (the engine's tensor-parallel size)")
    colocate: bool = opt(True, "training and rollout share the same devices (the only mode)")
    weight_sync_transport: str = opt("auto", "how training shards reach the engines: shm (shared memory within a "
                                             "node), collective (process groups), or auto",
                                     choices=["auto", "shm", "collective"])
    weight_sync_format: str = opt("auto", "how weights enter the engine: direct (each engine rank copies its own "
                                          "share into the engine's tensors), reload (full HF tensors through "
                                          "vLLM's reload_weights), or auto (direct on CPU and CUDA, reload on NPU)",
                                  choices=["auto", "direct", "reload"])
    update_weight_buffer_size: int = opt(512 << 20, "bytes of weights handed to the engine per call during sync")


@dataclass
class RolloutConfig:
    rollout_batch_size: int = opt(8, "prompts per rollout step (over all engines)")
    n_samples_per_prompt: int = opt(4, "responses generated per prompt (the GRPO group)")
    rollout_temperature: float = opt(1.0, "sampling temperature")
    rollout_top_p: float = opt(1.0, "nucleus sampling threshold")
    rollout_max_response_len: int = opt(64, "most tokens generated per response")
    rollout_max_prompt_len: int = opt(256, "longest prompt in tokens; sets the engine's max_model_len with the above")
    over_sampling_batch_size: int | None = opt(None, "prompts generated per round when dynamic sampling "
                                                     "filters groups (default: --rollout-batch-size)")
    dynamic_sampling_filter_path: str | None = opt(None, "DAPO dynamic sampling: keep a group when fn(rewards) is "
                                                         "true, e.g. check_reward_nonzero_std or module.function")
    overlong_buffer_len: int = opt(0, "DAPO overlong penalty: the last tokens before --rollout-max-response-len "
                                      "over which the penalty grows (0: off)")
    overlong_penalty_factor: float = opt(1.0, "DAPO overlong penalty at --rollout-max-response-len")
    vllm_load_format: str = opt("auto", "the engine's first weights: auto (read from --hf-checkpoint) or dummy (not "
                                        "read; the trainer's weights are synced in before the first rollout)",
                                choices=["auto", "dummy"])
    vllm_kv_cache_bytes: int = opt(256 << 20, "KV-cache size per engine rank on CPU, in bytes")
    vllm_gpu_memory_utilization: float = opt(0.5, "fraction of device memory for vLLM on accelerators")
    vllm_enable_sleep_mode: bool = opt(True, "start the engine with vLLM sleep mode on accelerators, so that it hands "
                                             "its memory to the trainer (on by default: --colocate is the only mode)")


@dataclass
class AlgorithmConfig:
    advantage_estimator: str = opt("grpo", "advantage estimator",
                                   choices=["grpo", "gspo", "rloo", "reinforce_plus_plus",
                                            "reinforce_plus_plus_baseline"])
    disable_grpo_std_normalization: bool = opt(False, "GRPO without dividing by the group std (Dr.GRPO)")
    eps_clip: float = opt(0.2, "PPO clip range (lower, and upper unless --eps-clip-high)")
    eps_clip_high: float | None = opt(None, "PPO upper clip range (DAPO clip-higher)")
    eps_clip_c: float | None = opt(None, "dual-clip bound (> 1) for negative advantages")
    use_tis: bool = opt(False, "truncated importance sampling between rollout and trainer logprobs")
    tis_clip: float = opt(2.0, "upper bound of the truncated importance weight")
    tis_clip_low: float = opt(0.0, "lower bound of the truncated importance weight")
    use_kl_loss: bool = opt(False, "add a KL(actor || reference) term to the loss")
    kl_loss_coef: float = opt(0.0, "weight of the KL loss")
    kl_loss_type: str = opt("low_var_kl", "KL estimator (for the loss and the reward penalty)",
                            choices=["k1", "k2", "k3", "low_var_kl"])
    kl_coef: float = opt(0.0, "KL(actor || reference) as a reward penalty: per token for reinforce_plus_plus, "
                              "summed over the response for the other estimators")
    entropy_coef: float = opt(0.0, "weight of the entropy bonus (subtracted from the loss)")
    calculate_per_token_loss: bool = opt(True, "average the loss over tokens (else over sequences)")


@dataclass
class OptimizerConfig:
    lr: float = opt(1e-6, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.98, "AdamW beta2")
    clip_grad: float = opt(1.0, "clip the global gradient norm to this value")


@dataclass
class DataConfig:
    prompt_data: str = opt(None, "jsonl or .parquet file of prompt records", required=True)
    input_key: str = opt("prompt", "record key of the prompt: a string or a list of chat messages")
    label_key: str = opt("label", "record key of the reference answer given to the reward")
    metadata_key: str = opt("metadata", "record key of an object passed to custom rewards as metadata (optional)")
    apply_chat_template: bool = opt(False, "render string prompts with the tokenizer's chat template too "
                                           "(a list of chat messages is always rendered with it)")
    skip_bad_records: bool = opt(False, "skip and count malformed records instead of stopping at the first")
    rm_type: str | None = opt(None, "rule-based reward: math (default), dapo, deepscaler, or letter (the demo "
                                    "task); custom when --custom-rm-path is given")
    custom_rm_path: str | None = opt(None, "a reward function fn(response, label, metadata) -> float (sync or "
                                           "async), as package.module.function or path/to/file.py:function")
    reward_timeout_s: float = opt(10.0, "a reward slower than this scores 0 and counts as a failure")


@dataclass
class TrainConfig:
    num_rollout: int = opt(10, "RL steps to run")
    global_batch_size: int | None = opt(None, "samples per optimizer step (default: the whole rollout)")
    micro_batch_size: int = opt(4, "samples per forward/backward pass on one rank")
    seed: int = opt(1234, "seed of sampling, data order and initialisation")
    train_memory_margin_bytes: int = opt(1 << 30, "device memory kept free when the trainer resumes or allocates "
                                                  "in its regions (accelerators); less stops the run with an error")


@dataclass
class CheckpointConfig:
    save: str | None = opt(None, "folder for checkpoints (policy shards, optimizer, data position), written atomically")
    save_interval: int | None = opt(None, "save every this many steps (and after the last); default: only after "
                                          "the last")
    load: str | None = opt(None, "resume from the latest checkpoint in this folder, in any training layout; with no "
                                 "checkpoint inside, start from --hf-checkpoint (so --load X --save X also serves the "
                                 "first launch)")
    save_optim: bool = opt(True, "save the optimizer state with each checkpoint (--no-save-optim: weights only; a "
                                 "resumed run then starts its optimizer afresh)")
    keep_last_n_checkpoints: int | None = opt(None, "after each save, delete all but the newest N checkpoints in --save")
    save_hf: str | None = opt(None, "also write the policy as an HF model folder: DIR/iter_XXXXXXX, or DIR with "
                                    "{rollout_id} filled in")
    save_hf_interval: int | None = opt(None, "write --save-hf every this many steps (and after the last); default: "
                                             "only after the last")


@dataclass
class LogConfig:
    log_dir: str | None = opt(None, "folder for metrics.jsonl (default: runs/<time>)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def num_samples_per_rollout(self) -> int:
        return self.rollout.rollout_batch_size * self.rollout.n_samples_per_prompt

    @property
    def global_batch_size(self) -> int:
        return self.train.global_batch_size or self.num_samples_per_rollout


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py", description="Colocated GRPO with Megatron-core and vLLM",
                                     allow_abbrev=False)
    for group_field in dataclasses.fields(Config):
        group_cls = group_field.default_factory  # type: ignore[misc]
        group = parser.add_argument_group(group_field.name)
        hints = get_type_hints(group_cls)
        for f in dataclasses.fields(group_cls):
            kind = hints[f.name]
            kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
            if kind is bool:
                kw.update(action=argparse.BooleanOptionalAction, default=f.default)
            else:
                base = next((t for t in (int, float, str) if t == kind or t | None == kind), str)
                kw.update(type=base, default=f.default)
                if f.metadata.get("required"):
                    kw["required"] = True
                if "choices" in f.metadata:
                    kw["choices"] = f.metadata["choices"]
            group.add_argument(_flag(f.name), **kw)
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    ns = vars(build_parser().parse_args(argv))
    groups = {}
    for group_field in dataclasses.fields(Config):
        group_cls = group_field.default_factory  # type: ignore[misc]
        groups[group_field.name] = group_cls(**{f.name: ns[f.name] for f in dataclasses.fields(group_cls)})
    cfg = Config(**groups)
    if cfg.log.log_dir is None:
        cfg.log.log_dir = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    return cfg


PIPELINE_SIZES = (1, 2)  # pipeline stages the training backend is tested with


def validate(cfg: Config, world_size: int) -> None:
    """Checks that need no file access: sizes, divisibility, and ranges. Raise ValueError naming the fix.
    Also resolves `--rm-type` (custom when `--custom-rm-path` is given, else math by default)."""
    p, r, t = cfg.parallel, cfg.rollout, cfg.train
    positive = {"--tensor-model-parallel-size": p.tensor_model_parallel_size,
                "--rollout-num-gpus-per-engine": p.rollout_num_gpus_per_engine,
                "--rollout-batch-size": r.rollout_batch_size, "--n-samples-per-prompt": r.n_samples_per_prompt,
                "--rollout-max-response-len": r.rollout_max_response_len, "--micro-batch-size": t.micro_batch_size,
                "--num-rollout": t.num_rollout, "--global-batch-size": cfg.global_batch_size}
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    pp = p.pipeline_model_parallel_size
    if pp not in PIPELINE_SIZES:
        raise ValueError(f"--pipeline-model-parallel-size {pp}: choose one of {', '.join(map(str, PIPELINE_SIZES))}")
    if not p.colocate:
        raise ValueError("--no-colocate: vime-spmd always colocates training and rollout; drop the flag")
    tp = p.tensor_model_parallel_size
    if world_size % tp:
        raise ValueError(f"--tensor-model-parallel-size {tp} does not divide the world of {world_size} ranks; "
                         f"choose a divisor of {world_size}")
    engine = p.rollout_num_gpus_per_engine
    if world_size % engine:
        raise ValueError(f"--rollout-num-gpus-per-engine {engine} does not divide the world of {world_size} "
                         f"ranks; choose a divisor of {world_size}")
    num_engines = world_size // engine
    if r.rollout_batch_size % num_engines:
        raise ValueError(f"--rollout-batch-size {r.rollout_batch_size} is not divisible by the {num_engines} "
                         f"engines; use a multiple of {num_engines}")
    if world_size % (tp * pp):
        raise ValueError(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} does not divide "
                         f"the world of {world_size} ranks; choose sizes whose product divides {world_size}")
    dp = world_size // (tp * pp)
    total = cfg.num_samples_per_rollout
    gbs = cfg.global_batch_size
    if total % gbs:
        raise ValueError(f"--global-batch-size {gbs} does not divide the {total} samples of a rollout "
                         f"(--rollout-batch-size x --n-samples-per-prompt); use a divisor of {total}")
    if gbs % (dp * t.micro_batch_size):
        raise ValueError(f"--global-batch-size {gbs} is not divisible by data-parallel size {dp} x "
                         f"--micro-batch-size {t.micro_batch_size}; use a multiple of {dp * t.micro_batch_size}")
    if not 0 < r.rollout_top_p <= 1:
        raise ValueError(f"--rollout-top-p {r.rollout_top_p}: must be in (0, 1]")
    if r.rollout_temperature <= 0:
        raise ValueError(f"--rollout-temperature {r.rollout_temperature}: must be > 0 (logprobs need sampling)")
    c = cfg.checkpoint
    if c.save_interval is not None and (c.save_interval < 1 or c.save is None):
        raise ValueError(f"--save-interval {c.save_interval}: needs --save DIR and a value >= 1")
    if c.keep_last_n_checkpoints is not None and (c.keep_last_n_checkpoints < 1 or c.save is None):
        raise ValueError(f"--keep-last-n-checkpoints {c.keep_last_n_checkpoints}: needs --save DIR and a value >= 1")
    if c.save_hf_interval is not None and (c.save_hf_interval < 1 or c.save_hf is None):
        raise ValueError(f"--save-hf-interval {c.save_hf_interval}: needs --save-hf DIR and a value >= 1")
    if cfg.algorithm.use_kl_loss and cfg.algorithm.kl_loss_coef <= 0:
        raise ValueError("--use-kl-loss needs --kl-loss-coef > 0")
    a = cfg.algorithm
    if a.eps_clip_c is not None and a.eps_clip_c <= 1:
        raise ValueError(f"--eps-clip-c {a.eps_clip_c}: the dual-clip bound must be > 1 (3.0 is usual)")
    if a.use_tis and not 0 <= a.tis_clip_low < a.tis_clip:
        raise ValueError(f"--tis-clip-low {a.tis_clip_low} / --tis-clip {a.tis_clip}: need 0 <= low < high")
    if a.kl_coef < 0:
        raise ValueError(f"--kl-coef {a.kl_coef}: must be >= 0")
    if a.advantage_estimator == "rloo" and r.n_samples_per_prompt < 2:
        raise ValueError("--advantage-estimator rloo needs --n-samples-per-prompt >= 2 (a leave-one-out baseline)")
    d = cfg.data
    if d.custom_rm_path and d.rm_type not in (None, "custom"):
        raise ValueError(f"--rm-type {d.rm_type} and --custom-rm-path both name a reward; keep one")
    if d.rm_type == "custom" and not d.custom_rm_path:
        raise ValueError("--rm-type custom needs --custom-rm-path package.module.function")
    d.rm_type = "custom" if d.custom_rm_path else d.rm_type or "math"
    if d.reward_timeout_s <= 0:
        raise ValueError(f"--reward-timeout-s {d.reward_timeout_s}: must be > 0")
    oversample = r.over_sampling_batch_size
    if oversample is not None and r.dynamic_sampling_filter_path is None:
        raise ValueError("--over-sampling-batch-size only applies with --dynamic-sampling-filter-path; add one")
    if oversample is not None and (oversample < 1 or oversample % num_engines):
        raise ValueError(f"--over-sampling-batch-size {oversample}: must be a positive multiple of the "
                         f"{num_engines} engines")
    if not 0 <= r.overlong_buffer_len < r.rollout_max_response_len:
        raise ValueError(f"--overlong-buffer-len {r.overlong_buffer_len}: must be in [0, "
                         f"--rollout-max-response-len {r.rollout_max_response_len})")


def dump(cfg: Config, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=1))
