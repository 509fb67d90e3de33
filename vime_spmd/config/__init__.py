"""Typed configuration, one dataclass per component, and the vime/slime-compatible command line.

Each field is one flag: `rollout_batch_size` is `--rollout-batch-size`. A field's `help` metadata is its
documentation. Cross-field checks live in `validate`, so that a user mistake stops the run before any work with
a message naming the flag and the fix. Bad flags that argparse can see (unknown names, wrong types) stop it too.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from . import compat

# Megatron-LM's --attention-backend values (what slime scripts pass) and the backend of ours that does that job.
ATTENTION_BACKEND_ALIASES = {"flash": "sdpa", "fused": "sdpa", "auto": "sdpa", "unfused": "local"}


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
    pipeline_model_parallel_size: int = opt(1, "training pipeline-parallel size (stages of layers)")
    decoder_first_pipeline_num_layers: int | None = opt(None, "layers of the first pipeline stage (default: an even "
                                                              "split, or an automatic one when uneven)")
    decoder_last_pipeline_num_layers: int | None = opt(None, "layers of the last pipeline stage (default: as above)")
    sequence_parallel: bool = opt(False, "split activations outside the tensor-parallel layers along the sequence "
                                         "(needs --tensor-model-parallel-size > 1)")
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
    rollout_top_k: int = opt(-1, "sample from the k most likely tokens only (-1: all)")
    rollout_stop: list[str] | None = opt(None, "strings that end a response (not included in the response text)")
    rollout_stop_token_ids: list[int] | None = opt(None, "token ids that end a response, besides end-of-sequence")
    rollout_seed: int | None = opt(None, "seed of the engines' sampling (default: --seed); each request is seeded "
                                         "from it and its prompt's position in the data stream")


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
    kl_loss_coef: float = opt(0.0, "weight of the KL loss (0 with --use-kl-loss: the KL is computed and logged but "
                                   "not added to the loss, as in slime)")
    kl_loss_type: str = opt("low_var_kl", "KL estimator (for the loss and the reward penalty)",
                            choices=["k1", "k2", "k3", "low_var_kl"])
    kl_coef: float = opt(0.0, "KL(actor || reference) as a reward penalty: per token for reinforce_plus_plus, "
                              "summed over the response for the other estimators")
    entropy_coef: float = opt(0.0, "weight of the entropy bonus (subtracted from the loss)")
    calculate_per_token_loss: bool = opt(True, "average the loss over tokens (else over sequences)")
    loss_type: str = opt("policy_loss", "what a step optimises: policy_loss (RL: rollout, reward, advantages) or sft "
                                        "(supervised fine-tuning on the records' responses, --response-key, with "
                                        "the prompt tokens masked; no rollout; sft_loss is accepted as a name)",
                         choices=["policy_loss", "sft", "sft_loss"])


@dataclass
class OptimizerConfig:
    optimizer: str = opt("adam", "adam (AdamW: decoupled weight decay) or sgd (with --sgd-momentum)",
                         choices=["adam", "sgd"])
    sgd_momentum: float = opt(0.9, "with --optimizer sgd: the momentum (Megatron's default, 0.9)")
    lr: float = opt(1e-6, "learning rate")
    weight_decay: float = opt(0.0, "weight decay (decoupled with adam)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.98, "AdamW beta2")
    clip_grad: float = opt(1.0, "clip the global gradient norm to this value")
    lr_decay_style: str = opt("constant", "learning-rate schedule after warmup (Megatron's scheduler)",
                              choices=["constant", "linear", "cosine"])
    lr_warmup_iters: int = opt(0, "optimizer steps of linear warmup from 0 to --lr")
    lr_decay_iters: int | None = opt(None, "optimizer steps over which the rate decays from --lr to --min-lr "
                                           "(default: every optimizer step of the run)")
    min_lr: float = opt(0.0, "learning rate at the end of the decay")
    use_distributed_optimizer: bool = opt(False, "shard the optimizer state (fp32 main params, Adam moments) over "
                                                 "the data-parallel ranks")


@dataclass
class DataConfig:
    prompt_data: str = opt(None, "jsonl or .parquet file of prompt records", required=True)
    input_key: str = opt("prompt", "record key of the prompt: a string or a list of chat messages")
    label_key: str = opt("label", "record key of the reference answer given to the reward")
    response_key: str = opt("response", "with --loss-type sft: record key of the response to learn (a string)")
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
    micro_batch_size: int = opt(4, "samples per forward/backward pass on one rank (without "
                                   "--use-dynamic-batch-size)")
    use_dynamic_batch_size: bool = opt(False, "group each rank's samples into micro-batches by a token budget "
                                              "(--max-tokens-per-gpu) instead of --micro-batch-size samples")
    max_tokens_per_gpu: int | None = opt(None, "with --use-dynamic-batch-size: tokens per training micro-batch, "
                                               "padding included (padded length x samples); a longer sample is "
                                               "trained alone")
    log_probs_max_tokens_per_gpu: int | None = opt(None, "with --use-dynamic-batch-size: tokens per micro-batch of "
                                                         "the logprob passes (default: --max-tokens-per-gpu)")
    seed: int = opt(1234, "seed of sampling, data order and initialisation")
    attention_backend: str = opt("sdpa", "core attention: sdpa (causal scaled_dot_product_attention, no [s, s] mask "
                                         "or scores kept) or local (Megatron's unfused attention); Megatron-LM's "
                                         "names from slime scripts map onto these: flash, fused, auto -> sdpa; "
                                         "unfused -> local",
                                 choices=["sdpa", "local", *ATTENTION_BACKEND_ALIASES])
    recompute_granularity: str | None = opt(None, "activation recompute: full (whole layers) or selective (the core "
                                                  "attention)", choices=["full", "selective"])
    recompute_method: str | None = opt(None, "with full recompute: uniform (every layer, in chunks of "
                                             "--recompute-num-layers) or block (the first --recompute-num-layers "
                                             "layers of each stage)", choices=["uniform", "block"])
    recompute_num_layers: int | None = opt(None, "with full recompute: layers per chunk (uniform) or per stage "
                                                 "(block)")
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
    keep_last_n_checkpoints: int | None = opt(None, "after each save, delete all but the newest N checkpoints in "
                                                    "--save")
    save_hf: str | None = opt(None, "also write the policy as an HF model folder: DIR/iter_XXXXXXX, or DIR with "
                                    "{rollout_id} filled in")
    save_hf_interval: int | None = opt(None, "write --save-hf every this many steps (and after the last); default: "
                                             "only after the last")


@dataclass
class EvalConfig:
    eval_prompt_data: list[str] | None = opt(None, "held-out prompt sets to evaluate during training: NAME PATH "
                                                   "[NAME PATH ...] (jsonl or .parquet, the --prompt-data schema)",
                                             metavar="NAME PATH")
    eval_interval: int | None = opt(None, "evaluate every this many steps (always before step 1 and after the last)")
    n_samples_per_eval_prompt: int = opt(1, "responses generated per eval prompt (pass@k for k = 1, 2, 4, ... up "
                                            "to it)")
    eval_max_response_len: int | None = opt(None, "most tokens per eval response (default: --rollout-max-response-len)")
    eval_temperature: float | None = opt(None, "eval sampling temperature, 0 for greedy (default: "
                                               "--rollout-temperature)")
    eval_top_p: float | None = opt(None, "eval nucleus sampling threshold (default: --rollout-top-p)")


@dataclass
class LogConfig:
    log_dir: str | None = opt(None, "folder for metrics.jsonl (default: runs/<time>)")
    use_tensorboard: bool = opt(False, "write TensorBoard events under <log-dir>/tensorboard (rank 0; needs the "
                                       "observe extra)")
    use_wandb: bool = opt(False, "log to Weights & Biases (rank 0; needs the observe extra; WANDB_MODE=offline "
                                 "writes under <log-dir>/wandb without network)")
    wandb_project: str | None = opt(None, "wandb project (default: vime-spmd)")
    wandb_group: str | None = opt(None, "wandb group of the run")
    wandb_run_name: str | None = opt(None, "wandb run name (default: the log folder's name)")
    log_samples_interval: int | None = opt(None, "every this many steps, write a few prompts with their responses, "
                                                 "rewards and labels to <log-dir>/samples.jsonl (and TensorBoard)")
    verbose: bool = opt(False, "show the libraries' (Megatron, vLLM, transformers) log lines and warnings")


@dataclass
class ResilienceConfig:
    hang_timeout_s: float = opt(120.0, "end the job when a rank has sent no heartbeat for this long (a stopped or "
                                       "dead rank); the heartbeat is a thread, so long phases do not count")
    phase_timeout_s: float | None = opt(None, "end the job when one phase of a step (e.g. the rollout) runs longer "
                                              "than this (default: no limit)")


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def sft(self) -> bool:
        """Supervised fine-tuning (`--loss-type sft`): a step trains on records' responses, one sample per record."""
        return self.algorithm.loss_type in ("sft", "sft_loss")

    @property
    def num_samples_per_rollout(self) -> int:
        """Samples a step trains on: every prompt's group, or with --loss-type sft one per record."""
        return self.rollout.rollout_batch_size * (1 if self.sft else self.rollout.n_samples_per_prompt)

    @property
    def global_batch_size(self) -> int:
        return self.train.global_batch_size or self.num_samples_per_rollout

    @property
    def num_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run (the learning-rate schedule's iterations)."""
        return self.train.num_rollout * (self.num_samples_per_rollout // self.global_batch_size)

    @property
    def lr_decay_iters(self) -> int:
        return self.optimizer.lr_decay_iters or self.num_optimizer_steps


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class FlagParser(argparse.ArgumentParser):
    """Bad flags raise ValueError (one `error:` line from run.py), an unknown one with the closest known name."""

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if not unknown:
            raise ValueError(f"{message} (python run.py --help lists every flag)")
        flags = [word for word in unknown.group(1).split() if word.startswith("--")] or unknown.group(1).split()
        known = list(self._option_string_actions)
        hints = []
        for flag in flags:
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.8)
            hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
        raise ValueError(f"unknown flag{'s' if len(flags) > 1 else ''}: {', '.join(hints)}; python run.py --help "
                         "lists every flag")


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="run.py", description="Colocated GRPO with Megatron-core and vLLM", allow_abbrev=False)
    for group_field in dataclasses.fields(Config):
        group_cls = group_field.default_factory  # type: ignore[misc]
        group = parser.add_argument_group(group_field.name)
        hints = get_type_hints(group_cls)
        for f in dataclasses.fields(group_cls):
            kind = hints[f.name]
            kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
            if kind is bool:
                kw.update(action=argparse.BooleanOptionalAction, default=f.default)
            elif list in (get_origin(t) for t in (kind, *get_args(kind))):  # list[X] or list[X] | None
                item = next(get_args(t)[0] for t in (kind, *get_args(kind)) if get_origin(t) is list)
                kw.update(nargs="+", type=item, default=f.default)
                if "metavar" in f.metadata:
                    kw["metavar"] = f.metadata["metavar"]
            else:
                base = next((t for t in (int, float, str) if t == kind or t | None == kind), str)
                kw.update(type=base, default=f.default)
                if f.metadata.get("required"):
                    kw["required"] = True
                if "choices" in f.metadata:
                    kw["choices"] = f.metadata["choices"]
            group.add_argument(_flag(f.name), **kw)
    compat.add_ignored_flags(parser)
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    ns = vars(build_parser().parse_args(argv))
    ignored = compat.take_ignored(ns)
    if ignored and os.environ.get("RANK", "0") == "0":
        print(compat.warning_line(ignored), file=sys.stderr, flush=True)
    groups = {}
    for group_field in dataclasses.fields(Config):
        group_cls = group_field.default_factory  # type: ignore[misc]
        groups[group_field.name] = group_cls(**{f.name: ns[f.name] for f in dataclasses.fields(group_cls)})
    cfg = Config(**groups)
    if cfg.log.log_dir is None:
        cfg.log.log_dir = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    return cfg


def validate(cfg: Config, world_size: int) -> None:
    """Checks that need no file access: sizes, divisibility, and ranges. Raise ValueError naming the fix.
    Also resolves `--rm-type` (custom when `--custom-rm-path` is given, else math by default)."""
    p, r, t = cfg.parallel, cfg.rollout, cfg.train
    positive = {"--tensor-model-parallel-size": p.tensor_model_parallel_size,
                "--rollout-num-gpus-per-engine": p.rollout_num_gpus_per_engine,
                "--rollout-batch-size": r.rollout_batch_size, "--n-samples-per-prompt": r.n_samples_per_prompt,
                "--rollout-max-response-len": r.rollout_max_response_len, "--micro-batch-size": t.micro_batch_size,
                "--pipeline-model-parallel-size": p.pipeline_model_parallel_size,
                "--num-rollout": t.num_rollout, "--global-batch-size": cfg.global_batch_size}
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    pp = p.pipeline_model_parallel_size
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
        samples = "--rollout-batch-size records of --loss-type sft" if cfg.sft else \
            "--rollout-batch-size x --n-samples-per-prompt"
        raise ValueError(f"--global-batch-size {gbs} does not divide the {total} samples of a rollout "
                         f"({samples}); use a divisor of {total}")
    if t.use_dynamic_batch_size and gbs % dp:
        raise ValueError(f"--global-batch-size {gbs} is not divisible by data-parallel size {dp}; use a multiple of "
                         f"{dp}")
    if not t.use_dynamic_batch_size and gbs % (dp * t.micro_batch_size):
        raise ValueError(f"--global-batch-size {gbs} is not divisible by data-parallel size {dp} x "
                         f"--micro-batch-size {t.micro_batch_size}; use a multiple of {dp * t.micro_batch_size}")
    if not 0 < r.rollout_top_p <= 1:
        raise ValueError(f"--rollout-top-p {r.rollout_top_p}: must be in (0, 1]")
    if r.rollout_temperature <= 0:
        raise ValueError(f"--rollout-temperature {r.rollout_temperature}: must be > 0 (logprobs need sampling)")
    c = cfg.checkpoint
    if c.save_interval is not None and (c.save_interval < 1 or c.save is None):
        raise ValueError(f"--save-interval {c.save_interval}: needs --save DIR and a value >= 1")
    if cfg.optimizer.use_distributed_optimizer and (c.save or c.load):
        # megatron-core 0.16's distributed optimizer cannot describe its state to torch_dist on CPU (its default
        # layout uses flattened ranges the writer refuses; the others gather over CUDA): not yet supported.
        raise ValueError("--use-distributed-optimizer with --save/--load: checkpoints of the distributed optimizer's "
                         "state are not supported yet; drop --use-distributed-optimizer to save or resume")
    if c.keep_last_n_checkpoints is not None and (c.keep_last_n_checkpoints < 1 or c.save is None):
        raise ValueError(f"--keep-last-n-checkpoints {c.keep_last_n_checkpoints}: needs --save DIR and a value >= 1")
    if c.save_hf_interval is not None and (c.save_hf_interval < 1 or c.save_hf is None):
        raise ValueError(f"--save-hf-interval {c.save_hf_interval}: needs --save-hf DIR and a value >= 1")
    a = cfg.algorithm
    if a.eps_clip_c is not None and a.eps_clip_c <= 1:
        raise ValueError(f"--eps-clip-c {a.eps_clip_c}: the dual-clip bound must be > 1 (3.0 is usual)")
    if a.use_tis and not 0 <= a.tis_clip_low < a.tis_clip:
        raise ValueError(f"--tis-clip-low {a.tis_clip_low} / --tis-clip {a.tis_clip}: need 0 <= low < high")
    if a.kl_coef < 0:
        raise ValueError(f"--kl-coef {a.kl_coef}: must be >= 0")
    if cfg.sft:
        rl_only = {"--use-kl-loss": a.use_kl_loss, "--kl-coef": a.kl_coef > 0, "--use-tis": a.use_tis,
                   "--dynamic-sampling-filter-path": r.dynamic_sampling_filter_path is not None,
                   "--overlong-buffer-len": r.overlong_buffer_len > 0}
        given = [flag for flag, on in rl_only.items() if on]
        if given:
            raise ValueError(f"{', '.join(given)}: RL options; --loss-type sft trains on the records' responses "
                             f"(no rollout, no reference model); drop them or use --loss-type policy_loss")
    if a.advantage_estimator == "rloo" and r.n_samples_per_prompt < 2 and not cfg.sft:
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
    _validate_sampling(r)
    _validate_eval(cfg.eval)
    _validate_log(cfg.log)
    validate_training_options(cfg)


def _validate_sampling(r: RolloutConfig) -> None:
    if r.rollout_top_k < -1:
        raise ValueError(f"--rollout-top-k {r.rollout_top_k}: must be -1 (all tokens) or at least 1")
    if r.rollout_stop_token_ids and min(r.rollout_stop_token_ids) < 0:
        raise ValueError(f"--rollout-stop-token-ids {r.rollout_stop_token_ids}: token ids are >= 0")
    if r.rollout_stop and not all(r.rollout_stop):
        raise ValueError("--rollout-stop: an empty stop string would end every response at once; drop it")


EVAL_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def eval_sets(e: EvalConfig) -> list[tuple[str, str]]:
    """(name, path) pairs of --eval-prompt-data."""
    pairs = e.eval_prompt_data or []
    return list(zip(pairs[0::2], pairs[1::2]))


def _validate_eval(e: EvalConfig) -> None:
    data = e.eval_prompt_data
    if data is None:
        set_flags = [flag for flag, value in (("--eval-interval", e.eval_interval),
                                              ("--eval-max-response-len", e.eval_max_response_len),
                                              ("--eval-temperature", e.eval_temperature),
                                              ("--eval-top-p", e.eval_top_p)) if value is not None]
        if set_flags:
            raise ValueError(f"{set_flags[0]} applies to evaluation only; add --eval-prompt-data NAME PATH")
        return
    if len(data) % 2:
        raise ValueError(f"--eval-prompt-data {' '.join(data)}: give pairs of NAME PATH (got {len(data)} values), "
                         "e.g. --eval-prompt-data aime aime.jsonl math500 math500.jsonl")
    names = [name for name, _ in eval_sets(e)]
    for name in names:
        if not set(name) <= EVAL_NAME_CHARS:
            raise ValueError(f"--eval-prompt-data: the name {name!r} becomes the metric key eval/{name}/...; use "
                             "letters, digits, '_', '-' or '.'")
    if len(set(names)) < len(names):
        raise ValueError(f"--eval-prompt-data: the names {names} repeat; give each set its own name")
    checks = {"--eval-interval": (e.eval_interval, 1), "--n-samples-per-eval-prompt": (e.n_samples_per_eval_prompt, 1),
              "--eval-max-response-len": (e.eval_max_response_len, 1), "--eval-temperature": (e.eval_temperature, 0)}
    for flag, (value, low) in checks.items():
        if value is not None and value < low:
            raise ValueError(f"{flag} {value}: must be at least {low}")
    if e.eval_top_p is not None and not 0 < e.eval_top_p <= 1:
        raise ValueError(f"--eval-top-p {e.eval_top_p}: must be in (0, 1]")


OBSERVE_EXTRA = "pip install 'vime-spmd[observe]'"


def _validate_log(g: LogConfig) -> None:
    import importlib.util

    for flag, wanted, package in (("--use-tensorboard", g.use_tensorboard, "tensorboard"),
                                  ("--use-wandb", g.use_wandb, "wandb")):
        if wanted and importlib.util.find_spec(package) is None:
            raise ValueError(f"{flag} needs the {package} package, which is not installed; install the observe "
                             f"extra: {OBSERVE_EXTRA}")
    if not g.use_wandb:
        for flag, value in (("--wandb-project", g.wandb_project), ("--wandb-group", g.wandb_group),
                            ("--wandb-run-name", g.wandb_run_name)):
            if value is not None:
                raise ValueError(f"{flag} {value}: wandb is off; add --use-wandb")
    if g.log_samples_interval is not None and g.log_samples_interval < 1:
        raise ValueError(f"--log-samples-interval {g.log_samples_interval}: must be at least 1")


def validate_training_options(cfg: Config) -> None:
    """The learning-rate schedule, activation recompute and sequence parallelism (the pipeline split needs the
    model's layer count: `parallel.pipeline_split`, called in `prepare`)."""
    o, t, p = cfg.optimizer, cfg.train, cfg.parallel
    t.attention_backend = ATTENTION_BACKEND_ALIASES.get(t.attention_backend, t.attention_backend)
    if o.lr <= 0:
        raise ValueError(f"--lr {o.lr}: must be > 0")
    if o.optimizer == "sgd" and o.use_distributed_optimizer:
        raise ValueError("--optimizer sgd with --use-distributed-optimizer: Megatron shards Adam's state only; "
                         "drop one of them")
    if not 0 <= o.sgd_momentum < 1:
        raise ValueError(f"--sgd-momentum {o.sgd_momentum}: must be in [0, 1)")
    if not 0 <= o.min_lr <= o.lr:
        raise ValueError(f"--min-lr {o.min_lr}: must be in [0, --lr {o.lr}]")
    if o.lr_warmup_iters < 0 or (o.lr_decay_iters is not None and o.lr_decay_iters < 1):
        raise ValueError(f"--lr-warmup-iters {o.lr_warmup_iters} / --lr-decay-iters {o.lr_decay_iters}: warmup must "
                         f"be >= 0 and decay >= 1 optimizer steps")
    if o.lr_warmup_iters >= cfg.lr_decay_iters:
        raise ValueError(f"--lr-warmup-iters {o.lr_warmup_iters} must be smaller than --lr-decay-iters "
                         f"{cfg.lr_decay_iters} (default: the run's {cfg.num_optimizer_steps} optimizer steps); "
                         f"shorten the warmup or set --lr-decay-iters")
    if t.recompute_granularity == "full" and (t.recompute_method is None or t.recompute_num_layers is None):
        raise ValueError("--recompute-granularity full needs --recompute-method uniform|block and "
                         "--recompute-num-layers N")
    if t.recompute_granularity != "full" and (t.recompute_method is not None or t.recompute_num_layers is not None):
        raise ValueError(f"--recompute-method / --recompute-num-layers apply to --recompute-granularity full only "
                         f"(given: {t.recompute_granularity}); use full granularity or drop them")
    if t.recompute_num_layers is not None and t.recompute_num_layers < 1:
        raise ValueError(f"--recompute-num-layers {t.recompute_num_layers}: must be at least 1")
    _validate_dynamic_batch(t)
    if p.sequence_parallel and p.tensor_model_parallel_size < 2:
        raise ValueError("--sequence-parallel splits activations over tensor-parallel ranks: it needs "
                         "--tensor-model-parallel-size > 1; raise it or drop the flag")


def _validate_dynamic_batch(t: TrainConfig) -> None:
    budgets = {"--max-tokens-per-gpu": t.max_tokens_per_gpu,
               "--log-probs-max-tokens-per-gpu": t.log_probs_max_tokens_per_gpu}
    if t.use_dynamic_batch_size and t.max_tokens_per_gpu is None:
        raise ValueError("--use-dynamic-batch-size needs --max-tokens-per-gpu N (tokens per micro-batch, padding "
                         "included); add it")
    for flag, value in budgets.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
        if value is not None and not t.use_dynamic_batch_size:
            raise ValueError(f"{flag} applies with --use-dynamic-batch-size only (micro-batches are otherwise "
                             f"--micro-batch-size samples); add --use-dynamic-batch-size or drop {flag}")
    if t.use_dynamic_batch_size and t.log_probs_max_tokens_per_gpu is None:
        t.log_probs_max_tokens_per_gpu = t.max_tokens_per_gpu


def dump(cfg: Config, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=1))
