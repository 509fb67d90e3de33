"""Per-token log-probabilities and entropy from vocabulary-parallel logits.

Each TP rank holds logits for a contiguous slice of the vocabulary. The sums over the vocabulary are all-reduced
with Megatron's `reduce_from_tensor_model_parallel_region` (forward: all-reduce; backward: identity), which is
the correct gradient because every TP rank computes the same loss from the reduced values.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                         with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [b, s, V/tp] (this rank's vocab slice), labels [b, s] global token ids.

    Returns log p(label) [b, s] and, if asked, the entropy of p [b, s], where p = softmax(logits / temperature):
    the distribution the engine sampled from (vLLM's processed logprobs).
    """
    logits = logits.float() / temperature
    vocab_local = logits.size(-1)
    start = parallel_state.get_tensor_model_parallel_rank() * vocab_local
    group = parallel_state.get_tensor_model_parallel_group()

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
    target_z = reduce_from_tensor_model_parallel_region(target_z * in_slice)
    logprobs = target_z - log_sum_exp

    entropy = None
    if with_entropy:
        # H = log Z - E_p[z]
        expected_z = reduce_from_tensor_model_parallel_region((exp_z * z).sum(dim=-1)) / sum_exp
        entropy = log_sum_exp - expected_z
    return logprobs, entropy
