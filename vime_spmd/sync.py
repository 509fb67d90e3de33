"""Weight sync: the trainer's HF-named tensors into the engine, in buckets of bounded size.

Ordering contract: the caller has woken the engine's weights (accelerators) before `sync_weights` and wakes
the KV cache after it. Tensors are streamed from the trainer one parameter at a time (each is gathered over
the training tensor-parallel group as it is produced), grouped into buckets of at most `buffer_size_bytes` of
whole decoder layers (a layer larger than that forms its own bucket: the engine must get a layer in one call),
and each bucket is handed to the engine in one call. The peak
extra memory is one bucket, not one model.

Two formats (`--weight-sync-format`):
- "direct": each engine rank copies its own share of every parameter (its tensor-parallel slice, in the
  engine's fused layouts: q/k/v in one tensor, gate/up in one) from the training pieces straight into the
  engine's tensors: one copy of exactly the bytes the engine rank holds, no full HF tensor built. Needs engine
  tensors that are what the kernels read (true for unquantized models on CUDA, and on CPU once the engine keeps
  plain weights instead of oneDNN-packed ones: `rollout/vllm_patches.py`).
- "reload": full HF tensors through vLLM's `reload_weights` (its loader slices them and re-runs its
  after-load processing). Slower, but makes no assumption about the engine's kernels: the choice for Ascend,
  where vllm-ascend may convert weights after loading.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from .parallel import node_identity

logger = logging.getLogger(__name__)

NamedTensors = list[tuple[str, torch.Tensor]]


@dataclass
class SyncStats:
    num_tensors: int = 0
    num_buckets: int = 0
    num_bytes: int = 0
    max_bucket_bytes: int = 0

    def add_bucket(self, num_tensors: int, num_bytes: int) -> None:
        self.num_tensors += num_tensors
        self.num_buckets += 1
        self.num_bytes += num_bytes
        self.max_bucket_bytes = max(self.max_bucket_bytes, num_bytes)


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


FORMATS = ("auto", "direct", "reload")


def choose_format(requested: str, device_kind: str) -> str:
    """`auto`: direct on CPU and CUDA; reload on Ascend, where the engine's tensors may not be what its kernels
    read after loading (vllm-ascend can convert weight formats once loaded), so only its own loader may write."""
    if requested not in FORMATS:
        raise ValueError(f"--weight-sync-format {requested!r}: choose one of {', '.join(FORMATS)}")
    if requested == "auto":
        return "reload" if device_kind == "npu" else "direct"
    return requested


def engine_unit(hf_name: str) -> str:
    """The part of the engine that must receive all its tensors in one load call: a decoder layer (vLLM's
    in-place reload processes a layer once per call; a layer split over two calls is left half-written), or
    one global tensor (embeddings, final norm, LM head)."""
    parts = hf_name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return ".".join(parts[: i + 2])
    return hf_name


def buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], buffer_size_bytes: int,
            unit: Callable[[str], str] = lambda name: name) -> Iterator[NamedTensors]:
    """Group a stream of tensors, in order, into lists of at most `buffer_size_bytes`, cutting only between
    units (`unit(name)` changes); a unit larger than the buffer is a bucket of its own. The stream must give
    each unit's tensors consecutively."""
    if buffer_size_bytes <= 0:
        raise ValueError(f"--update-weight-buffer-size {buffer_size_bytes}: must be > 0 bytes")
    bucket: NamedTensors = []
    size, current = 0, None
    pending: NamedTensors = []  # the current unit's tensors
    pending_size = 0
    for name, tensor in named_tensors:
        key = unit(name)
        if key != current and pending:
            if bucket and size + pending_size > buffer_size_bytes:
                yield bucket
                bucket, size = [], 0
            bucket += pending
            size += pending_size
            pending, pending_size = [], 0
        current = key
        pending.append((name, tensor))
        pending_size += tensor.numel() * tensor.element_size()
    if pending:
        if bucket and size + pending_size > buffer_size_bytes:
            yield bucket
            bucket = []
        bucket += pending
    if bucket:
        yield bucket


def sync_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], load_bucket: Callable[[NamedTensors], None],
                 buffer_size_bytes: int) -> SyncStats:
    """Stream `named_tensors` into the engine through `load_bucket`, one call per bucket of whole units."""
    stats = SyncStats()
    for bucket in buckets(named_tensors, buffer_size_bytes, unit=engine_unit):
        bucket_bytes = sum(t.numel() * t.element_size() for _, t in bucket)
        load_bucket(bucket)
        stats.add_bucket(len(bucket), bucket_bytes)
    return stats


def own_piece_suffices(plan: list[tuple[str, torch.Size, torch.dtype, bool]], tp_size: int,
                       replica: list[tuple[int, int, dict[str, EngineTensor]]],
                       writes_of: Callable[..., list[Write]], engine_size: int) -> frozenset[str]:
    """The TP-split parameters that no rank of a training replica needs another rank's piece of, for the direct
    format: `replica` lists each rank's (training TP rank, engine rank, engine tensors); `writes_of(name, pieces,
    engine_rank, engine_size, engine_tensors)` is the family's `to_engine`. Worked out on meta tensors (no data).
    When the training and engine tensor-parallel layouts line up (TP 2 into engines of TP 2) that is every
    parameter, and the collective transport then gathers nothing."""
    local = set()
    for name, shape, dtype, tp_split in plan:
        if not tp_split:
            continue
        pieces = [torch.empty(shape, dtype=dtype, device="meta") for _ in range(tp_size)]
        index = {id(p): t for t, p in enumerate(pieces)}
        if all(index[id(w.src if w.src._base is None else w.src._base)] == tp_rank
               for tp_rank, engine_rank, tensors in replica
               for w in writes_of(name, pieces, engine_rank, engine_size, tensors) if w.src is not None):
            local.add(name)
    return frozenset(local)


# ---- moving shards between ranks -------------------------------------------------------------------------
#
# The trainer exposes its parameters as `Shard`s: its (TP-, later PP-) local piece of each Megatron parameter,
# named with global layer numbers. To load the engine, each rank needs, per parameter, every piece of it from
# the ranks of its own training replica (same data-parallel index). Two ways to move them:
# - "collective": all-gather over the training groups (works across nodes: gloo / NCCL / HCCL);
# - "shm": within a node, each rank copies its pieces into a POSIX shared-memory arena it owns (mapped once,
#   reused every sync) and reads its peers' pieces straight from theirs, with no collective but two barriers.


@dataclass(frozen=True)
class Shard:
    name: str  # Megatron name with the global layer number
    tensor: torch.Tensor
    tp_split: bool  # whether the training TP ranks hold different pieces (else replicated)


@dataclass(frozen=True)
class Coords:
    """Where a rank sits in the training layout."""

    dp_rank: int
    tp_rank: int
    pp_rank: int


TRANSPORTS = ("auto", "shm", "collective")


def choose_transport(requested: str, device_kind: str, replica_on_one_node: bool, replica_size: int = 2) -> str:
    """`auto`: collective when the training replica is one rank (`replica_size`, TP x PP, is 1: every rank holds
    every parameter whole, so nothing moves and no collective runs); shm when every rank of the replica shares
    its node and the tensors are on the CPU; else collective. `shm` can be forced on CUDA and Ascend, where the
    shared arenas are device buffers mapped through IPC handles: written for, but not yet run on, either device,
    which is why `auto` does not pick it there."""
    if requested not in TRANSPORTS:
        raise ValueError(f"--weight-sync-transport {requested!r}: choose one of {', '.join(TRANSPORTS)}")
    if requested == "collective":
        return "collective"
    if requested == "auto":
        return "shm" if replica_size > 1 and replica_on_one_node and device_kind == "cpu" else "collective"
    if not replica_on_one_node:
        raise ValueError("--weight-sync-transport shm is not possible here: the training replica spans nodes; "
                         "use auto or collective")
    return "shm"


class ShmArena:
    """A rank's named POSIX shared-memory file (under /dev/shm), mapped as bytes. `share_info` is its path."""

    def __init__(self, num_bytes: int, path: str, create: bool) -> None:
        import os

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
        import os

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
    """Per-sync exchange of training shards through shared memory within a node (see above)."""

    def __init__(self, shards: list[Shard], coords: Coords, tp_size: int, pp_size: int, job_id: str,
                 device: torch.device) -> None:
        import torch.distributed as dist

        rank = dist.get_rank()
        self.shards, self.device = shards, device
        index, offset = [], 0
        for s in shards:
            index.append((s.name, offset, tuple(s.tensor.shape), s.tensor.dtype, s.tp_split))
            offset += s.tensor.numel() * s.tensor.element_size()
        if device.type == "cpu":
            self.own = ShmArena(offset, f"/dev/shm/vime-{job_id}-rank{rank}", create=True)
            open_peer = lambda info, num_bytes: ShmArena(num_bytes, info, create=False)  # noqa: E731
        else:
            self.own = DeviceIpcArena(offset, device)
            open_peer = lambda info, num_bytes: DeviceIpcArena(num_bytes, device, handle=info)  # noqa: E731
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (coords, rank, self.own.share_info, offset, index))
        self.peers: dict[tuple[int, int], tuple[ShmArena, dict]] = {}
        for peer_coords, peer_rank, info, num_bytes, peer_index in everyone:
            if peer_coords.dp_rank != coords.dp_rank:
                continue
            arena = self.own if peer_rank == rank else open_peer(info, num_bytes)
            self.peers[(peer_coords.tp_rank, peer_coords.pp_rank)] = (arena, {e[0]: e for e in peer_index})
        # Every peer has mapped the files: unlink them now, so that a crash cannot leave them in /dev/shm.
        dist.barrier()
        self.own.unlink()
        self.tp_size, self.pp_size = tp_size, pp_size
        self.order = [[e[0] for e in self.peers[(0, pp)][1].values()] for pp in range(pp_size)]
        self.own_index = index

    def pieces(self) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """Publish this rank's shards, then yield (name, pieces in TP order) for every parameter of the model.
        The pieces are views into the arenas, valid until `release()`, which every rank must call after it."""
        import torch.distributed as dist

        with torch.no_grad():
            for shard, (_, offset, shape, dtype, _) in zip(self.shards, self.own_index):
                self.own.view(offset, shape, dtype).copy_(shard.tensor)
        self._synchronize()
        dist.barrier()  # every arena is written
        for pp in range(self.pp_size):
            for name in self.order[pp]:
                split = self.peers[(0, pp)][1][name][4]
                owners = range(self.tp_size) if split else range(1)
                views = []
                for tp in owners:
                    arena, index = self.peers[(tp, pp)]
                    _, offset, shape, dtype, _ = index[name]
                    views.append(arena.view(offset, shape, dtype))
                yield name, views

    def release(self) -> None:
        """After the engine took everything from the views: nobody rewrites its arena (at the next sync) while a
        peer may still read it. Called once the last bucket is loaded, not when the last view is handed out."""
        import torch.distributed as dist

        self._synchronize()
        dist.barrier()

    def _synchronize(self) -> None:
        """Device copies are asynchronous: finish them before telling the peers."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "npu":
            torch.npu.synchronize(self.device)  # type: ignore[attr-defined]

    def close(self) -> None:
        for arena, _ in self.peers.values():
            if arena is not self.own:
                arena.close()
        self.own.close()


class WeightSync:
    """The whole update: trainer shards -> (engine shares | HF tensors) -> engine, over the chosen transport."""

    def __init__(self, actor, acc_kind: str, transport: str, buffer_size_bytes: int, sync_format: str = "reload",
                 engine_tensors: dict[str, EngineTensor] | None = None, engine_rank: int = 0,
                 engine_size: int = 1) -> None:
        import uuid

        import torch.distributed as dist

        self.actor, self.buffer_size_bytes = actor, buffer_size_bytes
        self.format = choose_format(sync_format, acc_kind)
        if self.format == "direct" and engine_tensors is None:
            raise ValueError("the direct weight sync needs the engine's tensors (engine_tensors)")
        self.engine_tensors, self.engine_rank, self.engine_size = engine_tensors, engine_rank, engine_size
        coords, host = actor.coords(), node_identity()
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (coords, host, engine_rank, engine_tensors))
        replica = [entry for entry in everyone if entry[0].dp_rank == coords.dp_rank]  # this training replica
        replica_on_one_node = all(entry[1] == host for entry in replica)
        self.transport = choose_transport(transport, acc_kind, replica_on_one_node, actor.tp_size * actor.pp_size)
        self.exchange, self.local_only = None, frozenset()
        if self.transport == "collective" and self.format == "direct" and actor.tp_size > 1:
            plan = actor.parameter_plan()
            self.local_only = own_piece_suffices(plan, actor.tp_size, [(c.tp_rank, e, t) for c, _, e, t in replica],
                                                 actor.to_engine, engine_size)
            logger.info("weight sync: %d of %d tensor-parallel parameters need no gather (each rank's own piece "
                        "holds its engine share)", len(self.local_only), sum(split for *_, split in plan))
        if self.transport == "shm":
            job_id = [uuid.uuid4().hex[:12]]
            dist.broadcast_object_list(job_id, src=0)
            self.exchange = ShmExchange(actor.shards(), coords, actor.tp_size, actor.pp_size, job_id[0],
                                        actor.acc.torch_device)

    def pieces(self) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """(Megatron name, TP pieces) of every parameter of the model, on every rank."""
        if self.exchange is None:
            return self.actor.gathered_pieces(self.local_only)
        return self.exchange.pieces()

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF tensors of the whole model, for a consumer that is done with each before taking the next."""
        yield from self._hf_weights()
        if self.exchange is not None:
            self.exchange.release()

    def _hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, pieces in self.pieces():
            yield from self.actor.to_hf(name, pieces)

    def update(self, target) -> SyncStats:
        """Load the trainer's weights into the engine through `target` (the memory manager, or the engine
        itself): `write_weights(writes)` per bucket (direct) or `load_weights(named_tensors)` (reload)."""
        if self.format == "reload":
            stats = sync_weights(self._hf_weights(), target.load_weights, self.buffer_size_bytes)
        else:
            stats = self._update_direct(target.write_weights)
        if self.exchange is not None:
            self.exchange.release()
        return stats

    def _update_direct(self, write: Callable[[list[Write]], dict[str, int]]) -> SyncStats:
        stats, written = SyncStats(), dict.fromkeys(self.engine_tensors, 0)
        bucket: list[Write] = []
        bucket_bytes = 0

        def flush() -> None:
            nonlocal bucket, bucket_bytes
            for name, n in write(bucket).items():
                written[name] += n
            stats.add_bucket(len(bucket), bucket_bytes)
            bucket, bucket_bytes = [], 0

        # Sources are views of the training pieces (shm arenas, or gathered copies): the bucket bounds how many
        # gathered pieces are alive at once; arena views cost nothing.
        for name, pieces in self.pieces():
            writes = self.actor.to_engine(name, pieces, self.engine_rank, self.engine_size, self.engine_tensors)
            bucket += writes
            bucket_bytes += sum(w.num_bytes for w in writes)
            if bucket_bytes >= self.buffer_size_bytes:
                flush()
        if bucket:
            flush()
        # Every element of every engine tensor is written each sync: after a level-2 sleep nothing else is there.
        expected = {n: torch.Size(t.shape).numel() for n, t in self.engine_tensors.items()}
        wrong = {n: (got, expected[n]) for n, got in written.items() if got != expected[n]}
        if wrong:
            raise RuntimeError("direct weight sync did not write each engine tensor exactly once (elements written, "
                               f"expected): {dict(list(wrong.items())[:5])}; use --weight-sync-format reload and "
                               "report this model")
        return stats

    def close(self) -> None:
        if self.exchange is not None:
            self.exchange.close()
