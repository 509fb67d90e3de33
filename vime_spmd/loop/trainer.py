"""Build the parts of a colocated RL run, run its steps, and close it in the one safe order."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..config import Config, dump
from ..data.prompts import PromptDataset
from ..parallel import Layout
from ..runtime.device import init_distributed, select_accelerator
from ..runtime.signals import StopRequests
from ..runtime.watchdog import Watchdog
from . import checkpoint
from .build import build_colocated
from .evaluation import EvalSet, Evaluator
from .metrics import StepTimer
from .observe import RunLog
from .step import RLStep, SFTStep

logger = logging.getLogger(__name__)


def train(cfg: Config, dataset: PromptDataset, eval_sets: list[EvalSet] = ()) -> list[dict]:
    """Run `--num-rollout` steps, evaluating on `eval_sets` between them; returns the per-step records (also written
    to metrics.jsonl, with the evals' records)."""
    acc = select_accelerator(cfg.parallel.device)
    init_distributed(acc)
    torch.manual_seed(cfg.train.seed)
    layout = Layout.of_world(cfg.parallel)
    stop, watchdog = start_guards(cfg, layout)
    log = RunLog(cfg, enabled=layout.rank == 0)  # before the heavy parts: a dashboard that cannot start stops here
    if layout.rank == 0:
        dump(cfg, Path(cfg.log.log_dir) / "config.json")

    parts = build_colocated(cfg, acc, layout, dataset)
    actor, start_step = parts.actor, parts.start_step
    step = (SFTStep if cfg.sft else RLStep)(cfg, layout, dataset, actor, parts.engine, parts.memory, parts.sync,
                                            lambda: StepTimer(acc, on_phase=watchdog.enter_phase))
    evaluator = Evaluator(cfg, layout, parts.engine, list(eval_sets)) if eval_sets else None
    records = []
    try:
        if start_step:
            logger.info("resumed from %s at step %d", cfg.checkpoint.load, start_step)
        if start_step or cfg.rollout.vllm_load_format == "dummy":
            # The engine holds the initial (or, with dummy, no) weights: give it the trainer's before any rollout.
            watchdog.enter_phase("priming the engine")
            step.prime_engine()
        if evaluator and start_step == 0:
            watchdog.enter_phase("evaluation", 0)
            log.eval(*evaluator.run(0))
        records = run_steps(cfg, step, parts, dataset, layout, log, evaluator, start_step, stop, watchdog,
                            acc.torch_device)
    finally:
        watchdog.enter_phase("closing")
        log.close()
        parts.close()  # Megatron's groups, then the engine (its cleanup destroys the default group), then the rest
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


def run_steps(cfg: Config, step: RLStep, parts, dataset: PromptDataset, layout: Layout, log: RunLog,
              evaluator: Evaluator | None, start_step: int, stop: StopRequests, watchdog: Watchdog,
              device: torch.device) -> list[dict]:
    """The steps after `start_step`, with evaluations when due, saves every `--save-interval` (`--save-hf-interval`),
    after the last step, and after the step during which a stop signal came (ranks agree on it before each step, so
    they all stop after the same one)."""
    c, num_steps = cfg.checkpoint, cfg.train.num_rollout
    records, last_saved, stopped = [], start_step, False
    for i in range(start_step + 1, num_steps + 1):
        if stop.agree(device):
            stopped = True
            break
        watchdog.enter_phase("step start", i)
        record = step.run(i)
        log.step(record, step.last_batch)
        records.append(record)
        if evaluator and evaluator.due(i):
            watchdog.enter_phase("evaluation", i)
            log.eval(*evaluator.run(i))
        checkpoint_due, hf_due = saves_due(cfg, i)
        if checkpoint_due or hf_due:
            watchdog.enter_phase("checkpoint save")
            save(cfg, step, parts, dataset, layout, i, checkpoint_due, hf_due)
            last_saved = i if checkpoint_due else last_saved
    if stopped:
        done = records[-1]["step"] if records else start_step
        if c.save and done != last_saved:
            watchdog.enter_phase("checkpoint save")
            save(cfg, step, parts, dataset, layout, done, checkpoint_due=True, hf_due=False)
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


def saves_due(cfg: Config, step: int) -> tuple[bool, bool]:
    """Whether a checkpoint (--save) and an HF folder (--save-hf) are due after `step`: every --save-interval
    (--save-hf-interval) steps, and after the last."""
    c = cfg.checkpoint

    def due(folder: str | None, interval: int | None) -> bool:
        return folder is not None and (step == cfg.train.num_rollout or bool(interval and step % interval == 0))

    return due(c.save, c.save_interval), due(c.save_hf, c.save_hf_interval)


def save(cfg: Config, rl_step: RLStep, parts, dataset: PromptDataset, layout: Layout, step: int,
         checkpoint_due: bool, hf_due: bool) -> None:
    """The checkpoint and the HF folder of `step`; every rank calls this. On accelerators the trainer's memory is
    paused after a step: it wakes (the engine sleeping) to be read, and the engine gets its weights back afterwards,
    as after a resume."""
    c = cfg.checkpoint

    def write() -> None:
        if checkpoint_due:
            start = time.perf_counter()
            folder = checkpoint.save(c.save, step, parts.actor, dataset, layout, with_optimizer=c.save_optim,
                                     keep_last=c.keep_last_n_checkpoints)
            logger.info("checkpoint of step %d: %s (%.1f s)", step, folder, time.perf_counter() - start)
        if hf_due:
            start = time.perf_counter()
            folder = checkpoint.hf_folder(c.save_hf, step)
            checkpoint.save_hf(folder, parts.export.hf_weights(), cfg.model.hf_checkpoint, step, layout.rank)
            logger.info("HF model of step %d: %s (%.1f s)", step, folder, time.perf_counter() - start)

    rl_step.prime_engine(while_trainer_awake=write)
