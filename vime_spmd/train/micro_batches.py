"""Which of a rank's samples go through the model together: fixed counts of samples, or a token budget.

Micro-batches are right-padded to their longest sample, so a micro-batch costs (padded length x samples) tokens of
activation memory and compute, padding included. With a token budget (`--use-dynamic-batch-size
--max-tokens-per-gpu N`), the samples are sorted by length (longest first; ties keep their order) and packed
greedily: each micro-batch takes the next samples while (its longest x its count) stays within N. Neighbours in
length order share a micro-batch, which keeps the padding small, and the plan depends only on the lengths
(deterministic: every rank of a pipeline, and every tensor-parallel rank, holds the same samples and computes the
same plan). For this cost (first length x count, lengths decreasing) greedy packing is first-fit decreasing: a
closed micro-batch can never take a later sample, since its capacity N // longest is used up.

A sample longer than N goes alone into its own micro-batch, over the budget, rather than being refused: its length
is only known after generation, and stopping an RL run there would lose the step. Raise N (or lower
--rollout-max-response-len) if a single sample does not fit in memory.

The loss does not depend on the grouping: every micro-batch's loss is divided by the step's token count over all
data-parallel ranks (algorithms/objective.py), so summing gradients over micro-batches gives the same step.
"""

from __future__ import annotations


def padded_length(length: int, pad_multiple: int) -> int:
    """`length` rounded up to a multiple of `pad_multiple` (sequence parallelism splits the sequence over TP)."""
    return -(-length // pad_multiple) * pad_multiple


def plan_micro_batches(lengths: list[int], micro_batch_size: int, max_tokens: int | None = None,
                       pad_multiple: int = 1) -> list[list[int]]:
    """Groups of indices into `lengths` (tokens per sample), every index once.

    Without `max_tokens`: consecutive groups of `micro_batch_size`, in order (the last may be shorter). With it:
    groups whose padded size (longest length, rounded up to `pad_multiple`, x count) is at most `max_tokens`, longest
    samples first; a sample alone over the budget forms its own group.
    """
    if max_tokens is None:
        return [list(range(start, min(start + micro_batch_size, len(lengths))))
                for start in range(0, len(lengths), micro_batch_size)]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    groups: list[list[int]] = []
    longest = 0
    for i in order:
        if groups and longest * (len(groups[-1]) + 1) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
            longest = padded_length(lengths[i], pad_multiple)
    return groups


def padding_tokens(lengths: list[int], groups: list[list[int]], pad_multiple: int = 1) -> tuple[int, int]:
    """(padding tokens, all tokens) of the micro-batches `groups`, each right-padded to its longest sample."""
    total = sum(padded_length(max(lengths[i] for i in g), pad_multiple) * len(g) for g in groups)
    return total - sum(lengths[i] for g in groups for i in g), total
