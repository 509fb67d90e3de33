"""Per-token log-probabilities and entropy from vocabulary-parallel logits.

Each TP rank holds logits for a contiguous slice of the vocabulary. The sums over the vocabulary are all-reduced
with Megatron's `reduce_from_tensor_model_parallel_region` (forward: all-reduce; backward: identity), which is
the correct gradient because every TP rank computes the same loss from the reduced values.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float, with_entropy: bool,
                         vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [b, s, V/tp] (this rank's vocab slice), labels [b, s] global token ids.

    Returns log p(label) [b, s] and, if asked, the entropy of p [b, s], where p = softmax(logits / temperature):
    the distribution the engine sampled from (vLLM's processed logprobs). `vocab_size`: the true vocabulary when
    Megatron's is padded (`--make-vocab-size-divisible-by`); columns at or past it get probability 0 (no weight
    can make a logit -inf, so they are masked here).
    """
    logits = logits.float()
    if temperature != 1.0:  # x / 1 is x, bit for bit: skip a pass over the logits and one in the backward
        logits = logits / temperature
    vocab_local = logits.size(-1)
    start = parallel_state.get_tensor_model_parallel_rank() * vocab_local
    group = parallel_state.get_tensor_model_parallel_group()
    padded = None
    if vocab_size is not None and start + vocab_local > vocab_size:
        padded = torch.arange(start, start + vocab_local, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padded, float("-inf"))

    # The shift only stabilises exp(); log-sum-exp is invariant to it, so it needs no gradient.
    shift = logits.detach().max(dim=-1).values
    torch.distributed.all_reduce(shift, op=torch.distributed.ReduceOp.MAX, group=group)
    z = logits - shift.unsqueeze(-1)
    exp_z = z.exp()
    sum_exp = reduce_from_tensor_model_parallel_region(exp_z.sum(dim=-1))
    log_sum_exp = sum_exp.log()

    local = labels - start
    in_slice = (local >= 0) & (local < vocab_local)
    target_z = z.gather(-1, local.clamp(0, vocab_local - 1).unsqueeze(-1)).squeeze(-1)
    # where, not a product: a clamped index may land on a padded (-inf) column, and -inf * 0 is nan.
    target_z = reduce_from_tensor_model_parallel_region(torch.where(in_slice, target_z, 0.0))
    logprobs = target_z - log_sum_exp

    entropy = None
    if with_entropy:
        # H = log Z - E_p[z]; padded columns contribute 0 (not 0 * -inf), also to the gradient.
        z_finite = z if padded is None else z.masked_fill(padded, 0.0)
        expected_z = reduce_from_tensor_model_parallel_region((exp_z * z_finite).sum(dim=-1)) / sum_exp
        entropy = log_sum_exp - expected_z
    return logprobs, entropy
