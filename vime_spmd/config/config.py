"""The whole config, its rules across sections, and `check_config`: every problem of a config in one error.

`parse_config` (cli.py) returns a resolved config; nothing changes it afterwards (the sections are frozen).
`check_config` runs each section's own checks first and the rules across sections only when those passed, so that
one bad value makes one message, not a cascade.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .sections import (
    AlgorithmConfig,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    ResilienceConfig,
    RolloutConfig,
    Section,
    TrainConfig,
)


@dataclass(frozen=True)
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

    def sections(self) -> list[Section]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

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
        """Samples per optimizer step (resolved: the whole rollout unless --global-batch-size)."""
        return self.train.global_batch_size

    @property
    def num_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run (the learning-rate schedule's iterations)."""
        return self.train.num_rollout * (self.num_samples_per_rollout // self.global_batch_size)

    @property
    def lr_decay_iters(self) -> int:
        """Optimizer steps of the decay (resolved: the whole run unless --lr-decay-iters)."""
        return self.optimizer.lr_decay_iters

    def check(self, world_size: int) -> list[str]:
        """Every problem: each section's own first; the rules across sections only when those passed."""
        return [problem for section in self.sections() for problem in section.check()] or \
            self.check_across(world_size)

    def check_across(self, world_size: int) -> list[str]:
        """The rules that span sections: the layout over `world_size` ranks, the batch sizes, and the modes."""
        p, r, a, c = self.parallel, self.rollout, self.algorithm, self.checkpoint
        tp, pp, engine = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.rollout_num_gpus_per_engine
        problems = [f"{flag} {size} does not divide the world of {world_size} ranks; choose a divisor of {world_size}"
                    for flag, size in (("--tensor-model-parallel-size", tp), ("--rollout-num-gpus-per-engine", engine))
                    if world_size % size]
        if not problems and world_size % (tp * pp):
            problems.append(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} does not "
                            f"divide the world of {world_size} ranks; choose sizes whose product divides {world_size}")
        if not problems:
            problems += self._check_batches(num_engines=world_size // engine, dp=world_size // (tp * pp))
        if self.optimizer.use_distributed_optimizer and (c.save or c.load):
            # megatron-core 0.16's distributed optimizer cannot describe its state to torch_dist on CPU (its default
            # layout uses flattened ranges the writer refuses; the others gather over CUDA): not yet supported.
            problems.append("--use-distributed-optimizer with --save/--load: checkpoints of the distributed "
                            "optimizer's state are not supported yet; drop --use-distributed-optimizer to save or "
                            "resume")
        rl_only = {"--use-kl-loss": a.use_kl_loss, "--kl-coef": a.kl_coef > 0, "--use-tis": a.use_tis,
                   "--dynamic-sampling-filter-path": r.dynamic_sampling_filter_path is not None,
                   "--overlong-buffer-len": r.overlong_buffer_len > 0,
                   "--custom-generate-function-path": r.custom_generate_function_path is not None,
                   "--max-turns": r.max_turns is not None}
        given = [flag for flag, on in rl_only.items() if on]
        if self.sft and given:
            problems.append(f"{', '.join(given)}: RL options; --loss-type sft trains on the records' responses (no "
                            f"rollout, no reference model); drop them or use --loss-type policy_loss")
        if r.load_debug_rollout_data and (self.sft or self.eval.eval_prompt_data or r.save_debug_rollout_data):
            given = [flag for flag, on in (("--loss-type sft", self.sft), ("--eval-prompt-data",
                                           self.eval.eval_prompt_data), ("--save-debug-rollout-data",
                                           r.save_debug_rollout_data)) if on]
            problems.append(f"--load-debug-rollout-data with {', '.join(given)}: a replay starts no engine (nothing "
                            f"to evaluate or record with) and trains RL steps; drop {' and '.join(given)}")
        if a.advantage_estimator == "rloo" and r.n_samples_per_prompt < 2 and not self.sft:
            problems.append("--advantage-estimator rloo needs --n-samples-per-prompt >= 2 (a leave-one-out baseline)")
        warmup = self.optimizer.lr_warmup_iters
        if self.lr_decay_iters is not None and warmup >= self.lr_decay_iters:
            problems.append(f"--lr-warmup-iters {warmup} must be smaller than --lr-decay-iters {self.lr_decay_iters} "
                            f"(default: the run's {self.num_optimizer_steps} optimizer steps); shorten the warmup or "
                            f"set --lr-decay-iters")
        return problems

    def _check_batches(self, num_engines: int, dp: int) -> list[str]:
        """The batch sizes against the engines and the data-parallel ranks (part of `check_across`)."""
        r, t, gbs, total = self.rollout, self.train, self.global_batch_size, self.num_samples_per_rollout
        problems = []
        if r.rollout_batch_size % num_engines:
            problems.append(f"--rollout-batch-size {r.rollout_batch_size} is not divisible by the {num_engines} "
                            f"engines; use a multiple of {num_engines}")
        if total % gbs:
            samples = "--rollout-batch-size records of --loss-type sft" if self.sft else \
                "--rollout-batch-size x --n-samples-per-prompt"
            problems.append(f"--global-batch-size {gbs} does not divide the {total} samples of a rollout ({samples}); "
                            f"use a divisor of {total}")
        if t.use_dynamic_batch_size and gbs % dp:
            problems.append(f"--global-batch-size {gbs} is not divisible by data-parallel size {dp}; use a multiple "
                            f"of {dp}")
        if not t.use_dynamic_batch_size and gbs % (dp * t.micro_batch_size):
            problems.append(f"--global-batch-size {gbs} is not divisible by data-parallel size {dp} x "
                            f"--micro-batch-size {t.micro_batch_size}; use a multiple of {dp * t.micro_batch_size}")
        oversample = r.over_sampling_batch_size
        if oversample is not None and oversample % num_engines:
            problems.append(f"--over-sampling-batch-size {oversample}: must be a positive multiple of the "
                            f"{num_engines} engines")
        return problems


def check_config(cfg: Config, world_size: int) -> None:
    """Raise one ValueError listing every problem of `cfg` on `world_size` ranks (run.py prints it as one line).
    The checks that read files or import user code come after, in `loop.prepare` (config.checks)."""
    problems = cfg.check(world_size)
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(f"{len(problems)} problems: " + "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1)))


def dump(cfg: Config, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=1))
