"""Build the parts of a colocated RL run, run its steps, and close it in the one safe order."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from . import checkpoint
from .config import Config, dump, validate
from .data import PromptDataset
from .device import init_distributed, select_accelerator
from .memory import MemoryManager
from .metrics import MetricsLog, StepTimer
from .parallel import Layout
from .step import RLStep
from .sync import WeightSync, choose_format

logger = logging.getLogger(__name__)


def check_inputs(cfg: Config) -> None:
    """File checks that must fail before any work (model building, engine start)."""
    ckpt = Path(cfg.model.hf_checkpoint)
    if not ckpt.is_dir():
        raise ValueError(f"--hf-checkpoint {ckpt}: no such directory; give an HF model folder "
                         f"(make one with: python -m vime_spmd.tools.make_tiny_model {ckpt})")
    if not (ckpt / "config.json").is_file():
        raise ValueError(f"--hf-checkpoint {ckpt}: no config.json inside; is it an HF model folder?")
    if cfg.model.ref_load and not Path(cfg.model.ref_load).is_dir():
        raise ValueError(f"--ref-load {cfg.model.ref_load}: no such directory")
    if cfg.model.ref_load:
        checkpoint.model_checkpoint(cfg.model.ref_load, "--ref-load")
    if cfg.checkpoint.load:
        checkpoint.check_loadable(cfg.checkpoint.load)


def prepare(cfg: Config) -> PromptDataset:
    """Everything that can reject the user's input, before any expensive work. Raises ValueError."""
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    check_inputs(cfg)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_checkpoint)
    return PromptDataset(cfg.data.prompt_data, tokenizer, input_key=cfg.data.input_key,
                         label_key=cfg.data.label_key, metadata_key=cfg.data.metadata_key,
                         apply_chat_template=cfg.data.apply_chat_template,
                         max_prompt_len=cfg.rollout.rollout_max_prompt_len, seed=cfg.train.seed,
                         skip_bad_records=cfg.data.skip_bad_records)


def train(cfg: Config, dataset: PromptDataset) -> list[dict]:
    """Run `--num-rollout` steps; returns the per-step records (also written to metrics.jsonl)."""
    from transformers import AutoConfig

    acc = select_accelerator(cfg.parallel.device)
    init_distributed(acc)
    torch.manual_seed(cfg.train.seed)
    layout = Layout.of_world(cfg.parallel)
    log = MetricsLog(cfg.log.log_dir, enabled=layout.rank == 0)
    if layout.rank == 0:
        dump(cfg, Path(cfg.log.log_dir) / "config.json")

    from .rollout.engine import RolloutEngine
    from .train.megatron import MegatronActor

    memory = MemoryManager(acc, margin_bytes=cfg.train.train_memory_margin_bytes,
                           engine_sleep_mode=cfg.rollout.vllm_enable_sleep_mode)
    actor = MegatronActor(cfg, acc, AutoConfig.from_pretrained(cfg.model.hf_checkpoint), memory=memory)
    start_step = checkpoint.load(cfg.checkpoint.load, actor, dataset, layout) if cfg.checkpoint.load else 0
    # The trainer pauses before the engine starts, so that vLLM sizes its KV cache against what is then free.
    p = cfg.parallel
    sync_format = choose_format(p.weight_sync_format, acc.kind)
    engine = memory.start_engine(lambda: RolloutEngine(cfg, acc, layout, direct_sync=sync_format == "direct"),
                                 cfg.rollout.vllm_gpu_memory_utilization)
    sync = WeightSync(actor, acc.kind, p.weight_sync_transport, p.update_weight_buffer_size, sync_format,
                      engine.tensors() if sync_format == "direct" else None, layout.engine_rank, layout.engine_size)
    logger.info("weight sync: %s format, %s transport, buckets of %d MiB", sync.format, sync.transport,
                p.update_weight_buffer_size >> 20)
    step = RLStep(cfg, layout, dataset, actor, engine, memory, sync, lambda: StepTimer(acc))
    records = []
    try:
        if start_step:
            logger.info("resumed from %s at step %d", cfg.checkpoint.load, start_step)
        if start_step or cfg.rollout.vllm_load_format == "dummy":
            # The engine holds the initial (or, with dummy, no) weights: give it the trainer's before any rollout.
            step.prime_engine()
        c = cfg.checkpoint
        for i in range(start_step + 1, cfg.train.num_rollout + 1):
            record = step.run(i)
            log.write(record)
            records.append(record)
            if any(saves_due(cfg, i)):
                # On accelerators the trainer's memory is paused after a step: it wakes (the engine sleeping) to be
                # read, and the engine gets its weights back afterwards, as after a resume.
                step.prime_engine(while_trainer_awake=lambda: save(cfg, i, actor, dataset, layout))
    finally:
        # Megatron's groups first, then the engine (its cleanup destroys the default group), then the rest.
        sync.close()
        actor.close()
        engine.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return records


def saves_due(cfg: Config, step: int) -> tuple[bool, bool]:
    """Whether a checkpoint (--save) and an HF folder (--save-hf) are due after `step`: every --save-interval
    (--save-hf-interval) steps, and after the last."""
    c = cfg.checkpoint

    def due(folder: str | None, interval: int | None) -> bool:
        return folder is not None and (step == cfg.train.num_rollout or bool(interval and step % interval == 0))

    return due(c.save, c.save_interval), due(c.save_hf, c.save_hf_interval)


def save(cfg: Config, step: int, actor, dataset: PromptDataset, layout: Layout) -> None:
    """The checkpoint and the HF folder due after `step`; every rank calls this."""
    c = cfg.checkpoint
    checkpoint_due, hf_due = saves_due(cfg, step)
    if checkpoint_due:
        start = time.perf_counter()
        folder = checkpoint.save(c.save, step, actor, dataset, layout, with_optimizer=c.save_optim,
                                 keep_last=c.keep_last_n_checkpoints)
        logger.info("checkpoint of step %d: %s (%.1f s)", step, folder, time.perf_counter() - start)
    if hf_due:
        start = time.perf_counter()
        folder = checkpoint.hf_folder(c.save_hf, step)
        checkpoint.save_hf(folder, actor.hf_weights(), cfg.model.hf_checkpoint, step, layout.rank)
        logger.info("HF model of step %d: %s (%.1f s)", step, folder, time.perf_counter() - start)
