"""The loss the actor's optimiser minimises, per micro-batch, with its metrics.

    RL (--loss-type policy_loss):  loss = pg_loss - entropy_coef * entropy_loss [+ kl_loss_coef * kl_loss]
    SFT (--loss-type sft):         loss = sft_loss - entropy_coef * entropy_loss, sft_loss = -logprob of the response

Each term is aggregated over the micro-batch's tokens (or sequences) and divided by `denominator`, the count over
the whole optimizer step on all data-parallel ranks, so that summing over micro-batches and ranks (Megatron sums
gradients over data parallel) gives the step's mean exactly, whatever the split. The metrics follow the same rule:
every value is this micro-batch's contribution to the step's value (sum them; never average them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import Tensor

from ..batch import TrainInputs
from ..config import AlgorithmConfig, Config
from .losses import aggregate, kl_penalty, policy_loss

ACTOR_LOSS_METRICS = ("entropy_loss", "kl_loss", "pg_clipfrac", "pg_loss", "ppo_kl")
SFT_LOSS_METRICS = ("entropy_loss", "sft_loss")


def actor_loss(logprobs: Tensor, entropy: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
               denominator: float, algo: AlgorithmConfig, *, ref_logprobs: Tensor | None = None,
               rollout_logprobs: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """(scalar loss to backpropagate, metrics) of one micro-batch.

    Args:
        logprobs, entropy: [B, T] of the current policy (carry the gradient).
        old_logprobs, advantages: [B, T], from before the update.
        mask: [B, T] 1.0 on the response tokens trained on.
        denominator: tokens (`calculate_per_token_loss`) or sequences of the optimizer step over all
            data-parallel ranks (> 0).
        algo: the clip ranges, estimator (gspo takes the sequence-level ratio), TIS, KL and entropy settings.
        ref_logprobs: [B, T] of the reference model; used with `use_kl_loss`.
        rollout_logprobs: [B, T] of the engine; used with `use_tis`.

    Metrics (detached 0-dim tensors on the loss's device, keys `ACTOR_LOSS_METRICS`; tensors, so that a step reads
    its metrics back once rather than synchronising with the device per micro-batch): pg_loss, entropy_loss,
    kl_loss (0 without `use_kl_loss`), and pg_clipfrac and ppo_kl: this micro-batch's means weighted by its share
    of the step's tokens (or sequences).
    """
    per_token = algo.calculate_per_token_loss
    tis = dict(rollout_logprobs=rollout_logprobs, tis_clip=algo.tis_clip,
               tis_clip_low=algo.tis_clip_low) if algo.use_tis else {}
    pg, pg_metrics = policy_loss(logprobs, old_logprobs, advantages, mask, eps_clip=algo.eps_clip,
                                 eps_clip_high=algo.eps_clip_high, eps_clip_c=algo.eps_clip_c,
                                 sequence_level_ratio=algo.advantage_estimator == "gspo", **tis)
    pg_loss = aggregate(pg, mask, per_token, denominator)
    entropy_loss = aggregate(entropy, mask, per_token, denominator)
    loss = pg_loss - algo.entropy_coef * entropy_loss
    metrics = {"pg_loss": pg_loss.detach(), "entropy_loss": entropy_loss.detach(), "kl_loss": pg_loss.new_zeros(())}
    if algo.use_kl_loss:
        kl_loss = aggregate(kl_penalty(logprobs, ref_logprobs, algo.kl_loss_type), mask, per_token, denominator)
        loss = loss + algo.kl_loss_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
    share = (mask.sum() if per_token else mask.new_tensor(float(mask.size(0)))) / denominator
    metrics["pg_clipfrac"] = pg_metrics["clipfrac"].detach() * share
    metrics["ppo_kl"] = pg_metrics["ppo_kl"].detach() * share
    return loss, metrics


def sft_loss(logprobs: Tensor, entropy: Tensor, mask: Tensor, denominator: float,
             algo: AlgorithmConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """(scalar loss, metrics) of one micro-batch of supervised fine-tuning: the negative log-likelihood of the
    response tokens (`mask`; the prompt is not in it), aggregated and divided by `denominator` as `actor_loss` does,
    so that the step's value is the mean over its tokens (or sequences) on all data-parallel ranks. Metrics (keys
    `SFT_LOSS_METRICS`): sft_loss and entropy_loss, this micro-batch's shares of the step's values."""
    per_token = algo.calculate_per_token_loss
    nll = aggregate(-logprobs, mask, per_token, denominator)
    entropy_loss = aggregate(entropy, mask, per_token, denominator)
    loss = nll - algo.entropy_coef * entropy_loss
    return loss, {"sft_loss": nll.detach(), "entropy_loss": entropy_loss.detach()}


# (logprobs, entropy, the micro-batch's inputs, denominator) -> (loss, metrics); every tensor [B, T], the inputs cut
# to the logprobs' width and on their device.
LossFn = Callable[[Tensor, Tensor, TrainInputs, float], tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class Objective:
    """What the actor minimises, as the actor needs it: the loss of a micro-batch and its metrics' keys, the
    temperature the logprobs are taken at, and whether the entropy takes part in the gradient."""

    loss: LossFn
    metric_keys: tuple[str, ...]
    temperature: float
    entropy_grad: bool  # False: the entropy is only a metric (no entropy bonus)


def _rl_loss(algo: AlgorithmConfig, logprobs: Tensor, entropy: Tensor, mb: TrainInputs,
             denominator: float) -> tuple[Tensor, dict[str, Tensor]]:
    return actor_loss(logprobs, entropy, mb.old_logprobs, mb.advantages, mb.response_mask, denominator, algo,
                      ref_logprobs=mb.ref_logprobs, rollout_logprobs=mb.rollout_logprobs)


def _sft_loss(algo: AlgorithmConfig, logprobs: Tensor, entropy: Tensor, mb: TrainInputs,
              denominator: float) -> tuple[Tensor, dict[str, Tensor]]:
    return sft_loss(logprobs, entropy, mb.response_mask, denominator, algo)


def objective_of(cfg: Config) -> Objective:
    """RL's objective, at the engine's sampling temperature (the logprobs are of what it sampled from), or with
    --loss-type sft the response's likelihood under the plain model (temperature 1)."""
    a = cfg.algorithm
    if cfg.sft:
        return Objective(partial(_sft_loss, a), SFT_LOSS_METRICS, 1.0, a.entropy_coef != 0)
    return Objective(partial(_rl_loss, a), ACTOR_LOSS_METRICS, cfg.rollout.rollout_temperature, a.entropy_coef != 0)
