"""Time-sharing of device memory between the trainer and the engine, as explicit, checked transitions.

Two owners share each device. The trainer's memory lives in torch_memory_saver regions, one tag per kind
(`TRAIN_TAGS`), so that each can be paused, and backed up to host or not, on its own. The engine's memory (weights
and KV cache) lives in vLLM's sleep-mode pool. The step calls the transitions in this order:

    start_engine          the trainer pauses every tag; the engine starts, sizing its KV cache from what is free
    [rollout]
    engine_sleep          the engine drops its weights and KV cache                 needs: engine awake
    train_wake            the trainer resumes every tag                             needs: engine asleep
    [reference logprobs, training]
    train_sleep           the trainer pauses ref, grads, optimizer; its weights stay for the sync
    engine_wake_weights   the engine maps its weights (contents undefined)          needs: trainer paused
    load_weights          the trainer's weights go into the engine                  needs: engine weights awake
    engine_wake_kv        the trainer pauses its weights; the engine maps its KV    needs: weights loaded

A call out of order raises `OrderError` before touching either owner: the engine is never woken while the
trainer holds its memory, weights are never loaded into sleeping memory (which fails on Ascend), and the engine
never generates with weights that were not loaded.

Engine sleep level 2, not 1: level 1 copies the engine's weights to host at every sleep and back at every wake,
only for the sync to overwrite them; level 2 discards them (vLLM keeps buffers such as rotary caches itself). After
a wake the trainer is the only source of the weights: nothing is reloaded from disk, and stale weights cannot
survive unnoticed, because `engine_wake_kv` is refused until `load_weights` ran. The sync must therefore send every
weight: the reload sync sends full HF tensors of all parameters; the direct sync (`write_weights`, same rule)
checks that it wrote every element of every engine tensor.

Process groups: NCCL and HCCL allocate their communicators' buffers themselves, not through torch's allocator
(the only allocations a region captures: torch's pluggable allocator on CUDA; aclrtMallocAlign32, torch_npu's
allocator, under the Ascend preload hook), so pausing never unmaps them, even for a group first used inside a
region. Regions are kept to allocation anyway: the optimizer state is allocated up front, not in a first step
(`allocate_optimizer_state`). Groups are not destroyed and rebuilt around pauses (slime does, because it pauses
everything): the engine shares the default group and vLLM's own communicators must outlive its sleep. Their
memory stays resident and shows in the memory/free_* readings.

On CPU there is nothing to share: transitions only advance and check the order, said once in the log.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .device import Accelerator, empty_cache, memory_info

logger = logging.getLogger(__name__)

GIB = 1 << 30
ENGINE_SLEEP_LEVEL = 2
HOOK_MODES = {"cuda": "torch", "npu": "preload"}  # cuda: the mode measured on H200; npu: set by launch_env


@dataclass(frozen=True)
class Tag:
    name: str
    cpu_backup: bool
    why: str


# Back up to host only what cannot be rebuilt: a backup costs ~1000x a drop (docs/architecture.md, H200).
TRAIN_TAGS = {t.name: t for t in (
    Tag("params", True, "the policy's weights: the only copy (in bf16 they could be rebuilt from the optimizer's "
                        "fp32 main params; not done yet)"),
    Tag("ref", True, "the reference model's weights: reloading them from disk each step would cost far more"),
    Tag("grads", False, "the gradient buffer is zeroed at the start of every train step: nothing to keep"),
    Tag("optimizer", True, "fp32 main params and Adam moments: the only copy"),
)}
PAUSED_AT_TRAIN_SLEEP = ("ref", "grads", "optimizer")  # the weights stay until the sync has read them

FREE_MEMORY_KEYS = tuple(f"memory/free_{point}_gib" for point in (
    "before_rollout",                # engine awake with its KV cache, trainer paused
    "after_rollout",
    "after_engine_sleep",
    "after_train_wake",
    "after_train",                   # before the trainer pauses: its activation cache included
    "after_train_sleep",             # ref, grads, optimizer paused, activation cache returned; weights resident
    "after_engine_wake_weights",
    "after_update_weights",
    "before_engine_wake_kv",         # the trainer's weights paused too
))


class OrderError(RuntimeError):
    """A memory transition was called out of the order the module docstring states."""


@contextlib.contextmanager
def _untimed(key: str):
    yield


class MemoryManager:
    def __init__(self, acc: Accelerator, *, margin_bytes: int = GIB, engine_sleep_mode: bool = True,
                 saver=None, device=None) -> None:
        """`saver`: torch_memory_saver (loaded on first use on accelerators); `device`: free/total bytes,
        synchronize, empty_cache (the accelerator's by default). Both are injectable for tests."""
        self.acc, self.margin_bytes = acc, margin_bytes
        self.enabled = acc.has_device_memory
        self.engine_sleep_mode = engine_sleep_mode and self.enabled
        self.engine = None
        # trainer: awake | weights_only | paused;  engine: none | awake | asleep | weights | loaded
        self.trainer_state, self.engine_state = "awake", "none"
        self._saver, self._saver_configured = saver, False
        self.device = device or (AcceleratorMemory(acc) if self.enabled else None)
        self._region_tag: str | None = None
        self._paused_bytes = 0
        self._readings: dict[str, float] = {}
        self._next_before_rollout: float | None = None
        if not self.enabled:
            logger.info("device memory time-sharing: off on CPU (sleep/wake transitions are no-ops)")
        elif not self.engine_sleep_mode:
            logger.info("--no-vllm-enable-sleep-mode: the engine keeps its weights and KV cache while training")

    # ---- trainer memory ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def region(self, tag: str):
        """Allocations inside go to the trainer's memory under `tag` (one of TRAIN_TAGS); a no-op on CPU."""
        if tag not in TRAIN_TAGS:
            raise ValueError(f"unknown memory tag {tag!r}; one of {sorted(TRAIN_TAGS)}")
        if self._region_tag is not None:
            raise OrderError(f"region({tag!r}) inside region({self._region_tag!r}): regions do not nest")
        self._region_tag = tag
        try:
            with (self.saver.region(tag=tag, enable_cpu_backup=TRAIN_TAGS[tag].cpu_backup) if self.enabled
                  else contextlib.nullcontext()):
                yield
        finally:
            self._region_tag = None

    def allocate_optimizer_state(self, optimizer) -> None:
        """Adam creates its moments lazily, at the first step(). Create them now, inside the optimizer region:
        a first step() inside the region would also capture its temporaries (a parameter-sized buffer for torch's
        foreach Adam) and any communicator its grad-norm all-reduce sets up. A no-op on CPU."""
        if self.enabled:
            with self.region("optimizer"):
                preallocate_optimizer_state(optimizer)

    @property
    def saver(self):
        if self._saver is None:
            self._saver = load_torch_memory_saver(self.acc.kind)
        if not self._saver_configured:
            configure_saver(self._saver, self.margin_bytes)
            self._saver_configured = True
        return self._saver

    # ---- transitions, in order -----------------------------------------------------------------------------

    def start_engine(self, build: Callable[[], object], gpu_memory_utilization: float):
        """Pause the freshly built trainer, then build the engine, so that vLLM sizes its KV cache against the
        memory free after the pause: it takes `gpu_memory_utilization` x total, which must be free."""
        if self.engine_state != "none":
            raise OrderError("start_engine: the engine is already running")
        self._pause_trainer(tuple(TRAIN_TAGS), "awake", "paused", reading=None)
        if self.enabled:
            free, total = self.device.info()
            wanted = gpu_memory_utilization * total
            if free < wanted:
                raise ValueError(
                    f"--vllm-gpu-memory-utilization {gpu_memory_utilization}: the engine would take "
                    f"{wanted / GIB:.1f} GiB but {free / GIB:.1f} of {total / GIB:.1f} GiB are free after the trainer "
                    f"paused (the rest: other processes, communicators, unpaused buffers); use at most "
                    f"{math.floor(100 * free / total) / 100:.2f}")
        self.engine = build()
        self.engine_state = "awake"
        self._read("before_rollout")
        return self.engine

    def engine_sleep(self) -> None:
        self._require(self.engine_state == "awake", "engine_sleep: the engine is not awake "
                      f"(it is {self.engine_state}); the step wakes it fully (engine_wake_kv) before each rollout")
        self._read("after_rollout")
        if self.engine_sleep_mode:
            self.engine.sleep(level=ENGINE_SLEEP_LEVEL)
        if self.enabled:
            empty_cache_and_sync(self.device)  # the rollout's temporaries, held in torch's cache
        self.engine_state = "asleep"
        self._read("after_engine_sleep")

    def train_wake(self) -> None:
        self._require(self.engine_state == "asleep", "train_wake: the engine still holds its memory "
                      f"(it is {self.engine_state}); call engine_sleep first")
        self._require(self.trainer_state == "paused", f"train_wake: the trainer is {self.trainer_state}, not paused")
        if self.enabled:
            free, _ = self.device.info()
            if free < self._paused_bytes + self.margin_bytes:
                raise RuntimeError(
                    f"train_wake: {free / GIB:.1f} GiB free, but the trainer held {self._paused_bytes / GIB:.1f} GiB "
                    f"before it paused and --train-memory-margin-bytes keeps {self.margin_bytes / GIB:.1f} GiB more "
                    f"free; lower --vllm-gpu-memory-utilization (or the margin)")
            for tag in TRAIN_TAGS:
                self.saver.resume(tag)
        self._paused_bytes = 0
        self.trainer_state = "awake"
        self._read("after_train_wake")

    def train_sleep(self) -> None:
        self._pause_trainer(PAUSED_AT_TRAIN_SLEEP, "awake", "weights_only", reading="after_train")
        self._read("after_train_sleep")

    def engine_wake_weights(self) -> None:
        self._require(self.trainer_state != "awake", "engine_wake_weights: the trainer still holds its training "
                      "memory; call train_sleep first")
        self._require(self.engine_state == "asleep", f"engine_wake_weights: the engine is {self.engine_state}, "
                      "not asleep")
        if self.engine_sleep_mode:
            self.engine.wake_up(tags=["weights"])
        self.engine_state = "weights"
        self._read("after_engine_wake_weights")

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The reload sync's way into the engine: refused unless its weights are awake. The sync calls it once per
        bucket, between `engine_wake_weights` and `engine_wake_kv`."""
        self._into_engine("load_weights", lambda: self.engine.load_weights(named_tensors))

    def write_weights(self, writes: list) -> dict[str, int]:
        """The direct sync's way into the engine (its own shares written in place), under the same rule."""
        return self._into_engine("write_weights", lambda: self.engine.write_weights(writes))

    def _into_engine(self, what: str, load: Callable[[], object]):
        self._require(self.engine_state in ("weights", "loaded"), f"{what}: the engine is "
                      f"{self.engine_state}, its weights not awake; call engine_wake_weights first")
        result = load()
        if self.enabled:
            empty_cache_and_sync(self.device)  # the all-gathered shards of the sync
        self.engine_state = "loaded"
        self._read("after_update_weights")
        return result

    def engine_wake_kv(self) -> None:
        self._require(self.engine_state == "loaded", "engine_wake_kv: the new weights are not loaded "
                      f"(the engine is {self.engine_state}); call load_weights after engine_wake_weights")
        self._pause_trainer(("params",), "weights_only", "paused", reading=None)
        self._read("before_engine_wake_kv")
        if self.engine_sleep_mode:
            self.engine.wake_up(tags=["kv_cache"])
        self.engine_state = "awake"
        if self.enabled:
            self._next_before_rollout = self.device.info()[0] / GIB

    # ---- the two hand-offs a step makes, each the transitions above in order ----------------------------------

    def to_trainer(self, span: Callable = _untimed) -> None:
        """The engine sleeps, then the trainer resumes: after a rollout, before the trainer's phases. `span(key)`
        times each transition (the step's timer). Without an engine (a replay of recorded rollouts) the trainer keeps
        its memory throughout: nothing to hand over."""
        if self.engine is None:
            return
        with span("perf/engine_sleep_time"):
            self.engine_sleep()
        with span("perf/train_wake_time"):
            self.train_wake()

    def to_engine(self, sync, span: Callable = _untimed) -> None:
        """The trainer pauses, the engine wakes its weights, `sync` loads the trainer's into them (`sync.update`),
        and the engine wakes its KV cache: after the trainer's phases, before the next rollout. Without an engine,
        nothing."""
        if self.engine is None:
            return
        with span("perf/sleep_time"):
            self.train_sleep()
        with span("perf/wake_up_time"):
            self.engine_wake_weights()
        with span("perf/update_weights_time"):
            sync.update(self)
        with span("perf/wake_up_time"):
            self.engine_wake_kv()

    # ---- readings ------------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """This step's memory/free_* readings in GiB (nothing on CPU). Reading changes nothing: the step calls
        `reset_readings` once it has recorded them."""
        return {f"memory/free_{k}_gib": v for k, v in self._readings.items()}

    def reset_readings(self) -> None:
        """Start the next step's readings. Only `before_rollout` carries over: it was read when the engine last
        finished waking, and nothing runs between that and the next rollout."""
        nxt = self._next_before_rollout
        self._readings, self._next_before_rollout = ({} if nxt is None else {"before_rollout": nxt}), None

    # ---- helpers -------------------------------------------------------------------------------------------

    def _require(self, ok: bool, message: str) -> None:
        if not ok:
            raise OrderError(message)

    def _pause_trainer(self, tags: tuple[str, ...], from_state: str, to_state: str, reading: str | None) -> None:
        self._require(self.trainer_state == from_state, f"pausing {', '.join(tags)}: the trainer is "
                      f"{self.trainer_state}, expected {from_state}")
        if self.enabled:
            self.device.synchronize()  # nothing may still run on memory about to be unmapped
            free_before, _ = self.device.info()
            if reading:
                self._record(reading, free_before)
            for tag in tags:
                self.saver.pause(tag)
            self.device.empty_cache()  # activations and temporaries: not in any region
            free_after, _ = self.device.info()
            self._paused_bytes += max(free_after - free_before, 0)
        self.trainer_state = to_state

    def _read(self, point: str) -> None:
        if self.enabled:
            self._record(point, self.device.info()[0])

    def _record(self, point: str, free_bytes: int) -> None:
        self._readings[point] = free_bytes / GIB


class AcceleratorMemory:
    """The device side the manager needs, on a real accelerator."""

    def __init__(self, acc: Accelerator) -> None:
        self.acc = acc

    def info(self) -> tuple[int, int]:
        return memory_info(self.acc)

    def synchronize(self) -> None:
        self.acc.synchronize()

    def empty_cache(self) -> None:
        empty_cache(self.acc)


def empty_cache_and_sync(device) -> None:
    device.synchronize()
    device.empty_cache()


def load_torch_memory_saver(kind: str):
    """torch_memory_saver, its hook mode set before first use: TMS_HOOK_MODE if set (Ascend: launch_env sets
    preload), else torch on CUDA (no LD_PRELOAD needed; the mode measured on H200)."""
    from .launch_env import missing_env

    missing = missing_env(kind)
    if missing:
        logger.warning("launch environment for %s lacks %s: start through launch/torchrun.sh or eval "
                       "`python -m vime_spmd.runtime.launch_env --device %s`", kind,
                       ", ".join(f"{v.name}={v.value}" for v in missing), kind)
    try:
        from torch_memory_saver import torch_memory_saver
    except ImportError as e:
        raise RuntimeError("time-sharing device memory needs torch_memory_saver: pip install -e '.[cuda]' on NVIDIA "
                           "GPUs; on Ascend install its NPU build (sgl-kernel-npu, contrib/torch_memory_saver)") from e
    torch_memory_saver.hook_mode = os.environ.get("TMS_HOOK_MODE") or HOOK_MODES[kind]
    return torch_memory_saver


def configure_saver(saver, margin_bytes: int) -> None:
    """Apply what this build of torch_memory_saver supports (the CUDA 0.0.10 wheel has both; the Ascend build
    neither): its OOM guard for allocations in regions, and keeping host backup buffers across pauses instead of
    allocating them at every pause."""
    if hasattr(type(saver), "memory_margin_bytes"):
        saver.memory_margin_bytes = margin_bytes
    else:
        logger.info("torch_memory_saver has no memory_margin_bytes: only the check before resuming applies "
                    "--train-memory-margin-bytes")
    if hasattr(type(saver), "retain_cpu_backup"):
        saver.retain_cpu_backup = True
    else:
        logger.info("torch_memory_saver has no retain_cpu_backup: host backups are allocated at every pause")


def preallocate_optimizer_state(optimizer) -> None:
    """Create the state Adam would create at its first step, now. Megatron's optimizers carry the initialiser
    Megatron itself runs before loading a checkpoint (`init_state_fn`: zeroed exp_avg/exp_avg_sq, or the fused
    optimizers' own); torch's Adam also keeps a per-parameter `step`, created with the moments, as torch does."""
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = opt.optimizer
        if opt.init_state_fn is not None:
            opt.init_state_fn(inner, opt.config)
        if isinstance(inner, torch.optim.SGD):
            preallocate_momentum(inner)
            continue
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            # As torch.optim.Adam._init_group: the step count on the host unless capturable or fused.
            on_device = group.get("capturable") or group.get("fused")
            double = torch.get_default_dtype() == torch.float64 and not group.get("fused")
            for p in group["params"]:
                state = inner.state[p]
                state.setdefault("step", torch.zeros((), dtype=torch.float64 if double else torch.float32,
                                                     device=p.device if on_device else "cpu"))
                if group.get("amsgrad"):
                    state.setdefault("max_exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))


def preallocate_momentum(sgd: torch.optim.SGD, config=None) -> None:
    """SGD's momentum buffer, zeroed: its first step then computes 0 x momentum + grad, the clone of the gradient
    it would have made (dampening 0), bit for bit."""
    for group in sgd.param_groups:
        if group["momentum"] == 0:
            continue
        for p in group["params"]:
            sgd.state[p].setdefault("momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format))
