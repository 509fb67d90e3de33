"""What a training backend needs from a run's config, and nothing more: the actor is built from an `ActorSpec`,
never from the whole config. The loss comes in as an `Objective` (algorithms/objective.py), so the choice between
RL and supervised fine-tuning is made here, once, and the actor trains on whatever it is given."""

from __future__ import annotations

from dataclasses import dataclass

from ..algorithms.objective import Objective, objective_of
from ..config import Config, OptimizerConfig


@dataclass(frozen=True)
class BuildOptions:
    """How the model computes, besides its shape; none of these changes the maths (tests compare them to 1e-6)."""

    attention_backend: str = "sdpa"  # sdpa: causal SDPA, no mask; local: Megatron's unfused attention, [s, s] mask
    recompute_granularity: str | None = None  # full | selective (the core attention) | None
    recompute_method: str | None = None  # uniform | block, with full granularity
    recompute_num_layers: int | None = None
    sequence_parallel: bool = False
    first_stage_layers: int | None = None  # --decoder-first-pipeline-num-layers
    last_stage_layers: int | None = None  # --decoder-last-pipeline-num-layers


@dataclass(frozen=True)
class MicroBatchSpec:
    """How a rank's samples are grouped into micro-batches: `micro_batch_size` samples each, or, where a budget is
    set (--use-dynamic-batch-size), at most that many padded tokens each (training, and the logprob passes)."""

    micro_batch_size: int
    max_tokens: int | None = None
    logprob_max_tokens: int | None = None


@dataclass(frozen=True)
class ActorSpec:
    hf_checkpoint: str  # the policy's initial weights (and the architecture)
    reference: str | None  # the reference model for a KL term (an HF folder or a torch_dist checkpoint); None: none
    seed: int
    make_vocab_size_divisible_by: int
    build: BuildOptions
    optimizer: OptimizerConfig
    lr_decay_iters: int
    micro_batches: MicroBatchSpec
    objective: Objective

    @classmethod
    def of(cls, cfg: Config) -> ActorSpec:
        t, p, a = cfg.train, cfg.parallel, cfg.algorithm
        needs_reference = a.use_kl_loss or a.kl_coef > 0
        return cls(
            hf_checkpoint=cfg.model.hf_checkpoint,
            reference=(cfg.model.ref_load or cfg.model.hf_checkpoint) if needs_reference else None,
            seed=t.seed, make_vocab_size_divisible_by=p.make_vocab_size_divisible_by,
            build=BuildOptions(t.attention_backend, t.recompute_granularity, t.recompute_method,
                               t.recompute_num_layers, p.sequence_parallel, p.decoder_first_pipeline_num_layers,
                               p.decoder_last_pipeline_num_layers),
            optimizer=cfg.optimizer, lr_decay_iters=cfg.lr_decay_iters,
            # Resolved by the config: both budgets are None without --use-dynamic-batch-size.
            micro_batches=MicroBatchSpec(t.micro_batch_size, t.max_tokens_per_gpu, t.log_probs_max_tokens_per_gpu),
            objective=objective_of(cfg))
