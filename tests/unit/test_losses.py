"""Policy loss, KL penalties and reductions: hand-computed values and clip properties."""

import math

import pytest
import torch

from vime_spmd.algorithms import (
    aggregate,
    entropy_from_logits,
    kl_penalty,
    masked_sum,
    policy_loss,
)

RATIOS = [0.5, 0.9, 1.1, 1.5]


def _logprobs_for_ratios(ratios: list[float], rows: int) -> torch.Tensor:
    """log pi with old log pi = 0, so exp(logprobs - old) equals ``ratios``."""
    return torch.log(torch.tensor([ratios] * rows)).requires_grad_()


def test_ppo_clip_hand_computed() -> None:
    logprobs = _logprobs_for_ratios(RATIOS, rows=2)
    advantages = torch.tensor([[1.0] * 4, [-1.0] * 4])
    loss, metrics = policy_loss(
        logprobs, torch.zeros(2, 4), advantages, torch.ones(2, 4), eps_clip=0.2
    )
    # loss = -min(r*A, clip(r, 0.8, 1.2)*A)
    # A=+1: r=0.5 -> -min(0.5, 0.8) = -0.5; 0.9 -> -0.9; 1.1 -> -1.1; 1.5 -> -min(1.5, 1.2) = -1.2 (clipped)
    # A=-1: r=0.5 -> -min(-0.5, -0.8) = 0.8 (clipped); 0.9 -> 0.9; 1.1 -> 1.1; 1.5 -> -min(-1.5, -1.2) = 1.5
    expected = torch.tensor([[-0.5, -0.9, -1.1, -1.2], [0.8, 0.9, 1.1, 1.5]])
    torch.testing.assert_close(loss, expected)
    # 2 clipped tokens of 8
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(0.25))
    # ppo_kl = mean(old - new) = -2 * log(0.5 * 0.9 * 1.1 * 1.5) / 8 = -log(0.7425) / 4 = 0.074433
    torch.testing.assert_close(metrics["ppo_kl"], torch.tensor(-math.log(0.7425) / 4))


def test_clip_higher_widens_upper_bound_only() -> None:
    logprobs = _logprobs_for_ratios([0.7, 1.25, 1.5], rows=1)
    loss, _ = policy_loss(
        logprobs, torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3),
        eps_clip=0.2, eps_clip_high=0.28,
    )  # fmt: skip
    # A=+1, clip range [0.8, 1.28]:
    # r=0.7 -> -min(0.7, 0.8) = -0.7; r=1.25 -> -1.25 (inside); r=1.5 -> -min(1.5, 1.28) = -1.28
    torch.testing.assert_close(loss, torch.tensor([[-0.7, -1.25, -1.28]]))


def test_dual_clip_caps_negative_advantage_loss() -> None:
    logprobs = _logprobs_for_ratios([2.0, 5.0], rows=1)
    loss, metrics = policy_loss(
        logprobs, torch.zeros(1, 2), -torch.ones(1, 2), torch.ones(1, 2),
        eps_clip=0.2, eps_clip_c=3.0,
    )  # fmt: skip
    # A=-1: r=2 -> max(2, 1.2) = 2, below the cap -A*c = 3 -> 2
    #       r=5 -> max(5, 1.2) = 5, capped at 3 (dual clipped)
    torch.testing.assert_close(loss, torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(0.5))
    loss.sum().backward()
    # d(2)/d logprob = d(r)/d log r = r = 2; the capped token has no gradient
    torch.testing.assert_close(logprobs.grad, torch.tensor([[2.0, 0.0]]))


@pytest.mark.parametrize("eps_clip_c", [None, 3.0])
def test_clipped_tokens_get_zero_gradient(eps_clip_c: float | None) -> None:
    torch.manual_seed(0)
    old_logprobs = -torch.rand(8, 64) * 3
    logprobs = (old_logprobs + torch.randn(8, 64) * 0.6).requires_grad_()
    advantages = torch.randn(8, 64)
    loss, metrics = policy_loss(
        logprobs, old_logprobs, advantages, torch.ones(8, 64),
        eps_clip=0.2, eps_clip_high=0.3, eps_clip_c=eps_clip_c,
    )  # fmt: skip
    loss.sum().backward()
    ratio = torch.exp(logprobs.detach() - old_logprobs)
    # Outside the trust region in the direction the advantage pushes: no gradient.
    clipped = ((advantages > 0) & (ratio > 1.3)) | ((advantages < 0) & (ratio < 0.8))
    if eps_clip_c is not None:
        clipped |= (advantages < 0) & (ratio > eps_clip_c)
    assert clipped.any() and (~clipped).any()
    assert torch.equal(logprobs.grad[clipped], torch.zeros(int(clipped.sum())))
    assert (logprobs.grad[~clipped] != 0).all()
    torch.testing.assert_close(metrics["clipfrac"], clipped.float().mean())


def test_sequence_level_ratio_gspo() -> None:
    old_logprobs = torch.zeros(2, 3)
    logprobs = torch.tensor([[0.1, 0.2, 7.0], [0.3, 0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, _ = policy_loss(
        logprobs, old_logprobs, torch.ones(2, 3), mask, eps_clip=0.2, sequence_level_ratio=True
    )
    # row0: mean log ratio over valid tokens = (0.1 + 0.2) / 2 = 0.15 (the 7.0 is padding)
    #       ratio = exp(0.15) = 1.161834 < 1.2 -> loss -1.161834 on both valid tokens
    # row1: mean = (0.3 + 0.5 + 0) / 3 = 0.266667 -> exp = 1.305605 > 1.2 -> clipped to -1.2
    s0, s1 = math.exp(0.15), math.exp(0.8 / 3)
    assert s1 > 1.2
    torch.testing.assert_close(loss, torch.tensor([[-s0, -s0, 0.0], [-1.2, -1.2, -1.2]]))
    loss.sum().backward()
    # row0: d/d lp_j sum_t(-s) over 2 tokens = 2 * (-s * 1/2) = -s for each valid j; row1 clipped -> 0
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-s0, -s0, 0.0], [0.0, 0.0, 0.0]]))


def test_truncated_importance_sampling() -> None:
    logprobs = torch.zeros(1, 3, requires_grad=True)
    rollout_logprobs = torch.log(torch.tensor([[1 / 3, 10.0, 1.0]]))
    loss, metrics = policy_loss(
        logprobs, torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3),
        eps_clip=0.2, rollout_logprobs=rollout_logprobs, tis_clip=2.0, tis_clip_low=0.5,
    )  # fmt: skip
    # weight = clamp(exp(old - rollout), 0.5, 2) = clamp([3, 0.1, 1]) = [2, 0.5, 1]
    # loss = -1 (ratio 1, A 1) * weight
    torch.testing.assert_close(loss, torch.tensor([[-2.0, -0.5, -1.0]]))
    torch.testing.assert_close(metrics["tis_weight_mean"], torch.tensor(3.5 / 3))
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-2.0, -0.5, -1.0]]))


def test_padding_with_inf_logprobs_stays_finite() -> None:
    logprobs = torch.tensor([[-1.0, -float("inf")]], requires_grad=True)
    loss, metrics = policy_loss(
        logprobs, torch.tensor([[-1.0, 0.0]]), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]),
        eps_clip=0.2,
    )  # fmt: skip
    loss.sum().backward()
    torch.testing.assert_close(loss, torch.tensor([[-1.0, 0.0]]))
    assert torch.isfinite(logprobs.grad).all() and torch.isfinite(metrics["ppo_kl"])


def test_policy_loss_user_errors() -> None:
    args = (torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2))
    with pytest.raises(ValueError, match="--eps-clip-c"):
        policy_loss(*args, eps_clip=0.2, eps_clip_c=0.9)
    with pytest.raises(ValueError, match="--tis-clip"):
        policy_loss(*args, eps_clip=0.2, tis_clip=2.0)


def test_kl_penalty_hand_computed() -> None:
    logprobs, ref_logprobs = torch.tensor([0.5, 0.0]), torch.tensor([0.0, 0.5])
    # log r = [0.5, -0.5]
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k1"), torch.tensor([0.5, -0.5]))
    # 0.5 * 0.25 = 0.125
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k2"), torch.tensor([0.125, 0.125]))
    # exp(-0.5) - 1 + 0.5 = 0.106531; exp(0.5) - 1 - 0.5 = 0.148721
    expected_k3 = torch.tensor([math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5])
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k3"), expected_k3)
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "low_var_kl"), expected_k3)


def test_low_var_kl_is_clamped_and_k3_non_negative() -> None:
    # log r = -20: k3 = exp(20) - 21 = 4.85e8, clamped to 10
    far = kl_penalty(torch.tensor([-20.0]), torch.tensor([0.0]), "low_var_kl")
    torch.testing.assert_close(far, torch.tensor([10.0]))
    log_ratios = torch.linspace(-5, 5, 101)
    assert (kl_penalty(log_ratios, torch.zeros(101), "k3") >= 0).all()


def test_kl_penalty_unknown_kind() -> None:
    with pytest.raises(ValueError, match="--kl-loss-type.*low_var_kl"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


def test_entropy_from_logits() -> None:
    # uniform over 4 -> log 4 = 1.386294
    torch.testing.assert_close(entropy_from_logits(torch.zeros(2, 4)), torch.full((2,), math.log(4)))
    # a near one-hot distribution has ~0 entropy
    assert entropy_from_logits(torch.tensor([100.0, 0.0, 0.0])) < 1e-30
    logits = torch.randn(3, 5, 11)
    probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(entropy_from_logits(logits), -(probs * probs.log()).sum(-1))


VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)


def test_masked_sum_ignores_padding_nan() -> None:
    # 1 + 2 + 4 = 7 (the NaN sits on padding)
    torch.testing.assert_close(masked_sum(VALUES, MASK), torch.tensor(7.0))


def test_aggregate_per_token() -> None:
    # default denominator = 3 valid tokens: 7 / 3
    torch.testing.assert_close(aggregate(VALUES, MASK, per_token=True), torch.tensor(7 / 3))
    # global token count 10 (e.g. over all data-parallel ranks): 7 / 10
    torch.testing.assert_close(aggregate(VALUES, MASK, True, denominator=10), torch.tensor(0.7))


def test_aggregate_per_sequence() -> None:
    # row means: (1 + 2) / 2 = 1.5 and 4 / 1 = 4; default denominator B = 2: 5.5 / 2 = 2.75
    torch.testing.assert_close(aggregate(VALUES, MASK, per_token=False), torch.tensor(2.75))
    # global sequence count 4: 5.5 / 4 = 1.375
    torch.testing.assert_close(aggregate(VALUES, MASK, False, denominator=4), torch.tensor(1.375))


def test_micro_batches_with_global_denominator_sum_to_batch_mean() -> None:
    torch.manual_seed(0)
    values, mask = torch.randn(6, 5), torch.rand(6, 5) > 0.3
    num_tokens = float(mask.sum())
    whole = aggregate(values, mask, per_token=True)
    split = sum(
        aggregate(values[i : i + 2], mask[i : i + 2], True, denominator=num_tokens)
        for i in range(0, 6, 2)
    )
    torch.testing.assert_close(split, whole)


def test_aggregate_all_masked_and_bad_denominator() -> None:
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert aggregate(torch.ones(2, 3), empty, per_token=True) == 0
    assert aggregate(torch.ones(2, 3), empty, per_token=False) == 0
    with pytest.raises(ValueError, match="denominator"):
        aggregate(torch.ones(2, 3), empty, per_token=True, denominator=0)
