"""The memory time-sharing contract, with fakes of its two owners (torch_memory_saver and the vLLM engine) and of
the device's free-memory reading. No accelerator needed: an `Accelerator(kind="cuda")` only selects the code path."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from vime_spmd.runtime.device import Accelerator
from vime_spmd.runtime.memory import (
    ENGINE_SLEEP_LEVEL,
    FREE_MEMORY_KEYS,
    GIB,
    TRAIN_TAGS,
    MemoryManager,
    OrderError,
    configure_saver,
    preallocate_optimizer_state,
)

# What each owner holds on the fake device, in GiB: the trainer's tags, its activation cache, the engine's parts.
TRAINER = {"params": 8, "ref": 8, "grads": 16, "optimizer": 48}
ACTIVATIONS, ENGINE_WEIGHTS, ENGINE_KV, TOTAL = 20, 8, 60, 140


class FakeDevice:
    """Free memory = total - what is resident. The fakes below map and unmap their parts on it."""

    def __init__(self) -> None:
        self.resident: dict[str, int] = {}
        self.log: list[str]

    def info(self) -> tuple[int, int]:
        return (TOTAL - sum(self.resident.values())) * GIB, TOTAL * GIB

    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        self.resident.pop("activations", None)
        self.log.append("empty_cache")


class FakeSaver:
    memory_margin_bytes = None  # class attributes: the manager probes the type, as with the real properties
    retain_cpu_backup = None

    def __init__(self, device: FakeDevice, log: list[str]) -> None:
        self.device, self.log, self.backups = device, log, {}

    @contextlib.contextmanager
    def region(self, tag: str, enable_cpu_backup: bool):
        self.log.append(f"region:{tag}")
        self.backups[tag] = enable_cpu_backup
        yield
        self.device.resident[tag] = TRAINER[tag]

    def pause(self, tag: str) -> None:
        assert tag in self.device.resident, f"pause of {tag}, not resident"
        self.device.resident.pop(tag)
        self.log.append(f"pause:{tag}")

    def resume(self, tag: str) -> None:
        assert tag not in self.device.resident, f"resume of {tag}, already resident"
        self.device.resident[tag] = TRAINER[tag]
        self.log.append(f"resume:{tag}")


class FakeEngine:
    def __init__(self, device: FakeDevice, log: list[str]) -> None:
        self.device, self.log, self.loaded = device, log, []
        device.resident.update(engine_weights=ENGINE_WEIGHTS, engine_kv=ENGINE_KV)
        log.append("engine:start")

    def sleep(self, level: int) -> None:
        self.device.resident.pop("engine_weights")
        self.device.resident.pop("engine_kv")
        self.log.append(f"engine:sleep({level})")

    def wake_up(self, tags: list[str]) -> None:
        for tag in tags:
            self.device.resident[{"weights": "engine_weights", "kv_cache": "engine_kv"}[tag]] = \
                ENGINE_WEIGHTS if tag == "weights" else ENGINE_KV
        self.log.append(f"engine:wake({','.join(tags)})")

    def load_weights(self, named_tensors) -> None:
        self.loaded += list(named_tensors)
        self.log.append("engine:load")

    def write_weights(self, writes) -> dict[str, int]:
        self.loaded += list(writes)
        self.log.append("engine:write")
        return {w: 1 for w in writes}


def make(kind: str = "cuda", **kw):
    log: list[str] = []
    device = FakeDevice()
    device.log = log
    acc = Accelerator(kind=kind)
    memory = MemoryManager(acc, saver=FakeSaver(device, log), device=device if kind != "cpu" else None, **kw)
    return memory, device, log


def build_trainer(memory: MemoryManager, device: FakeDevice) -> None:
    for tag in TRAIN_TAGS:
        with memory.region(tag):
            pass
    device.resident["activations"] = 1  # construction leaves some cache behind


def started(kind: str = "cuda", **kw):
    memory, device, log = make(kind, **kw)
    build_trainer(memory, device)
    engine = memory.start_engine(lambda: FakeEngine(device, log), gpu_memory_utilization=0.5)
    log.clear()
    return memory, device, log, engine


def run_step(memory: MemoryManager, device: FakeDevice) -> dict:
    memory.engine_sleep()
    memory.train_wake()
    device.resident["activations"] = ACTIVATIONS
    memory.train_sleep()
    memory.engine_wake_weights()
    memory.load_weights(iter([("w", torch.zeros(1))]))
    memory.engine_wake_kv()
    record = memory.metrics()
    memory.reset_readings()
    return record


def trained(kind: str = "cuda", **kw):
    """Started, then through a step up to the trainer's pause: the engine asleep, its weights not yet woken."""
    memory, device, log, engine = started(kind, **kw)
    memory.engine_sleep()
    memory.train_wake()
    memory.train_sleep()
    return memory, device, log, engine


def test_happy_order_drives_both_owners_in_order_and_records_free_memory():
    memory, device, log, engine = started()
    record = run_step(memory, device)
    events = [e for e in log if e != "empty_cache"]
    assert events == [
        f"engine:sleep({ENGINE_SLEEP_LEVEL})",
        "resume:params", "resume:ref", "resume:grads", "resume:optimizer",
        "pause:ref", "pause:grads", "pause:optimizer",      # train_sleep: the weights stay for the sync
        "engine:wake(weights)", "engine:load",
        "pause:params",                                     # then the trainer's weights go, then the KV cache comes
        "engine:wake(kv_cache)",
    ]
    assert [name for name, _ in engine.loaded] == ["w"]
    assert set(record) == set(FREE_MEMORY_KEYS)
    # 140 GiB total. Rollout: engine 8 + 60 resident -> 72 free. Engine asleep -> 140. Trainer back (80) -> 60;
    # training leaves 20 of activations -> 40. Pause ref+grads+optimizer (72) and drop the cache (20) -> 132.
    # Engine weights (8) -> 124; the sync changes nothing -> 124; trainer weights paused (8) -> 132; KV (60) -> 72.
    assert record == {
        "memory/free_before_rollout_gib": 72.0, "memory/free_after_rollout_gib": 72.0,
        "memory/free_after_engine_sleep_gib": 140.0, "memory/free_after_train_wake_gib": 60.0,
        "memory/free_after_train_gib": 40.0, "memory/free_after_train_sleep_gib": 132.0,
        "memory/free_after_engine_wake_weights_gib": 124.0, "memory/free_after_update_weights_gib": 124.0,
        "memory/free_before_engine_wake_kv_gib": 132.0,
    }
    # The next step's reading before rollout is the one taken when the KV cache woke.
    assert run_step(memory, device)["memory/free_before_rollout_gib"] == 72.0


def test_reading_the_metrics_changes_nothing_and_reset_starts_the_next_step():
    memory, device, log, engine = started()
    for transition in (memory.engine_sleep, memory.train_wake, memory.train_sleep, memory.engine_wake_weights):
        transition()
    memory.load_weights(iter([("w", torch.zeros(1))]))
    memory.engine_wake_kv()
    first = memory.metrics()
    assert memory.metrics() == first and len(first) == len(FREE_MEMORY_KEYS)  # read twice: the same
    memory.reset_readings()
    # Only the reading taken as the KV cache woke (72 GiB free) carries over, as the next step's before_rollout.
    assert memory.metrics() == {"memory/free_before_rollout_gib": 72.0}


def test_start_engine_pauses_the_whole_trainer_first():
    memory, device, log = make()
    build_trainer(memory, device)
    memory.start_engine(lambda: FakeEngine(device, log), gpu_memory_utilization=0.5)
    assert log[-6:] == ["pause:params", "pause:ref", "pause:grads", "pause:optimizer", "empty_cache", "engine:start"]
    assert (memory.trainer_state, memory.engine_state) == ("paused", "awake")


def test_engine_woken_before_the_trainer_paused_is_refused():
    memory, device, log, engine = started()
    memory.engine_sleep()
    memory.train_wake()
    with pytest.raises(OrderError, match="call train_sleep first"):
        memory.engine_wake_weights()
    assert not any(e.startswith("engine:wake") for e in log)


def test_weights_loaded_before_the_weights_woke_are_refused():
    memory, device, log, engine = trained()
    with pytest.raises(OrderError, match="call engine_wake_weights first"):
        memory.load_weights([("w", torch.zeros(1))])
    assert engine.loaded == []


def test_direct_writes_follow_the_same_rule_as_loads():
    memory, device, log, engine = trained()
    with pytest.raises(OrderError, match="write_weights: .*call engine_wake_weights first"):
        memory.write_weights(["w"])
    assert engine.loaded == []
    memory.engine_wake_weights()
    assert memory.write_weights(["a", "b"]) == {"a": 1, "b": 1}  # the engine's count of what it wrote comes back
    memory.engine_wake_kv()  # written weights count as loaded
    with pytest.raises(OrderError, match="write_weights"):
        memory.write_weights(["c"])
    assert engine.loaded == ["a", "b"]


def test_kv_cache_woken_before_the_weights_were_loaded_is_refused():
    memory, device, log, engine = trained()
    memory.engine_wake_weights()
    with pytest.raises(OrderError, match="call load_weights"):
        memory.engine_wake_kv()
    assert "engine:wake(kv_cache)" not in log and "pause:params" not in log


def test_trainer_woken_while_the_engine_is_awake_is_refused():
    memory, device, log, engine = started()
    with pytest.raises(OrderError, match="call engine_sleep first"):
        memory.train_wake()
    assert not any(e.startswith("resume") for e in log)


def test_buckets_load_within_one_wake_but_not_after_the_kv_cache_woke():
    memory, device, log, engine = trained()
    memory.engine_wake_weights()
    memory.load_weights([("a", None)])  # the sync hands over one bucket per call
    memory.load_weights([("b", None)])
    memory.engine_wake_kv()
    with pytest.raises(OrderError, match="load_weights"):
        memory.load_weights([("c", None)])


def test_cpu_transitions_are_noops_with_one_info_line_and_keep_the_order(caplog):
    with caplog.at_level(logging.INFO, logger="vime_spmd.runtime.memory"):
        memory, device, log, engine = started(kind="cpu")
        record = run_step(memory, device)
    lines = [r for r in caplog.records if r.name == "vime_spmd.runtime.memory"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "CPU" in lines[0].getMessage()
    assert log == ["engine:load"]          # no pause, resume, sleep or wake reached the owners; the sync did
    assert record == {}                    # no device memory to report
    with pytest.raises(OrderError):        # the order is checked on CPU too
        memory.load_weights([])


def test_regions_use_one_tag_each_and_back_up_only_what_cannot_be_rebuilt():
    memory, device, log = make()
    build_trainer(memory, device)
    assert memory.saver.backups == {"params": True, "ref": True, "grads": False, "optimizer": True}
    with pytest.raises(OrderError, match="do not nest"):
        with memory.region("params"):
            with memory.region("grads"):
                pass
    with pytest.raises(ValueError, match="unknown memory tag"):
        with memory.region("activations"):
            pass


def test_engine_utilization_must_fit_in_what_the_paused_trainer_left():
    memory, device, log = make()
    build_trainer(memory, device)
    device.resident["other_process"] = 100  # 40 of 140 GiB free after the pause
    with pytest.raises(ValueError, match=r"--vllm-gpu-memory-utilization 0.5.*use at most 0.28"):
        memory.start_engine(lambda: FakeEngine(device, log), gpu_memory_utilization=0.5)
    assert "engine:start" not in log


def test_trainer_resume_keeps_the_margin_or_stops_naming_the_flag():
    memory, device, log, engine = started(margin_bytes=10 * GIB)
    device.resident["engine_leftover"] = 55  # after sleep: 140 - 55 = 85 free; the trainer needs 80 + 1 + 10
    memory.engine_sleep()
    with pytest.raises(RuntimeError, match="--train-memory-margin-bytes"):
        memory.train_wake()
    assert not any(e.startswith("resume") for e in log)


def test_sleep_mode_off_leaves_the_engine_alone_but_pauses_the_trainer():
    memory, device, log, engine = started(engine_sleep_mode=False)
    device.resident.pop("engine_kv")  # an engine sized to leave room for training
    run_step(memory, device)
    assert not any(e.startswith("engine:sleep") or e.startswith("engine:wake") for e in log)
    assert "pause:optimizer" in log and "engine:load" in log


def test_saver_gets_the_margin_and_keeps_host_backups_when_it_supports_them(caplog):
    class Full:
        memory_margin_bytes = None
        retain_cpu_backup = None

    class Bare:
        pass

    full = Full()
    configure_saver(full, 123)
    assert (full.memory_margin_bytes, full.retain_cpu_backup) == (123, True)
    with caplog.at_level(logging.INFO, logger="vime_spmd.runtime.memory"):
        configure_saver(Bare(), 123)
    assert len(caplog.records) == 2  # says which of the two it cannot do


class MegatronLikeOptimizer:
    """What preallocate_optimizer_state uses of a Megatron optimizer; init_state_fn as Megatron's for Adam."""

    def __init__(self, inner) -> None:
        self.optimizer, self.config = inner, None

    @staticmethod
    def init_state_fn(opt, config=None) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                if len(opt.state[p]) == 0:
                    opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


def test_preallocated_adam_state_trains_exactly_like_the_lazy_one():
    torch.manual_seed(0)
    start = [torch.randn(4, 3), torch.randn(5)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    results = []
    for preallocate in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        adam = torch.optim.AdamW(params, lr=0.1, betas=(0.9, 0.98), weight_decay=0.01)
        if preallocate:
            preallocate_optimizer_state(MegatronLikeOptimizer(adam))
            assert all(set(adam.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in params)
        for g in grads:
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            adam.step()
        results.append([p.detach().clone() for p in params])
    for lazy, pre in zip(*results):
        assert torch.equal(lazy, pre)


def test_preallocated_sgd_momentum_trains_exactly_like_the_lazy_one():
    torch.manual_seed(0)
    start = torch.randn(4, 3)
    grads = [torch.randn_like(start) for _ in range(3)]
    results = []
    for preallocate in (False, True):
        param = torch.nn.Parameter(start.clone())
        sgd = torch.optim.SGD([param], lr=0.1, momentum=0.9)
        if preallocate:
            optimizer = MegatronLikeOptimizer(sgd)
            optimizer.init_state_fn = None  # as Megatron's SGD
            preallocate_optimizer_state(optimizer)
            assert set(sgd.state[param]) == {"momentum_buffer"}
        for g in grads:
            param.grad = g.clone()
            sgd.step()
        results.append(param.detach().clone())
    assert torch.equal(*results)


def test_optimizer_state_is_allocated_inside_the_optimizer_region_on_accelerators_only():
    params = [torch.nn.Parameter(torch.zeros(2))]
    for kind, expected in (("cpu", 0), ("cuda", 1)):
        adam = torch.optim.AdamW(params)
        memory, device, log = make(kind)
        memory.allocate_optimizer_state(MegatronLikeOptimizer(adam))
        assert log.count("region:optimizer") == expected and len(adam.state) == expected
