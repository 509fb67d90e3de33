"""Weight sync: the trainer's HF-named tensors into the engine, in buckets of bounded size.

Ordering contract: the caller has woken the engine's weights (accelerators) before `sync_weights` and wakes
the KV cache after it. Tensors are streamed from the trainer one parameter at a time (each is gathered over
the training tensor-parallel group as it is produced), grouped into buckets of at most `buffer_size_bytes`
(a single larger tensor forms its own bucket), and each bucket is handed to the engine in one call. The peak
extra memory is one bucket, not one model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

NamedTensors = list[tuple[str, torch.Tensor]]


@dataclass
class SyncStats:
    num_tensors: int = 0
    num_buckets: int = 0
    num_bytes: int = 0
    max_bucket_bytes: int = 0


def buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], buffer_size_bytes: int) -> Iterator[NamedTensors]:
    """Group a stream of tensors, in order, into lists of at most `buffer_size_bytes` (one oversized tensor is
    a bucket of its own)."""
    if buffer_size_bytes <= 0:
        raise ValueError(f"--update-weight-buffer-size {buffer_size_bytes}: must be > 0 bytes")
    bucket: NamedTensors = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > buffer_size_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def sync_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], load_bucket: Callable[[NamedTensors], None],
                 buffer_size_bytes: int) -> SyncStats:
    """Stream `named_tensors` into the engine through `load_bucket`, one call per bucket."""
    stats = SyncStats()
    for bucket in buckets(named_tensors, buffer_size_bytes):
        bucket_bytes = sum(t.numel() * t.element_size() for _, t in bucket)
        load_bucket(bucket)
        stats.num_tensors += len(bucket)
        stats.num_buckets += 1
        stats.num_bytes += bucket_bytes
        stats.max_bucket_bytes = max(stats.max_bucket_bytes, bucket_bytes)
    return stats
