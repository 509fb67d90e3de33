"""Build the parts of a colocated RL run, run its steps, and close it in the one safe order."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from . import checkpoint, checks
from .config import Config, dump, validate
from .data import PromptDataset
from .device import init_distributed, select_accelerator
from .memory import MemoryManager
from .metrics import MetricsLog, StepTimer
from .parallel import Layout
from .signals import StopRequests
from .step import RLStep
from .sync import WeightSync, choose_format
from .watchdog import Watchdog

logger = logging.getLogger(__name__)


def prepare(cfg: Config) -> PromptDataset:
    """Everything that can reject the user's input, before any expensive work (checks.py). Raises ValueError.
    Every rank runs the same checks; failures.report prints the first rank's error once."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size)
    checks.check_ranges(cfg)
    checks.check_model_dir(cfg.model.hf_checkpoint, "--hf-checkpoint", tokenizer=True)
    if cfg.model.ref_load:
        checks.check_model_dir(cfg.model.ref_load, "--ref-load", tokenizer=False)
    p = cfg.parallel
    if cfg.checkpoint.load:
        checkpoint.check_loadable(cfg.checkpoint.load, checkpoint.layout_values(
            world_size, p.tensor_model_parallel_size, p.pipeline_model_parallel_size))
    checks.check_reward(cfg)
    if cfg.checkpoint.save:
        checks.check_output_dir(cfg.checkpoint.save, "--save")
    if os.environ.get("RANK", "0") == "0":  # only rank 0 writes the logs
        checks.check_output_dir(cfg.log.log_dir, "--log-dir")
    tokenizer = checks.load_tokenizer(cfg.model.hf_checkpoint)
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
    stop, watchdog = start_guards(cfg, layout)
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
    step = RLStep(cfg, layout, dataset, actor, engine, memory, sync,
                  lambda: StepTimer(acc, on_phase=watchdog.enter_phase))
    records = []
    try:
        if start_step:
            logger.info("resumed from %s at step %d", cfg.checkpoint.load, start_step)
        if start_step or cfg.rollout.vllm_load_format == "dummy":
            # The engine holds the initial (or, with dummy, no) weights: give it the trainer's before any rollout.
            watchdog.enter_phase("priming the engine")
            step.prime_engine()
        records = run_steps(cfg, step, actor, dataset, layout, log, start_step, stop, watchdog, acc.torch_device)
    finally:
        watchdog.enter_phase("closing")
        # Megatron's groups first, then the engine (its cleanup destroys the default group), then the rest.
        sync.close()
        actor.close()
        engine.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        watchdog.close()
        stop.uninstall()
    return records


def start_guards(cfg: Config, layout: Layout) -> tuple[StopRequests, Watchdog]:
    """From here on SIGTERM/SIGUSR1 stop at a step boundary (before, they end the process: nothing to save), and
    a stalled peer ends the job."""
    stop = StopRequests(layout.rank)
    stop.install()
    r = cfg.resilience
    watchdog = Watchdog(layout.rank, layout.world_size, r.hang_timeout_s, r.phase_timeout_s)
    watchdog.start()
    return stop, watchdog


def run_steps(cfg: Config, step: RLStep, actor, dataset: PromptDataset, layout: Layout, log: MetricsLog,
              start_step: int, stop: StopRequests, watchdog: Watchdog, device: torch.device) -> list[dict]:
    """The steps after `start_step`, with saves every `--save-interval`, after the last step, and after the step
    during which a stop signal came (ranks agree on it before each step, so they all stop after the same one)."""
    c, num_steps = cfg.checkpoint, cfg.train.num_rollout
    records, last_saved, stopped = [], start_step, False
    for i in range(start_step + 1, num_steps + 1):
        if stop.agree(device):
            stopped = True
            break
        watchdog.enter_phase("step start", i)
        record = step.run(i)
        log.write(record)
        records.append(record)
        if c.save and (i == num_steps or (c.save_interval and i % c.save_interval == 0)):
            watchdog.enter_phase("checkpoint save")
            checkpoint.save(c.save, i, actor, dataset, layout)
            last_saved = i
    if stopped:
        done = records[-1]["step"] if records else start_step
        if c.save and done != last_saved:
            watchdog.enter_phase("checkpoint save")
            checkpoint.save(c.save, done, actor, dataset, layout)
            last_saved = done
        if layout.rank == 0:
            if not records:
                saved = "no step ran, nothing new to save"
            elif c.save:
                saved = f"the checkpoint of step {done} is in {checkpoint.iteration_dir(c.save, done)}; resume with " \
                        f"--load {c.save}"
            else:
                saved = "nothing saved (no --save)"
            logger.warning("stopped on a stop signal after step %d of %d: %s", done, num_steps, saved)
    return records
