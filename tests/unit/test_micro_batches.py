"""Micro-batch plans: fixed counts, and token budgets that keep padding small, every sample once, deterministically."""

from __future__ import annotations

import random

import pytest

from vime_spmd.config import check_config, parse_config
from vime_spmd.train.micro_batches import padding_tokens, plan_micro_batches


def cost(lengths: list[int], group: list[int]) -> int:
    return max(lengths[i] for i in group) * len(group)


def test_fixed_micro_batches_are_consecutive_samples_in_order():
    assert plan_micro_batches([5, 9, 2, 7, 3], micro_batch_size=2) == [[0, 1], [2, 3], [4]]


def test_token_budget_groups_similar_lengths_longest_first():
    lengths = [100, 10, 90, 12, 95, 11]
    groups = plan_micro_batches(lengths, micro_batch_size=2, max_tokens=300)
    # longest first: 100, 95, 90 (3 x 100 = 300 fits), then 12, 11, 10 (36)
    assert groups == [[0, 4, 2], [3, 5, 1]]
    # padding: (300 - 285) + (36 - 33) = 18 of 336 tokens
    assert padding_tokens(lengths, groups) == (18, 336)
    # fixed pairs pad each short sample to a long one: [100, 10] 200 + [90, 12] 180 + [95, 11] 190 = 570, 318 real
    assert padding_tokens(lengths, plan_micro_batches(lengths, 2)) == (252, 570)


def test_a_sample_over_the_budget_trains_alone():
    groups = plan_micro_batches([40, 8, 8], micro_batch_size=4, max_tokens=16)
    assert groups == [[0], [1, 2]]


def test_sequence_parallel_rounding_counts_against_the_budget():
    # 7 rounds up to 8 with TP 2: two of them take 16 tokens, three would take 24
    assert plan_micro_batches([7, 7, 7], micro_batch_size=4, max_tokens=16, pad_multiple=2) == [[0, 1], [2]]
    assert padding_tokens([7, 7, 7], [[0, 1], [2]], pad_multiple=2) == (3, 24)


@pytest.mark.parametrize("seed", range(5))
def test_every_sample_once_within_budget_and_the_same_plan_every_time(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(4, 40), rng.randint(200, 600)]) for _ in range(rng.randint(1, 60))]
    budget = 700
    groups = plan_micro_batches(lengths, micro_batch_size=4, max_tokens=budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(cost(lengths, g) <= budget for g in groups)
    assert plan_micro_batches(list(lengths), micro_batch_size=4, max_tokens=budget) == groups
    # no micro-batch could have taken the first sample of the next one (greedy first-fit on sorted lengths: that
    # sample is no longer than the micro-batch's longest, so one more sample of that length must break the budget)
    for a in groups[:-1]:
        assert max(lengths[i] for i in a) * (len(a) + 1) > budget


BASE = ["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--rollout-batch-size", "4", "--n-samples-per-prompt", "2"]


@pytest.mark.parametrize("flags, match", [
    (["--use-dynamic-batch-size"], "--use-dynamic-batch-size needs --max-tokens-per-gpu N"),
    (["--max-tokens-per-gpu", "512"], "--max-tokens-per-gpu applies with --use-dynamic-batch-size only"),
    (["--use-dynamic-batch-size", "--max-tokens-per-gpu", "0"], "--max-tokens-per-gpu 0: must be at least 1"),
    (["--use-dynamic-batch-size", "--max-tokens-per-gpu", "9", "--log-probs-max-tokens-per-gpu", "-1"],
     "--log-probs-max-tokens-per-gpu -1: must be at least 1"),
])
def test_token_budget_flags_are_checked(flags, match):
    with pytest.raises(ValueError, match=match):
        check_config(parse_config(BASE + flags), world_size=2)


def test_dynamic_batches_ignore_the_micro_batch_size_and_logprobs_default_to_the_training_budget():
    # 8 samples over 2 ranks: fixed micro-batches of 3 would not divide them, a token budget has no such rule
    cfg = parse_config(BASE + ["--use-dynamic-batch-size", "--max-tokens-per-gpu", "4096", "--micro-batch-size", "3"])
    check_config(cfg, world_size=2)
    assert cfg.train.log_probs_max_tokens_per_gpu == 4096
