"""The world and how it is cut: training tensor/pipeline/data parallel ranks and rollout engine groups.

Training follows Megatron's rank order tp-cp-ep-dp-pp: tensor parallel fastest, then data parallel, pipeline
stages slowest (rank = tp_rank + tp * (dp_rank + dp * pp_rank)). The ranks of one pipeline (same tp and dp rank,
every stage) train on the same samples. Engines are contiguous blocks of `--rollout-num-gpus-per-engine` ranks.
The two layouts are independent: a rank's training shard and its engine shard need not match (every engine rank
holds all layers).
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
    def of_world(cls, parallel) -> "Layout":
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
        """The contiguous share of `num_items` (prompts) that this rank's engine generates."""
        per_engine = num_items // self.num_engines
        return slice(self.engine_index * per_engine, (self.engine_index + 1) * per_engine)

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
