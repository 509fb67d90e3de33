"""The records weights travel in between the trainer and the engine, shared by both sides and by the sync.

- `Shard`: a training rank's piece of one Megatron parameter (what the transports move between ranks);
- `EngineTensor`: what the engine reports of one of its tensors (what the direct sync computes its writes from);
- `Write` and `apply_write`: one copy of a training piece's view into an engine tensor (the direct sync's unit);
- `WeightSource`: what the sync needs from the trainer (the Megatron backend's `MegatronExport` provides it).

Where a rank sits in the training and engine layouts is `parallel.Layout`. This module imports neither megatron
nor vllm, so `train/megatron/`, `rollout/` and `sync.py` can all import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..parallel import Layout
from ..runtime.device import Accelerator

NamedTensors = list[tuple[str, torch.Tensor]]
# (global Megatron name, shape, dtype, whether the training TP ranks hold different pieces) of one parameter
ParamEntry = tuple[str, torch.Size, torch.dtype, bool]


@dataclass(frozen=True)
class Shard:
    name: str  # Megatron name with the global layer number
    tensor: torch.Tensor
    tp_split: bool  # whether the training TP ranks hold different pieces (else replicated)


@dataclass(frozen=True)
class EngineTensor:
    """What the direct sync needs to know of one engine tensor (reported by the engine)."""

    shape: tuple[int, ...]
    vocab_rows: tuple[int, int] | None = None  # for vocabulary-split tensors: the vocab rows this rank holds


@dataclass(frozen=True)
class Write:
    """Copy `src` into engine tensor `name` at `start` along `dim` (rows for dim 0, where `src` may carry extra
    dims that the rows flatten, e.g. [groups, heads, head_dim, hidden]); `src=None` zeroes `count` rows."""

    name: str
    dim: int
    start: int
    src: torch.Tensor | None
    count: int = 0

    @property
    def num_bytes(self) -> int:
        return 0 if self.src is None else self.src.numel() * self.src.element_size()


def apply_write(dst: torch.Tensor, w: Write) -> int:
    """Do one write into `dst`; returns the number of elements written."""
    row = dst.numel() // dst.shape[w.dim]  # elements per index of `dim`
    if w.src is None:
        dst.narrow(w.dim, w.start, w.count).zero_()
        return w.count * row
    region = dst.narrow(w.dim, w.start, w.src.numel() // row)
    if w.dim == 0:
        region = region.view(w.src.shape)  # contiguous rows: take the source's shape
    region.copy_(w.src)
    return w.src.numel()


class WeightSource(Protocol):
    """The trainer's side of the sync: its weights as TP pieces of Megatron parameters, and their conversions."""

    layout: Layout
    acc: Accelerator

    def shards(self) -> list[Shard]:
        """This rank's piece of every parameter it holds."""

    def parameter_plan(self) -> list[ParamEntry]:
        """Every parameter of the whole model, in the order every rank iterates them."""

    def gathered_pieces(self, local_only: frozenset[str] = frozenset()) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """(name, TP pieces in rank order) of every parameter, moved over the training process groups."""

    def to_hf(self, name: str, pieces: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF tensors from one parameter's TP pieces."""

    def to_engine(self, name: str, pieces: list[torch.Tensor], engine_rank: int, engine_size: int,
                  engine_tensors: dict[str, EngineTensor]) -> list[Write]:
        """The writes of one engine rank's share of one parameter."""
