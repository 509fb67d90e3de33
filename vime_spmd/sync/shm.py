"""The shared-memory transport of the weight sync: training shards exchanged through arenas within a node.

To load the engine, each rank needs, per parameter, every piece of it from the ranks of its own training replica
(same data-parallel index). With this transport each rank copies its pieces into an arena it owns (mapped once,
reused every sync) and reads its peers' pieces straight from theirs: no collective, two barriers per sync. An
arena is a POSIX shared-memory file on the CPU, or a device buffer mapped by the node's other processes through an
IPC handle on CUDA and Ascend (written, not yet run on either device).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..parallel import Layout
from ..runtime.device import Accelerator
from .weights import Shard


class ShmArena:
    """A rank's named POSIX shared-memory file (under /dev/shm), mapped as bytes. `share_info` is its path."""

    def __init__(self, num_bytes: int, path: str, create: bool) -> None:
        self.path, self.owner = path, create
        if create:
            with open(path, "wb") as f:
                f.truncate(max(num_bytes, 1))
        self.bytes = torch.from_file(path, shared=True, size=max(num_bytes, 1), dtype=torch.uint8)
        if create:
            os.chmod(path, 0o600)
        self.share_info = path

    def view(self, offset: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        num_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        return self.bytes[offset : offset + num_bytes].view(dtype).view(shape)

    def unlink(self) -> None:
        """Remove the name; the mappings stay valid until every process drops them."""
        if self.owner and os.path.exists(self.path):
            os.unlink(self.path)

    def close(self) -> None:
        self.bytes = None
        self.unlink()


class DeviceIpcArena(ShmArena):
    """A rank's device buffer, mapped by the other processes of its node through an IPC handle: torch's
    `reduce_tensor` (CUDA IPC), which torch_npu (2.10) replaces on import with its own for NPU tensors. Looked up
    at call time for that reason. `share_info` is the picklable handle."""

    def __init__(self, num_bytes: int, device: torch.device, handle=None) -> None:
        from torch.multiprocessing import reductions

        self.path, self.owner = None, handle is None
        if handle is None:
            self.bytes = torch.empty(max(num_bytes, 1), dtype=torch.uint8, device=device)
            self.share_info = reductions.reduce_tensor(self.bytes)
        else:
            rebuild, args = handle
            self.bytes = rebuild(*args)
            self.share_info = handle

    def unlink(self) -> None:
        pass  # the mapping ends with the owner's buffer


class ShmExchange:
    """Per-sync exchange of training shards through the arenas of one training replica (see above)."""

    def __init__(self, shards: list[Shard], layout: Layout, job_id: str, acc: Accelerator) -> None:
        self.shards, self.acc, self.layout = shards, acc, layout
        index, offset = [], 0
        for s in shards:
            index.append((s.name, offset, tuple(s.tensor.shape), s.tensor.dtype, s.tp_split))
            offset += s.tensor.numel() * s.tensor.element_size()
        device = acc.torch_device
        if device.type == "cpu":
            self.own = ShmArena(offset, f"/dev/shm/vime-{job_id}-rank{layout.rank}", create=True)
            open_peer = lambda info, num_bytes: ShmArena(num_bytes, info, create=False)  # noqa: E731
        else:
            self.own = DeviceIpcArena(offset, device)
            open_peer = lambda info, num_bytes: DeviceIpcArena(num_bytes, device, handle=info)  # noqa: E731
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (layout, self.own.share_info, offset, index))
        self.peers: dict[tuple[int, int], tuple[ShmArena, dict]] = {}
        for peer, info, num_bytes, peer_index in everyone:
            if peer.dp_rank != layout.dp_rank:
                continue
            arena = self.own if peer.rank == layout.rank else open_peer(info, num_bytes)
            self.peers[(peer.tp_rank, peer.pp_rank)] = (arena, {e[0]: e for e in peer_index})
        # Every peer has mapped the files: unlink them now, so that a crash cannot leave them in /dev/shm.
        dist.barrier()
        self.own.unlink()
        self.order = [[e[0] for e in self.peers[(0, pp)][1].values()] for pp in range(layout.pp_size)]
        self.own_index = index

    def pieces(self) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """Publish this rank's shards, then yield (name, pieces in TP order) for every parameter of the model.
        The pieces are views into the arenas, valid until `release()`, which every rank must call after it."""
        with torch.no_grad():
            for shard, (_, offset, shape, dtype, _) in zip(self.shards, self.own_index):
                self.own.view(offset, shape, dtype).copy_(shard.tensor)
        self.acc.synchronize()  # device copies are asynchronous: finish them before telling the peers
        dist.barrier()  # every arena is written
        for pp in range(self.layout.pp_size):
            for name in self.order[pp]:
                split = self.peers[(0, pp)][1][name][4]
                owners = range(self.layout.tp_size) if split else range(1)
                views = []
                for tp in owners:
                    arena, index = self.peers[(tp, pp)]
                    _, offset, shape, dtype, _ = index[name]
                    views.append(arena.view(offset, shape, dtype))
                yield name, views

    def release(self) -> None:
        """After the engine took everything from the views: nobody rewrites its arena (at the next sync) while a
        peer may still read it. Called once the last bucket is loaded, not when the last view is handed out."""
        self.acc.synchronize()
        dist.barrier()

    def close(self) -> None:
        for arena, _ in self.peers.values():
            if arena is not self.own:
                arena.close()
        self.own.close()
