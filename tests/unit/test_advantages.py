"""Advantage estimators: hand-computed values and group properties (CPU)."""

import math

import pytest
import torch

from vime_spmd.algorithms import ADVANTAGE_ESTIMATORS, compute_advantages

GROUP_ESTIMATORS = ("grpo", "gspo", "rloo", "reinforce_plus_plus_baseline")


def _full_mask(num_rows: int, num_tokens: int) -> torch.Tensor:
    return torch.ones(num_rows, num_tokens)


def test_grpo_hand_computed() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0])
    advantages = compute_advantages("grpo", rewards, 3, _full_mask(3, 2))
    # mean = 1/3; centred = [2/3, -1/3, -1/3]
    # unbiased std = sqrt(((2/3)^2 + 2 * (1/3)^2) / 2) = sqrt(1/3) = 0.57735
    # advantage = centred / (0.57735 + 1e-6) = [1.15470, -0.57735, -0.57735]
    std = math.sqrt(1 / 3) + 1e-6
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3]) / std
    torch.testing.assert_close(advantages, expected.unsqueeze(1).expand(3, 2))


def test_dr_grpo_skips_std() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0, 1.0, 2.0])
    advantages = compute_advantages("grpo", rewards, 3, _full_mask(6, 1), normalize_std=False)
    # group 0: mean 1/3 -> [2/3, -1/3, -1/3]; group 1: mean 2 -> [1, -1, 0]
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3, 1.0, -1.0, 0.0]).unsqueeze(1)
    torch.testing.assert_close(advantages, expected)


def test_gspo_advantages_equal_grpo() -> None:
    rewards = torch.tensor([0.2, 0.9, 0.4, 0.0, 1.0, 1.0])
    mask = _full_mask(6, 4)
    torch.testing.assert_close(
        compute_advantages("gspo", rewards, 3, mask), compute_advantages("grpo", rewards, 3, mask)
    )


def test_rloo_hand_computed() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0])
    advantages = compute_advantages("rloo", rewards, 4, _full_mask(4, 1))
    # r0: 1 - (0+0+2)/3 = 1/3;   r1: 0 - (1+0+2)/3 = -1
    # r2: 0 - (1+0+2)/3 = -1;    r3: 2 - (1+0+0)/3 = 5/3
    expected = torch.tensor([1 / 3, -1.0, -1.0, 5 / 3]).unsqueeze(1)
    torch.testing.assert_close(advantages, expected)


def test_rloo_is_scaled_dr_grpo() -> None:
    rewards = torch.rand(12)
    mask = _full_mask(12, 1)
    rloo = compute_advantages("rloo", rewards, 4, mask)
    dr_grpo = compute_advantages("grpo", rewards, 4, mask, normalize_std=False)
    # r_i - (S - r_i)/(n-1) = n/(n-1) * (r_i - S/n)
    torch.testing.assert_close(rloo, dr_grpo * 4 / 3)


def test_reinforce_plus_plus_hand_computed() -> None:
    rewards = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kl = torch.full((2, 3), 0.1)
    kl[1, 2] = float("inf")  # padding garbage must not leak
    advantages = compute_advantages(
        "reinforce_plus_plus", rewards, 2, mask, kl=kl, gamma=0.5
    )
    # token rewards: row0 [-0.1, -0.1, -0.1 + 1] ; row1 [-0.1, -0.1 + 0, pad]
    # returns (gamma 0.5): row0 t2 = 0.9, t1 = -0.1 + 0.45 = 0.35, t0 = -0.1 + 0.175 = 0.075
    #                      row1 t1 = -0.1, t0 = -0.1 - 0.05 = -0.15
    # valid mean = (0.075 + 0.35 + 0.9 - 0.15 - 0.1) / 5 = 0.215
    # sum of squared deviations = 0.14^2 + 0.135^2 + 0.685^2 + 0.365^2 + 0.315^2 = 0.7395
    # unbiased std = sqrt(0.7395 / 4) = 0.429971
    std = math.sqrt(0.7395 / 4) + 1e-6
    # (row1 t2 is padding: any value works, the mask zeroes it)
    expected = (torch.tensor([[0.075, 0.35, 0.9], [-0.15, -0.1, 0.215]]) - 0.215) / std
    torch.testing.assert_close(advantages, expected * mask)


def test_reinforce_plus_plus_baseline_hand_computed() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    advantages = compute_advantages("reinforce_plus_plus_baseline", rewards, 2, mask)
    # group 0 centred [0.5, -0.5]; group 1 constant -> 0
    # valid tokens: 0.5, 0.5, -0.5, 0, 0, 0, 0 -> mean 0.5 / 7
    # squared deviations sum = 5/7; unbiased var = (5/7) / 6 = 5/42; std = 0.345033
    mean, std = 0.5 / 7, math.sqrt(5 / 42) + 1e-6
    expected = torch.tensor(
        [[(0.5 - mean) / std] * 2, [(-0.5 - mean) / std, 0.0], [0.0, 0.0], [0.0, 0.0]]
    )
    torch.testing.assert_close(advantages, expected)


@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_sums_to_zero_within_each_group(normalize_std: bool) -> None:
    torch.manual_seed(0)
    rewards = torch.rand(5 * 8)
    advantages = compute_advantages(
        "grpo", rewards, 8, _full_mask(40, 1), normalize_std=normalize_std
    )
    group_sums = advantages[:, 0].view(5, 8).sum(dim=1)
    torch.testing.assert_close(group_sums, torch.zeros(5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, -0.7])
def test_zero_variance_group_gives_exact_zero(estimator: str, value: float) -> None:
    # 0.1 * 3 is not exactly representable: the group mean differs from 0.1 by
    # one ulp, which a division by (0 + 1e-6) would inflate to ~1e-2.
    rewards = torch.tensor([value, value, value, 1.0, 0.0, 0.5])
    advantages = compute_advantages(estimator, rewards, 3, _full_mask(6, 4))
    assert torch.isfinite(advantages).all()
    assert torch.equal(advantages[:3], torch.zeros(3, 4))
    assert advantages[3:].abs().sum() > 0


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS)
def test_padding_and_empty_rows_are_zero(estimator: str) -> None:
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    advantages = compute_advantages(estimator, rewards, 2, mask)
    assert torch.isfinite(advantages).all()
    assert torch.equal(advantages[~mask], torch.zeros(int((~mask).sum())))


def test_single_sample_groups_do_not_nan() -> None:
    advantages = compute_advantages("grpo", torch.tensor([1.0, 0.0]), 1, _full_mask(2, 2))
    assert torch.equal(advantages, torch.zeros(2, 2))


def test_unknown_estimator_names_flag_and_choices() -> None:
    with pytest.raises(ValueError, match="--advantage-estimator.*grpo.*rloo"):
        compute_advantages("ppo", torch.zeros(2), 2, _full_mask(2, 1))


def test_batch_not_divisible_by_group_size() -> None:
    with pytest.raises(ValueError, match="group_size=4"):
        compute_advantages("grpo", torch.zeros(6), 4, _full_mask(6, 1))


def test_rloo_needs_two_samples() -> None:
    with pytest.raises(ValueError, match="rloo"):
        compute_advantages("rloo", torch.zeros(3), 1, _full_mask(3, 1))
