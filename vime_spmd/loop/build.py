"""The parts of a colocated run, built in the one safe order and closed in the one safe order.

    memory manager -> actor (policy, reference, optimizer) -> its export -> [resume from --load]
        -> trainer pauses, engine starts (sized against the memory then free) -> weight sync

The trainer, the weight-sync benchmark and the integration scripts all build through `build_colocated`, so that
they run what a real run builds. The sync format is resolved once (`SyncPlan`): the engine is started for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import Config
from ..parallel import Layout
from ..rollout.sampling import max_response_len, rollout_seed, training_sampling
from ..runtime.device import Accelerator
from ..runtime.memory import MemoryManager
from ..sync.weight_sync import SyncPlan, WeightSync
from ..train.spec import ActorSpec
from . import checkpoint

if TYPE_CHECKING:  # megatron and vllm are imported only when building
    from ..rollout.engine import RolloutEngine
    from ..train.megatron import MegatronActor, MegatronExport

logger = logging.getLogger(__name__)


@dataclass
class Colocated:
    memory: MemoryManager
    actor: MegatronActor
    export: MegatronExport
    engine: RolloutEngine | None  # None when replaying recorded rollouts (--load-debug-rollout-data)
    sync: WeightSync | None
    start_step: int = 0  # the step resumed from (--load), else 0

    def close(self) -> None:
        """Megatron's groups first, then the engine (its cleanup destroys torch.distributed's default group)."""
        if self.sync is not None:
            self.sync.close()
        self.actor.close()
        if self.engine is not None:
            self.engine.close()


def build_colocated(cfg: Config, acc: Accelerator, layout: Layout, dataset=None) -> Colocated:
    """Every rank calls this after joining the world. With `--load`, the actor's state and `dataset`'s position are
    restored from the checkpoint before the engine starts."""
    from transformers import AutoConfig

    from ..rollout.engine import RolloutEngine
    from ..train.megatron import load_actor

    MegatronActor = load_actor(acc)  # noqa: N806 (a class: the platform's megatron patches come first)
    from ..train.megatron import MegatronExport

    memory = MemoryManager(acc, margin_bytes=cfg.train.train_memory_margin_bytes,
                           engine_sleep_mode=cfg.rollout.vllm_enable_sleep_mode)
    actor = MegatronActor(ActorSpec.of(cfg), acc, layout, AutoConfig.from_pretrained(cfg.model.hf_checkpoint),
                          memory=memory)
    export = MegatronExport.of(actor)
    start_step = 0
    if cfg.checkpoint.load:
        assert dataset is not None, "resuming restores the data position: pass the dataset"
        start_step = checkpoint.load(cfg.checkpoint.load, actor, dataset, layout)
    if cfg.rollout.load_debug_rollout_data:
        logger.info("replaying the rollouts of %s: no engine", cfg.rollout.load_debug_rollout_data)
        return Colocated(memory, actor, export, None, None, start_step)
    plan = SyncPlan.from_flags(cfg.parallel, acc.kind)
    # The trainer pauses before the engine starts, so that vLLM sizes its KV cache against what is then free.
    engine = memory.start_engine(
        lambda: RolloutEngine(cfg.rollout, cfg.model.hf_checkpoint, rollout_seed(cfg), acc, layout,
                              training_sampling(cfg), max_response_len(cfg), direct_sync=plan.direct,
                              verbose=cfg.log.verbose),
        cfg.rollout.vllm_gpu_memory_utilization)
    sync = WeightSync(export, plan, engine.tensors() if plan.direct else None)
    logger.info("weight sync: %s format, %s transport, buckets of %d MiB", sync.format, sync.transport,
                plan.buffer_size_bytes >> 20)
    return Colocated(memory, actor, export, engine, sync, start_step)
