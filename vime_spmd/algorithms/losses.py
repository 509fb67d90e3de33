"""Policy-gradient losses, KL penalties and masked reductions.

GRPO, Dr. GRPO, DAPO and GSPO are configurations of one clipped surrogate
(``policy_loss``), not separate losses. All functions are pure and work on
CPU tensors; the training backend owns parallelism and the global token count.

Shapes used throughout:
    B = number of sequences, T = padded response length.
    logprobs, old_logprobs, ref_logprobs, rollout_logprobs, advantages  [B, T]
    mask  [B, T] bool or float, 1 on response tokens that are trained on.
"""

from __future__ import annotations

import torch
from torch import Tensor

KL_PENALTY_TYPES = ("k1", "k2", "k3", "low_var_kl")

# exp() of a log-ratio beyond this overflows float32 -> inf, and inf * 0 on
# padding is NaN; ratios this far out are clipped by any sane trust region.
_MAX_LOG_RATIO = 20.0


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values * mask`` over ``dim`` (all dims when None).

    Positions where the mask is 0 contribute exactly 0, even if ``values``
    holds inf/NaN there (padding often does).
    """
    mask = mask.to(values.dtype)
    weighted = torch.where(mask != 0, values * mask, torch.zeros_like(values))
    return weighted.sum() if dim is None else weighted.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``masked_sum / mask.sum`` over ``dim``; an all-masked slice gives 0, not NaN."""
    weights = mask.to(values.dtype)
    count = weights.sum() if dim is None else weights.sum(dim)
    total = masked_sum(values, mask, dim)
    return torch.where(count > 0, total / torch.where(count > 0, count, 1.0), 0.0)


def aggregate(
    values: Tensor, mask: Tensor, per_token: bool, denominator: float | None = None
) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    Args:
        values: [B, T] per-token loss.
        mask: [B, T] bool/float token mask.
        per_token: True -> ``sum(values * mask) / denominator``; with the
            default denominator ``mask.sum()`` this is the token mean of this
            batch, and when the caller passes the *global* number of valid
            tokens (across micro-batches and data-parallel ranks) summing the
            results gives the token mean of the global batch (DAPO / Dr. GRPO).
            False -> ``sum_i(masked mean of row i) / denominator``; the default
            denominator is B, i.e. the mean over sequences of each sequence's
            token mean (original GRPO); pass the global sequence count to
            normalise over the global batch.
        denominator: see ``per_token``; must be > 0 when given.
    """
    if denominator is not None and denominator <= 0:
        raise ValueError(f"aggregate denominator must be > 0, got {denominator}")
    if per_token:
        if denominator is None:
            return masked_mean(values, mask)
        return masked_sum(values, mask) / denominator
    per_sequence = masked_mean(values, mask, dim=1)
    return per_sequence.sum() / (values.shape[0] if denominator is None else denominator)


def _tis_weight(old_logprobs: Tensor, rollout_logprobs: Tensor | None, valid: Tensor, tis_clip: float,
                tis_clip_low: float | None) -> Tensor:
    """Truncated importance weight [B, T], detached: clamp(exp(old - rollout), tis_clip_low or 0, tis_clip)."""
    if rollout_logprobs is None:
        raise ValueError("--tis-clip is set but no rollout log-probs were given; have the rollout engine return "
                         "log-probs or unset --tis-clip.")
    weight = torch.exp(old_logprobs - rollout_logprobs).clamp(min=0.0 if tis_clip_low is None else tis_clip_low,
                                                              max=tis_clip)
    return torch.where(valid, weight, torch.zeros_like(weight)).detach()


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_clip: float,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
    sequence_level_ratio: bool = False,
    rollout_logprobs: Tensor | None = None,
    tis_clip: float | None = None,
    tis_clip_low: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-surrogate policy loss; returns (per-token loss [B, T], metrics).

    loss_t = -min(ratio_t * A_t, clip(ratio_t, 1 - eps_clip, 1 + eps_clip_high) * A_t),
    0 where ``mask`` is 0. Reduce it with ``aggregate``.

    Args:
        logprobs: [B, T] log-probs of the current policy (carries the gradient).
        old_logprobs: [B, T] log-probs of the policy that produced the
            advantages (recomputed by the trainer before the update).
        advantages: [B, T].
        mask: [B, T] bool/float.
        eps_clip: lower clip range, ratio >= 1 - eps_clip.
        eps_clip_high: upper clip range (DAPO clip-higher); defaults to eps_clip.
        eps_clip_c: dual-clip constant (> 1): for A < 0 the loss is capped at
            -eps_clip_c * A so a huge ratio on a bad token cannot dominate.
        sequence_level_ratio: GSPO; every token of sequence i uses
            exp(masked mean_t log(pi / pi_old)), so the gradient flows through the mean.
        rollout_logprobs: [B, T] log-probs reported by the rollout engine.
        tis_clip, tis_clip_low: truncated importance sampling; the per-token
            loss is multiplied by the detached weight
            clamp(exp(old_logprobs - rollout_logprobs), tis_clip_low or 0, tis_clip),
            correcting for rollout/trainer numeric mismatch.

    Metrics (detached scalars): "clipfrac" = fraction of valid tokens whose
    gradient the clip (PPO or dual) removed; "ppo_kl" = masked mean of
    old_logprobs - logprobs; "tis_weight_mean" when TIS is on.
    """
    eps_clip_high = eps_clip if eps_clip_high is None else eps_clip_high
    if eps_clip_c is not None and eps_clip_c <= 1.0:
        raise ValueError(f"--eps-clip-c must be > 1 for dual clip, got {eps_clip_c}")
    valid = mask.to(torch.bool)

    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))
    if sequence_level_ratio:
        log_ratio = masked_mean(log_ratio, valid, dim=1).unsqueeze(1).expand_as(logprobs)
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))

    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high)
    loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    if eps_clip_c is not None:
        cap = -advantages * eps_clip_c
        dual_clipped = (advantages < 0) & (loss > cap)
        loss = torch.where(dual_clipped, cap, loss)
        is_clipped = is_clipped | dual_clipped

    metrics: dict[str, Tensor] = {}
    if tis_clip is not None:
        tis_weight = _tis_weight(old_logprobs, rollout_logprobs, valid, tis_clip, tis_clip_low)
        loss = loss * tis_weight
        metrics["tis_weight_mean"] = masked_mean(tis_weight, valid)

    loss = torch.where(valid, loss, torch.zeros_like(loss))
    with torch.no_grad():
        metrics["clipfrac"] = masked_mean(is_clipped.to(logprobs.dtype), valid)
        metrics["ppo_kl"] = masked_mean(old_logprobs - logprobs, valid)
    return loss, metrics


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token estimate [B, T] of KL(pi || pi_ref) from sampled tokens.

    With log r = logprobs - ref_logprobs (Schulman's estimators):
        k1 = log r                          unbiased, high variance, can be < 0
        k2 = 0.5 * (log r)^2                biased, low variance
        k3 = exp(-log r) - 1 + log r        unbiased, >= 0
        low_var_kl = clamp(k3, -10, 10)     k3 guarded against huge ratios
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind in ("k3", "low_var_kl"):
        k3 = torch.exp(-log_ratio) - 1.0 + log_ratio
        return k3.clamp(-10.0, 10.0) if kind == "low_var_kl" else k3
    raise ValueError(
        f"--kl-loss-type={kind!r} is not supported; choose one of {', '.join(KL_PENALTY_TYPES)}."
    )


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy [...] of softmax(logits [..., V]) in float32.

    H = logsumexp(z) - sum_v softmax(z)_v * z_v. Not vocab-parallel: the
    training backend uses its own sharded version; this is the reference.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
