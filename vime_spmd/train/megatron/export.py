"""The trainer's weights on their way out: TP pieces of every Megatron parameter, and their HF or engine form.

`MegatronExport` is the weight sync's `WeightSource` (weights.py) and what the HF export tool reads. It holds no
state of its own beyond the order of the parameters: it reads the live parameters of the actor's model, so one
export serves every sync of a run. Every rank of a pipeline iterates the same parameters in the same order (the
export plan, exchanged once over the pipeline group), which is what lets the collectives below line up.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from megatron.core import parallel_state

from ...parallel import Layout
from ...runtime.device import Accelerator
from ...sync.weights import EngineTensor, ParamEntry, Shard, Write
from .families import Family
from .model import ModelShape, own_params


class MegatronExport:
    def __init__(self, model: torch.nn.Module, layout: Layout, family: Family, shape: ModelShape,
                 acc: Accelerator) -> None:
        """`model`: this rank's GPTModel (its TP shard of its pipeline stage), as laid out by `layout`."""
        self.model, self.layout, self.family, self.shape, self.acc = model, layout, family, shape, acc
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.plan = self._exchange_plan()

    @classmethod
    def of(cls, actor) -> MegatronExport:
        """The export of a `MegatronActor`'s policy."""
        return cls(actor.model.module, actor.layout, actor.family, actor.shape, actor.acc)

    def _exchange_plan(self) -> list[list[ParamEntry]]:
        """Per pipeline stage, (global name, shape, dtype, TP-split) of its parameters, in its order: what every
        rank of the pipeline iterates, identically, to export the whole model."""
        mine = [(name, p.shape, p.dtype, tp_split) for name, p, tp_split in self.own_params()]
        if self.layout.pp_size == 1:
            return [mine]
        plan: list = [None] * self.layout.pp_size
        torch.distributed.all_gather_object(plan, mine, group=self.pp_group)
        return plan

    def own_params(self) -> list[tuple[str, torch.nn.Parameter, bool]]:
        return own_params(self.model, self.shape, self.layout.tp_size)

    def shards(self) -> list[Shard]:
        """This rank's piece of every parameter, by global Megatron name (the weight-sync transports' input)."""
        return [Shard(name, param.detach(), tp_split) for name, param, tp_split in self.own_params()]

    def parameter_plan(self) -> list[ParamEntry]:
        """(global name, shape, dtype, TP-split) of every parameter of the whole model, stage after stage."""
        return [entry for entries in self.plan for entry in entries]

    def to_hf(self, name: str, pieces: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF tensors from the TP pieces (in TP-rank order) of one Megatron parameter."""
        return self.family.to_hf(name, pieces, self.shape)

    def to_engine(self, name: str, pieces: list[torch.Tensor], engine_rank: int, engine_size: int,
                  engine_tensors: dict[str, EngineTensor]) -> list[Write]:
        """The writes of engine rank `engine_rank`'s share of one Megatron parameter (see `dense.to_engine`)."""
        return self.family.to_engine(name, pieces, self.shape, engine_rank, engine_size, engine_tensors)

    @torch.no_grad()
    def gathered_pieces(self, local_only: frozenset[str] = frozenset()) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """(global Megatron name, TP pieces in rank order) of every parameter of the whole model on every rank, one
        parameter at a time: TP shards are all-gathered over the TP group; with stages, each parameter's pieces are
        then broadcast from its stage over the pipeline group, stage after stage (never more than one parameter
        held). For names in `local_only` (every rank of the replica needs only the piece of its own TP rank) nothing
        is gathered: the other pieces are meta-device placeholders, and stages broadcast only that one piece."""
        layout = self.layout
        tp_size, pp_size = layout.tp_size, layout.pp_size
        params = {name: p for name, p, _ in self.own_params()}
        for stage, entries in enumerate(self.plan):
            for name, shape, dtype, tp_split in entries:
                local = tp_split and name in local_only
                gather = tp_split and not local
                if stage == layout.pp_rank:
                    param = params[name].detach()
                    pieces = [param]
                    if gather:
                        pieces = [torch.empty_like(param) for _ in range(tp_size)]
                        torch.distributed.all_gather(pieces, param.contiguous(), group=self.tp_group)
                if pp_size > 1:
                    num_pieces = tp_size if gather else 1
                    stacked = (torch.stack(pieces) if stage == layout.pp_rank else
                               torch.empty((num_pieces, *shape), dtype=dtype, device=self.acc.torch_device))
                    torch.distributed.broadcast(stacked, src=layout.pipeline_ranks[stage], group=self.pp_group)
                    pieces = list(stacked.unbind(0))
                if local:
                    pieces = [pieces[0] if t == layout.tp_rank else torch.empty(shape, dtype=dtype, device="meta")
                              for t in range(tp_size)]
                yield name, pieces

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named tensors of the whole model on every rank, one parameter at a time."""
        for name, pieces in self.gathered_pieces():
            yield from self.to_hf(name, pieces)
