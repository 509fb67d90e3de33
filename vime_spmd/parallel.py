"""The world and how it is cut: training tensor/pipeline/data parallel ranks and rollout engine groups.

Training follows Megatron's rank order tp-cp-ep-dp-pp: tensor parallel fastest, then data parallel, pipeline
stages slowest (rank = tp_rank + tp * (dp_rank + dp * pp_rank)). The ranks of one pipeline (same tp and dp rank,
every stage) train on the same samples. Engines are contiguous blocks of `--rollout-num-gpus-per-engine` ranks.
The two layouts are independent: a rank's training shard and its engine shard need not match (every engine rank
holds all layers).

`Layout` is the one description of where a rank sits: the training backend checks once that Megatron's groups
agree with it, and the weight sync exchanges it between ranks to find each rank's training replica.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


def node_identity() -> str:
    """The node this process runs on, as the launcher sees it: the host name and torchrun's node rank (GROUP_RANK).
    Ranks of one node may share memory; two torchrun invocations on one machine (`--nnodes 2` on loopback) are two
    nodes here, as they would be on two machines."""
    return f"{socket.gethostname()}:{os.environ.get('GROUP_RANK', '0')}"


@dataclass(frozen=True)
class Layout:
    rank: int
    world_size: int
    tp_size: int
    engine_size: int
    pp_size: int = 1

    @classmethod
    def of_world(cls, parallel) -> Layout:
        """This rank's layout in the initialised torch.distributed world, from the config's `ParallelConfig`."""
        import torch.distributed as dist

        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   tp_size=parallel.tensor_model_parallel_size, engine_size=parallel.rollout_num_gpus_per_engine,
                   pp_size=parallel.pipeline_model_parallel_size)

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp_size * self.pp_size)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size % self.dp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp_size * self.dp_size)

    @property
    def pipeline_ranks(self) -> list[int]:
        """Global rank of each stage of this rank's pipeline (same TP and DP rank), first stage first."""
        return [self.tp_rank + self.tp_size * (self.dp_rank + self.dp_size * stage) for stage in range(self.pp_size)]

    @property
    def num_engines(self) -> int:
        return self.world_size // self.engine_size

    @property
    def engine_index(self) -> int:
        return self.rank // self.engine_size

    @property
    def engine_rank(self) -> int:
        return self.rank % self.engine_size

    @property
    def is_engine_leader(self) -> bool:
        """One rank per engine speaks for it when results are gathered."""
        return self.engine_rank == 0

    def engine_slice(self, num_items: int) -> slice:
        """The contiguous share of `num_items` (prompts) that this rank's engine generates: equal shares when the
        engines divide `num_items` (a training rollout), else the remainder spread over the first engines (an eval
        set need not divide); an engine may get none."""
        e, engines = self.engine_index, self.num_engines
        return slice(e * num_items // engines, (e + 1) * num_items // engines)

    def dp_slice(self, num_items: int) -> slice:
        """The contiguous share of `num_items` (samples of one optimizer step) that this rank trains on."""
        per_rank = num_items // self.dp_size
        return slice(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)

    def train_rows(self, batch_size: int, global_batch_size: int, dp_rank: int | None = None) -> list[int]:
        """Rows of a rollout batch that a data-parallel rank (default: this one) trains on: its share of every
        optimizer step's `global_batch_size` samples, step after step."""
        dp_rank = self.dp_rank if dp_rank is None else dp_rank
        per_rank = global_batch_size // self.dp_size
        return [start + dp_rank * per_rank + i
                for start in range(0, batch_size, global_batch_size) for i in range(per_rank)]


def pipeline_split(num_layers: int, pp: int, first: int | None = None, last: int | None = None) -> list[int]:
    """Decoder layers per pipeline stage. Megatron's layouts: the first and last stages may hold their own counts
    (`--decoder-first-pipeline-num-layers`, `--decoder-last-pipeline-num-layers`), every middle stage the same
    share of the rest. With neither flag and `pp` not dividing the layers, the split is automatic: middle stages
    hold L // pp or one more, first and last the rest, the last (which also computes the logits and the loss)
    no more than the first. Raises ValueError naming the flags for a layout that cannot exist."""
    flags = ", ".join([f"--pipeline-model-parallel-size {pp}"] +
                      [f"{flag} {n}" for flag, n in (("--decoder-first-pipeline-num-layers", first),
                                                     ("--decoder-last-pipeline-num-layers", last)) if n is not None])
    if num_layers < pp:
        raise ValueError(f"--pipeline-model-parallel-size {pp}: the model has only {num_layers} layers, fewer than "
                         f"the stages; use at most {num_layers} stages")
    if pp == 1:
        if (first, last) != (None, None):
            raise ValueError(f"{flags}: uneven stage sizes need --pipeline-model-parallel-size >= 2; drop them")
        return [num_layers]
    if first is None and last is None:
        if num_layers % pp == 0:
            return [num_layers // pp] * pp
        return _automatic_split(num_layers, pp)
    if any(n is not None and n < 1 for n in (first, last)):
        raise ValueError(f"{flags}: every stage needs at least one layer")
    num_middle = pp - 2
    if first is None or last is None:  # the unset end stage counts as a middle one
        num_middle += 1
    rest = num_layers - (first or 0) - (last or 0)
    if (num_middle == 0 and rest != 0) or (num_middle > 0 and (rest < num_middle or rest % num_middle)):
        what = "the first and last stages must hold all" if num_middle == 0 else \
            f"the remaining {rest} must split evenly (at least one each) over the {num_middle} other stages"
        raise ValueError(f"{flags}: the model has {num_layers} layers and {what}; change the flags")
    middle = [rest // num_middle] * num_middle if num_middle else []
    if first is None:
        return middle + [last]
    if last is None:
        return [first] + middle
    return [first] + middle + [last]


def _automatic_split(num_layers: int, pp: int) -> list[int]:
    best = None
    for per_middle in (num_layers // pp, num_layers // pp + 1):  # ties: the first stage takes the extra layers
        ends = num_layers - per_middle * (pp - 2)
        if ends < 2:
            continue
        split = [-(-ends // 2)] + [per_middle] * (pp - 2) + [ends // 2]
        if best is None or max(split) < max(best):
            best = split
    assert best is not None and sum(best) == num_layers, (num_layers, pp)
    return best
