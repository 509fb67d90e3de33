"""Bucketing of the weight stream: order kept, size bounded, one engine call per bucket."""

from __future__ import annotations

import pytest
import torch

from vime_spmd.sync.weight_sync import buckets, sync_weights


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
        for name, t in named(5, 5, 5, 5, 5):
            produced.append(name)
            yield name, t

    seen_when_loading = []
    sync_weights(stream(), lambda bucket: seen_when_loading.append(len(produced)), buffer_size_bytes=20)
    # Each bucket holds one 20-byte tensor. A bucket is closed when the unit after the next one starts (a unit
    # is only complete when the following one begins), so bucket k is loaded once tensor k+2 was produced:
    # the stream runs at most two tensors ahead of the engine, never a whole model.
    assert seen_when_loading == [3, 4, 5, 5, 5]


def test_non_positive_buffer_is_refused():
    with pytest.raises(ValueError, match="--update-weight-buffer-size"):
        list(buckets(named(1), 0))


@pytest.mark.parametrize("requested,device,one_node,expected", [
    ("auto", "cpu", True, "shm"),           # a replica of 2 ranks (the default replica_size)
    ("auto", "cpu", False, "collective"),   # a replica across nodes: only process groups reach it
    ("auto", "cuda", True, "collective"),   # CUDA IPC arenas: not yet run on a GPU, so only when forced
    ("auto", "npu", True, "collective"),    # NPU IPC arenas (torch_npu's reduce_tensor): likewise
    ("collective", "cpu", True, "collective"),
    ("shm", "cpu", True, "shm"),
    ("shm", "cuda", True, "shm"),
    ("shm", "npu", True, "shm"),
])
def test_transport_choice(requested, device, one_node, expected):
    from vime_spmd.sync.weight_sync import choose_transport

    assert choose_transport(requested, device, one_node) == expected


def test_auto_moves_nothing_when_each_rank_is_a_whole_replica():
    from vime_spmd.sync.weight_sync import choose_transport

    # Training TP 1 and PP 1: every rank already holds every parameter; publishing them to shared memory would
    # only add a copy (benchmark, TP1 into engines of TP2: 0.110 s with shm, 0.040 s without).
    assert choose_transport("auto", "cpu", True, replica_size=1) == "collective"
    assert choose_transport("shm", "cpu", True, replica_size=1) == "shm"  # forcing still forces


@pytest.mark.parametrize("device,one_node,why", [("cpu", False, "spans nodes"), ("npu", False, "spans nodes")])
def test_forcing_shm_where_it_cannot_work_names_the_flag_and_reason(device, one_node, why):
    from vime_spmd.sync.weight_sync import choose_transport

    with pytest.raises(ValueError, match=f"--weight-sync-transport shm .*{why}"):
        choose_transport("shm", device, one_node)


def test_buckets_never_split_a_decoder_layer():
    from vime_spmd.sync.weight_sync import engine_unit

    stream = [("model.embed_tokens.weight", torch.zeros(10)),
              ("model.layers.0.self_attn.q_proj.weight", torch.zeros(4)),
              ("model.layers.0.self_attn.k_proj.weight", torch.zeros(4)),
              ("model.layers.0.self_attn.q_proj.bias", torch.zeros(4)),
              ("model.layers.1.mlp.gate_proj.weight", torch.zeros(6)),
              ("model.layers.1.mlp.up_proj.weight", torch.zeros(6)),
              ("model.norm.weight", torch.zeros(2))]
    # 40-byte buffer (10 floats): embed (10) | layer 0 (12, over the buffer: alone) | layer 1 (12) | norm (2)
    groups = list(buckets(stream, 40, unit=engine_unit))
    assert [[n.split(".")[-2] for n, _ in g] for g in groups] == [
        ["embed_tokens"], ["q_proj", "k_proj", "q_proj"], ["gate_proj", "up_proj"], ["norm"]]
    assert engine_unit("model.layers.12.mlp.down_proj.weight") == "model.layers.12"


@pytest.mark.parametrize("requested,device,expected", [
    ("auto", "cpu", "direct"),
    ("auto", "cuda", "direct"),
    ("auto", "npu", "reload"),  # vllm-ascend may convert weights after loading: only its loader writes them
    ("direct", "npu", "direct"),
    ("reload", "cpu", "reload"),
])
def test_format_choice(requested, device, expected):
    from vime_spmd.sync.weight_sync import choose_format

    assert choose_format(requested, device) == expected


def test_unknown_format_names_the_flag_and_the_choices():
    from vime_spmd.sync.weight_sync import choose_format

    with pytest.raises(ValueError, match="--weight-sync-format 'fast': choose one of auto, direct, reload"):
        choose_format("fast", "cpu")


def test_sync_plan_resolves_the_format_once_from_the_flags():
    from vime_spmd.config import parse_config
    from vime_spmd.sync.weight_sync import SyncPlan

    cfg = parse_config(["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--weight-sync-transport", "shm",
                        "--update-weight-buffer-size", "4096"])
    # auto: direct on CPU and CUDA, reload on Ascend; the transport stays as asked until every rank's host is known
    assert SyncPlan.from_flags(cfg.parallel, "cpu") == SyncPlan("direct", "shm", 4096)
    assert SyncPlan.from_flags(cfg.parallel, "npu") == SyncPlan("reload", "shm", 4096)
    assert SyncPlan.from_flags(cfg.parallel, "cuda").direct
