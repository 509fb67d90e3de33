"""Build the parts of a colocated RL run, run its steps, and close it in the one safe order."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from . import checkpoint
from .config import Config, dump, validate
from .data import PromptDataset
from .device import init_distributed, select_accelerator
from .memory import MemoryManager
from .metrics import MetricsLog, StepTimer
from .parallel import Layout, pipeline_split
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
    if cfg.checkpoint.load:
        checkpoint.check_loadable(cfg.checkpoint.load)


def prepare(cfg: Config) -> PromptDataset:
    """Everything that can reject the user's input, before any expensive work. Raises ValueError."""
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    check_inputs(cfg)
    from transformers import AutoConfig, AutoTokenizer

    p = cfg.parallel
    num_layers = AutoConfig.from_pretrained(cfg.model.hf_checkpoint).num_hidden_layers
    pipeline_split(num_layers, p.pipeline_model_parallel_size, p.decoder_first_pipeline_num_layers,
                   p.decoder_last_pipeline_num_layers)
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
            if c.save and (i == cfg.train.num_rollout or (c.save_interval and i % c.save_interval == 0)):
                checkpoint.save(c.save, i, actor, dataset, layout)
    finally:
        # Megatron's groups first, then the engine (its cleanup destroys the default group), then the rest.
        sync.close()
        actor.close()
        engine.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return records
