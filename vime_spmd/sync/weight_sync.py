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
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel import node_identity
from .shm import ShmExchange
from .weights import EngineTensor, NamedTensors, ParamEntry, WeightSource, Write

logger = logging.getLogger(__name__)


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


def own_piece_suffices(plan: list[ParamEntry], tp_size: int,
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
# The trainer exposes its parameters as `Shard`s: its (TP-, PP-) local piece of each Megatron parameter, named with
# global layer numbers. To load the engine, each rank needs, per parameter, every piece of it from the ranks of its
# own training replica (same data-parallel index). Two ways to move them:
# - "collective": all-gather over the training groups (works across nodes: gloo / NCCL / HCCL);
# - "shm": within a node, through shared-memory arenas (`shm.py`), with no collective but two barriers.


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


@dataclass(frozen=True)
class SyncPlan:
    """The sync as the flags ask for it, resolved once for this device: the engine is built for its format, and
    `WeightSync` follows it. The transport stays as asked until `WeightSync` knows where every rank runs."""

    format: str  # "direct" | "reload"
    transport: str  # "auto" | "shm" | "collective"
    buffer_size_bytes: int  # the most bytes handed to the engine in one call

    @classmethod
    def from_flags(cls, parallel, device_kind: str) -> SyncPlan:
        """From the config's `ParallelConfig` (--weight-sync-format, --weight-sync-transport,
        --update-weight-buffer-size)."""
        return cls(choose_format(parallel.weight_sync_format, device_kind), parallel.weight_sync_transport,
                   parallel.update_weight_buffer_size)

    @property
    def direct(self) -> bool:
        return self.format == "direct"


class WeightSync:
    """The whole update: trainer shards -> (engine shares | HF tensors) -> engine, over the chosen transport."""

    def __init__(self, source: WeightSource, plan: SyncPlan,
                 engine_tensors: dict[str, EngineTensor] | None = None) -> None:
        """`source`: the trainer's weights (its layout and device included); `engine_tensors`: this rank's engine
        tensors, which the direct format writes (`RolloutEngine.tensors()`)."""
        if plan.direct and engine_tensors is None:
            raise ValueError("the direct weight sync needs the engine's tensors (engine_tensors)")
        self.source, self.plan, self.engine_tensors = source, plan, engine_tensors
        layout, acc = source.layout, source.acc
        host = node_identity()
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (layout, host, engine_tensors))
        replica = [entry for entry in everyone if entry[0].dp_rank == layout.dp_rank]  # this training replica
        replica_on_one_node = all(entry[1] == host for entry in replica)
        self.transport = choose_transport(plan.transport, acc.kind, replica_on_one_node,
                                          layout.tp_size * layout.pp_size)
        self.exchange, self.local_only = None, frozenset()
        if self.transport == "collective" and plan.direct and layout.tp_size > 1:
            params = source.parameter_plan()
            self.local_only = own_piece_suffices(params, layout.tp_size,
                                                 [(peer.tp_rank, peer.engine_rank, t) for peer, _, t in replica],
                                                 source.to_engine, layout.engine_size)
            logger.info("weight sync: %d of %d tensor-parallel parameters need no gather (each rank's own piece "
                        "holds its engine share)", len(self.local_only), sum(split for *_, split in params))
        if self.transport == "shm":
            job_id = [uuid.uuid4().hex[:12]]
            dist.broadcast_object_list(job_id, src=0)
            self.exchange = ShmExchange(source.shards(), layout, job_id[0], acc)

    @property
    def format(self) -> str:
        return self.plan.format

    def pieces(self) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """(Megatron name, TP pieces) of every parameter of the model, on every rank."""
        if self.exchange is None:
            return self.source.gathered_pieces(self.local_only)
        return self.exchange.pieces()

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF tensors of the whole model, for a consumer that is done with each before taking the next."""
        yield from self._hf_weights()
        if self.exchange is not None:
            self.exchange.release()

    def _hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, pieces in self.pieces():
            yield from self.source.to_hf(name, pieces)

    def update(self, target) -> SyncStats:
        """Load the trainer's weights into the engine through `target` (the memory manager, or the engine
        itself): `write_weights(writes)` per bucket (direct) or `load_weights(named_tensors)` (reload)."""
        if self.plan.direct:
            stats = self._update_direct(target.write_weights)
        else:
            stats = sync_weights(self._hf_weights(), target.load_weights, self.plan.buffer_size_bytes)
        if self.exchange is not None:
            self.exchange.release()
        return stats

    def _update_direct(self, write: Callable[[list[Write]], dict[str, int]]) -> SyncStats:
        layout = self.source.layout
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
            writes = self.source.to_engine(name, pieces, layout.engine_rank, layout.engine_size, self.engine_tensors)
            bucket += writes
            bucket_bytes += sum(w.num_bytes for w in writes)
            if bucket_bytes >= self.plan.buffer_size_bytes:
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
