"""Pure tensor functions of the RL algorithm: advantages, losses, and the actor's loss assembled from them."""

from vime_spmd.algorithms.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from vime_spmd.algorithms.losses import (
    KL_PENALTY_TYPES,
    aggregate,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    masked_sum,
    policy_loss,
)
from vime_spmd.algorithms.objective import ACTOR_LOSS_METRICS, SFT_LOSS_METRICS, actor_loss, sft_loss

__all__ = [
    "ACTOR_LOSS_METRICS",
    "ADVANTAGE_ESTIMATORS",
    "KL_PENALTY_TYPES",
    "actor_loss",
    "aggregate",
    "compute_advantages",
    "entropy_from_logits",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "policy_loss",
    "SFT_LOSS_METRICS",
    "sft_loss",
]
