"""The model families the trainer converts, chosen by the HF config's `model_type`.

A family is the three functions weight loading and weight sync need:
- `shape_from_hf(hf_config, tp_size, make_vocab_size_divisible_by) -> ModelShape`: sizes and GPTModel options
  (q/k norms, q/k/v biases, RoPE scaling, padded vocabulary); raises ValueError for what it cannot reproduce;
- `to_megatron(hf_state, shape, tp_rank, tp_size) -> dict`: this TP rank's Megatron state dict;
- `to_hf(megatron_name, shards, shape) -> Iterator[(hf_name, tensor)]`: full HF tensors from one parameter's
  TP shards (in rank order);
- `to_engine(megatron_name, shards, shape, engine_rank, engine_size, engine_tensors) -> list[Write]`: the copies
  that put one engine rank's share of that parameter straight into the engine's own tensors.
Adding a family is one module with these four and one line below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import llama, qwen2, qwen3
from .model import ModelShape


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # HF `config.model_type` values served by this family
    shape_from_hf: Callable[..., ModelShape]
    to_megatron: Callable[[dict[str, torch.Tensor], ModelShape, int, int], dict[str, torch.Tensor]]
    to_hf: Callable[[str, list[torch.Tensor], ModelShape], Iterator[tuple[str, torch.Tensor]]]
    to_engine: Callable[..., list]


FAMILIES = {
    f.name: f
    for f in (
        Family("qwen3", ("qwen3",), qwen3.shape_from_hf, qwen3.to_megatron, qwen3.to_hf,
               qwen3.to_engine),
        Family("qwen2", ("qwen2",), qwen2.shape_from_hf, qwen2.to_megatron, qwen2.to_hf,
               qwen2.to_engine),
        Family("llama", ("llama",), llama.shape_from_hf, llama.to_megatron, llama.to_hf,
               llama.to_engine),
    )
}


def family_for(hf_config) -> Family:
    model_type = getattr(hf_config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"--hf-checkpoint: model_type {model_type!r} (architectures "
                     f"{getattr(hf_config, 'architectures', None)}) is not supported; supported: {supported}")
