"""Advantage estimators for the GRPO family.

Every estimator maps one scalar reward per sample to a token-level advantage
tensor. Samples of one prompt form a *group* and are contiguous in the batch:
group ``g`` owns rows ``[g * group_size, (g + 1) * group_size)``.

Shapes used throughout:
    B = number of samples (num_prompts * group_size), T = padded response length.
    rewards        [B]     float, one scalar per sample.
    response_mask  [B, T]  bool or float, 1 on response tokens that are trained on.
    returns        [B, T]  float, 0 wherever response_mask is 0.

The estimators (`compute_advantages`):
    grpo       (r - group mean) / (group std + 1e-6), the std unbiased (n - 1) as in the GRPO reference code; with
               normalize_std=False only the mean is removed (Dr. GRPO).
    gspo       grpo's advantages; GSPO differs only in its sequence-level importance ratio, which lives in the loss.
    rloo       r_i - the mean of the other n - 1 rewards of the group.
    reinforce_plus_plus
               per-token reward -kl (kl already scaled by its coefficient), plus the scalar reward on the last
               response token; the discounted return with gamma; whitened over every valid token of the batch. No
               group baseline.
    reinforce_plus_plus_baseline
               r - group mean, broadcast to tokens, whitened over every valid token of the batch.
A group whose rewards are all equal carries no preference signal: the group-baseline estimators (all but
reinforce_plus_plus) give its tokens exactly 0, never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

ADVANTAGE_ESTIMATORS = (
    "grpo",
    "gspo",
    "rloo",
    "reinforce_plus_plus",
    "reinforce_plus_plus_baseline",
)

# Added to the std before dividing so a near-constant group cannot blow up.
STD_EPS = 1e-6


def compute_advantages(
    estimator: str,
    rewards: Tensor,
    group_size: int,
    response_mask: Tensor,
    *,
    normalize_std: bool = True,
    kl: Tensor | None = None,
    gamma: float = 1.0,
) -> Tensor:
    """Token-level advantages [B, T] for ``estimator`` (the module docstring says what each computes); 0 where
    ``response_mask`` is 0.

    Args:
        estimator: one of ``ADVANTAGE_ESTIMATORS``.
        rewards: [B] scalar reward per sample.
        group_size: samples per prompt; B must be a multiple of it.
        response_mask: [B, T] bool/float.
        normalize_std: divide by the group std ("grpo"/"gspo" only).
        kl: optional [B, T] per-token KL penalty, used by "reinforce_plus_plus" only
            (the group estimators put their KL term in the loss instead).
        gamma: discount for "reinforce_plus_plus" only.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"--advantage-estimator={estimator!r} is not supported; "
            f"choose one of {', '.join(ADVANTAGE_ESTIMATORS)}."
        )
    rewards = rewards.float()
    _check_shapes(rewards, group_size, response_mask, kl)
    mask = response_mask.to(rewards.dtype)

    if estimator == "reinforce_plus_plus":
        returns = _discounted_returns(rewards, mask, kl, gamma)
        return _masked_whiten(returns, mask)

    grouped = rewards.view(-1, group_size)
    constant = (grouped.max(dim=1).values == grouped.min(dim=1).values).unsqueeze(1)
    if estimator in ("grpo", "gspo"):
        scores = _group_centered(grouped, normalize_std)
    elif estimator == "rloo":
        scores = _leave_one_out(grouped)
    else:  # reinforce_plus_plus_baseline
        scores = grouped - grouped.mean(dim=1, keepdim=True)
    # Rounding in mean/std can leave ~1e-8 residues that STD_EPS would magnify
    # into O(1e-2) advantages; a constant group is exactly zero by definition.
    scores = torch.where(constant, torch.zeros_like(scores), scores)
    token_scores = scores.reshape(-1, 1) * mask

    if estimator == "reinforce_plus_plus_baseline":
        whitened = _masked_whiten(token_scores, mask)
        # Whitening shifts by the batch token mean, which would hand constant
        # groups a length-weighted non-zero advantage; keep them at zero.
        constant_rows = constant.expand_as(grouped).reshape(-1, 1)
        return torch.where(constant_rows, torch.zeros_like(whitened), whitened)
    return token_scores


def _check_shapes(
    rewards: Tensor, group_size: int, response_mask: Tensor, kl: Tensor | None
) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    num_samples = rewards.shape[0]
    if group_size < 1 or num_samples % group_size != 0:
        raise ValueError(
            f"batch of {num_samples} samples does not split into groups of "
            f"group_size={group_size}; set --n-samples-per-prompt to a divisor of "
            "the batch size (and keep each prompt's samples contiguous)."
        )
    if response_mask.dim() != 2 or response_mask.shape[0] != num_samples:
        raise ValueError(
            f"response_mask must be [B={num_samples}, T], got {tuple(response_mask.shape)}"
        )
    if kl is not None and kl.shape != response_mask.shape:
        raise ValueError(
            f"kl must match response_mask {tuple(response_mask.shape)}, got {tuple(kl.shape)}"
        )


def _group_centered(grouped: Tensor, normalize_std: bool) -> Tensor:
    """[G, n] rewards minus group mean, optionally over (group std + eps)."""
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if not normalize_std or grouped.shape[1] == 1:
        # n == 1: centered is already 0 and the unbiased std is undefined.
        return centered
    return centered / (grouped.std(dim=1, keepdim=True) + STD_EPS)


def _leave_one_out(grouped: Tensor) -> Tensor:
    """[G, n] r_i - mean_{j != i} r_j."""
    group_size = grouped.shape[1]
    if group_size < 2:
        raise ValueError(
            "--advantage-estimator=rloo needs at least 2 samples per prompt; "
            "raise --n-samples-per-prompt."
        )
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return grouped - others_mean


def _discounted_returns(
    rewards: Tensor, mask: Tensor, kl: Tensor | None, gamma: float
) -> Tensor:
    """[B, T] return G_t = sum_{k>=t} gamma^(k-t) r_k with r = -kl + reward@last token."""
    token_rewards = torch.zeros_like(mask)
    if kl is not None:
        # where, not multiply: padding may hold inf/NaN log-probs.
        token_rewards = torch.where(mask > 0, -kl.to(mask.dtype), token_rewards)
    # Last valid position per row; rows with no valid token get no reward.
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last_index = torch.where(mask > 0, positions, -1).max(dim=1).values
    has_tokens = last_index >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    token_rewards[rows, last_index[has_tokens]] += rewards[has_tokens]

    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(rewards)
    for t in reversed(range(mask.shape[1])):
        running = token_rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def _masked_whiten(values: Tensor, mask: Tensor) -> Tensor:
    """(values - mean) / (std + eps) over valid tokens; 0 on padding.

    Uses the unbiased variance over all valid tokens of the batch. When every
    valid token holds the same value (or there is only one) the result is 0.
    """
    num_valid = mask.sum()
    if num_valid < 2:
        return torch.zeros_like(values)
    mean = (values * mask).sum() / num_valid
    centered = (values - mean) * mask
    variance = (centered**2).sum() / (num_valid - 1)
    valid_values = values[mask > 0]
    if valid_values.max() == valid_values.min():
        return torch.zeros_like(values)
    return centered / (variance.sqrt() + STD_EPS)
