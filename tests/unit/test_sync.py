"""Bucketing of the weight stream: order kept, size bounded, one engine call per bucket."""

from __future__ import annotations

import pytest
import torch

from vime_spmd.sync import buckets, sync_weights


def named(*numels: int) -> list[tuple[str, torch.Tensor]]:
    return [(f"w{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate(numels)]


def test_buckets_keep_order_and_respect_the_size():
    # fp32: 4 bytes per element. Buffer 40 bytes = 10 elements:
    # 4+4=8 | 8+2=10 | 3+5=8 (adding 20 would pass 10) | 20 alone (over the buffer by itself) | 1
    groups = list(buckets(named(4, 4, 8, 2, 3, 5, 20, 1), buffer_size_bytes=40))
    assert [[t.numel() for _, t in g] for g in groups] == [[4, 4], [8, 2], [3, 5], [20], [1]]
    assert [name for g in groups for name, _ in g] == [f"w{i}" for i in range(8)]


def test_sync_calls_the_engine_once_per_bucket_and_reports_bytes():
    calls = []
    stats = sync_weights(named(4, 4, 8), calls.append, buffer_size_bytes=32)  # [4, 4] | [8]
    assert len(calls) == stats.num_buckets == 2
    assert stats.num_tensors == 3 and stats.num_bytes == 16 * 4 and stats.max_bucket_bytes == 32


def test_streams_lazily_so_only_one_bucket_is_alive():
    produced = []

    def stream():
        for name, t in named(5, 5, 5):
            produced.append(name)
            yield name, t

    seen_when_loading = []
    sync_weights(stream(), lambda bucket: seen_when_loading.append(len(produced)), buffer_size_bytes=20)
    # Each bucket holds one 20-byte tensor; the first is loaded once the second has been produced (the
    # bucket boundary is only known then), never after the whole model was produced.
    assert seen_when_loading == [2, 3, 3]


def test_non_positive_buffer_is_refused():
    with pytest.raises(ValueError, match="--update-weight-buffer-size"):
        list(buckets(named(1), 0))
