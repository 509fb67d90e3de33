"""Pure tensor functions of the RL algorithm: advantages and losses."""

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

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_PENALTY_TYPES",
    "aggregate",
    "compute_advantages",
    "entropy_from_logits",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "policy_loss",
]
