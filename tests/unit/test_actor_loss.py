"""The loss the actor minimises (`actor_loss`): its terms, their global denominator and the weighted metrics, by hand.

The inputs are chosen so that every value is exact in float32: ratios are exp(0) = 1, or far enough out to be
clipped at 1 +/- eps_clip with eps_clip = 0.25 (both bounds exact), and every sum divides by a power of two.
"""

import torch

from vime_spmd.algorithms import ACTOR_LOSS_METRICS, actor_loss
from vime_spmd.config import AlgorithmConfig

PAD = 99.0  # on padding; the mask must keep it out of every term


def values(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: v.item() for k, v in metrics.items()}


def test_per_token_loss_sums_policy_entropy_and_kl_over_the_global_token_count() -> None:
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # 4 tokens here; 8 in the whole step
    logprobs = torch.tensor([[1.0, 0.0, 0.0, PAD], [0.0, PAD, PAD, PAD]])
    entropy = torch.tensor([[0.5, 1.0, 1.5, PAD], [1.0, PAD, PAD, PAD]], requires_grad=True)
    advantages = torch.tensor([[1.0, -0.5, 2.0, PAD], [-1.0, PAD, PAD, PAD]])
    ref_logprobs = torch.tensor([[0.5, -0.5, -0.25, 0.0], [0.25, 0.0, 0.0, 0.0]])
    algo = AlgorithmConfig(eps_clip=0.25, entropy_coef=0.25, use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="k1")
    loss, metrics = actor_loss(logprobs, entropy, torch.zeros(2, 4), advantages, mask, 8.0, algo,
                               ref_logprobs=ref_logprobs)
    # policy, per token -min(r*A, clip(r, 0.75, 1.25)*A), old logprobs 0:
    #   [0,0] r = e, A = 1: -min(2.718, 1.25) = -1.25 (clipped);  [0,1] r = 1, A = -0.5: 0.5
    #   [0,2] r = 1, A = 2: -2;  [1,0] r = 1, A = -1: 1.  Sum -1.75; pg_loss = -1.75 / 8 = -0.21875
    # entropy: (0.5 + 1 + 1.5 + 1) / 8 = 0.5
    # KL k1 = logprobs - ref: 0.5 + 0.5 + 0.25 - 0.25 = 1; kl_loss = 1 / 8 = 0.125
    # loss = -0.21875 - 0.25 * 0.5 + 0.5 * 0.125 = -0.28125
    assert loss.item() == -0.28125
    # pg_clipfrac: 1 clipped of 4 tokens = 0.25, times this micro-batch's share of the step, 4 / 8: 0.125
    # ppo_kl: mean of old - new over the 4 tokens = -1 / 4, times 0.5: -0.125
    assert values(metrics) == {"pg_loss": -0.21875, "entropy_loss": 0.5, "kl_loss": 0.125, "pg_clipfrac": 0.125,
                               "ppo_kl": -0.125}
    assert sorted(metrics) == sorted(ACTOR_LOSS_METRICS)
    # Metrics stay tensors without a gradient: a step reads them back once, not per micro-batch.
    assert all(isinstance(m, torch.Tensor) and m.dim() == 0 and not m.requires_grad for m in metrics.values())
    loss.backward()
    # d loss / d entropy = -entropy_coef / 8 = -0.03125 on each token trained on, 0 on padding
    assert torch.equal(entropy.grad, -0.03125 * mask)


def test_per_sequence_loss_divides_by_the_global_sequence_count_and_weights_metrics_by_sequences() -> None:
    mask = torch.ones(2, 2)  # 2 sequences here; 4 in the whole step
    logprobs = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    entropy = torch.tensor([[1.0, 2.0], [0.5, 0.5]])
    advantages = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    algo = AlgorithmConfig(eps_clip=0.25, entropy_coef=0.5, calculate_per_token_loss=False)
    loss, metrics = actor_loss(logprobs, entropy, torch.zeros(2, 2), advantages, mask, 4.0, algo)
    # policy per token: row 0 [-1.25 (r = e, clipped), -3], mean -2.125; row 1 [-2, -2], mean -2
    # pg_loss = (-2.125 - 2) / 4 sequences = -1.03125
    # entropy: row means 1.5 and 0.5; (1.5 + 0.5) / 4 = 0.5
    # loss = -1.03125 - 0.5 * 0.5 = -1.28125; no KL term without use_kl_loss
    assert loss.item() == -1.28125
    # share of the step: 2 sequences of 4 = 0.5 (by tokens it would be 4 / 4 = 1)
    # pg_clipfrac: 1 clipped of 4 tokens = 0.25 * 0.5 = 0.125; ppo_kl: -1 / 4 * 0.5 = -0.125
    assert values(metrics) == {"pg_loss": -1.03125, "entropy_loss": 0.5, "kl_loss": 0.0, "pg_clipfrac": 0.125,
                               "ppo_kl": -0.125}


def test_truncated_importance_sampling_weights_the_policy_term() -> None:
    mask = torch.ones(1, 3)
    rollout_logprobs = torch.tensor([[-5.0, 5.0, 0.0]])
    algo = AlgorithmConfig(use_tis=True, tis_clip=2.0, tis_clip_low=0.5)
    loss, metrics = actor_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3), mask, 7.0,
                               algo, rollout_logprobs=rollout_logprobs)
    # weight = clamp(exp(old - rollout), 0.5, 2) = clamp([e^5, e^-5, 1]) = [2, 0.5, 1]; ratio 1, A 1: -1 * weight
    # pg_loss = (-2 - 0.5 - 1) / 7 = -0.5
    assert loss.item() == -0.5 and metrics["pg_loss"] == -0.5


def test_gspo_takes_one_ratio_per_sequence() -> None:
    mask = torch.ones(1, 2)
    logprobs = torch.tensor([[0.5, -0.5]])
    algo = AlgorithmConfig(advantage_estimator="gspo", eps_clip=0.25)
    loss, metrics = actor_loss(logprobs, torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), mask, 2.0, algo)
    # sequence log ratio = mean(0.5, -0.5) = 0 -> ratio 1 on both tokens: (-1 - 1) / 2 = -1
    # (per token the ratios would be e^0.5, clipped to 1.25, and e^-0.5 = 0.607: -(1.25 + 0.607) / 2 = -0.93)
    assert loss.item() == -1.0
    assert metrics["pg_clipfrac"] == 0.0 and metrics["ppo_kl"] == 0.0


def test_sft_loss_is_the_negative_log_likelihood_of_the_response_over_the_global_token_count() -> None:
    from vime_spmd.algorithms import SFT_LOSS_METRICS, sft_loss

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # 3 response tokens here; 4 in the whole step
    logprobs = torch.tensor([[-0.5, -1.0, PAD], [-2.5, PAD, PAD]], requires_grad=True)
    entropy = torch.tensor([[1.0, 0.5, PAD], [0.5, PAD, PAD]])
    algo = AlgorithmConfig(loss_type="sft", entropy_coef=0.5)
    loss, metrics = sft_loss(logprobs, entropy, mask, 4.0, algo)
    # NLL: (0.5 + 1 + 2.5) / 4 = 1; entropy: (1 + 0.5 + 0.5) / 4 = 0.5; loss = 1 - 0.5 * 0.5 = 0.75
    assert loss.item() == 0.75
    assert values(metrics) == {"sft_loss": 1.0, "entropy_loss": 0.5}
    assert sorted(metrics) == sorted(SFT_LOSS_METRICS)
    loss.backward()
    # Each response token's logprob gets -1/4; padding gets nothing.
    assert logprobs.grad.tolist() == [[-0.25, -0.25, 0.0], [-0.25, 0.0, 0.0]]


def test_sft_loss_per_sequence_averages_each_sequence_then_divides_by_the_global_sequence_count() -> None:
    from vime_spmd.algorithms import sft_loss

    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    logprobs = torch.tensor([[-1.0, -3.0], [-4.0, PAD]])
    algo = AlgorithmConfig(loss_type="sft", calculate_per_token_loss=False)
    loss, _ = sft_loss(logprobs, torch.zeros(2, 2), mask, 4.0, algo)
    # sequence means 2 and 4, summed over the 4 sequences of the step: 6 / 4
    assert loss.item() == 1.5
