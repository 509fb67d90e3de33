"""The distributed optimizer's sharded state in our per-rank checkpoints.

A distributed optimizer keeps its parameter state (main params, Adam moments) out of `state_dict()`. Our checkpoints
are one file per rank and resume with the same layout, so each rank saves its own shard, in Megatron's bucket layout
(`get_parameter_state_dp_reshardable`): no gather to data-parallel rank 0. (The gathered `dp_zero` format does not
load back on CPU: torch's Adam keeps a per-parameter `step` that the gathered state lacks.)
"""

from __future__ import annotations

import torch


def optimizers_of(optimizer) -> list:
    """The optimizers inside a Megatron ChainedOptimizer, or the one optimizer."""
    return getattr(optimizer, "chained_optimizers", None) or [optimizer]


def sharded_state(optimizer) -> list[dict]:
    return [opt.get_parameter_state_dp_reshardable() for opt in optimizers_of(optimizer)]


@torch.no_grad()  # with fp32 weights the main params are views of the parameters, which require grad
def load_sharded_state(optimizer, shards: list[dict]) -> None:
    """After `optimizer.load_state_dict` (which allocates placeholders), the shard this rank saved."""
    for opt, state in zip(optimizers_of(optimizer), shards, strict=True):
        # The loader skips entries marked as bucket padding, a mark only Megatron's dist-checkpoint variant writes.
        for by_dtype in (v for k, v in state.items() if isinstance(k, int)):
            for entry in (e for buckets in by_dtype.values() for bucket in buckets for e in bucket):
                entry.setdefault("padding", False)
        opt.load_parameter_state_from_dp_reshardable(state)
