"""A colocated run: its parts built in the one safe order, its steps, evaluations and saves, and its close."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..config import Config, dump
from ..config.checks import load_tokenizer
from ..data.prompts import PromptDataset
from ..parallel import Layout
from ..rollout.generate import RolloutGenerator, Scorer
from ..rollout.sampling import rollout_seed
from ..rollout.turns import CustomGenerator, load_generate_function
from ..runtime.device import init_distributed, select_accelerator
from ..runtime.signals import StopRequests
from ..runtime.watchdog import Watchdog
from . import checkpoint
from .build import build_colocated
from .evaluation import EvalSet, Evaluator
from .metrics import StepTimer
from .observe import RunLog
from .step import RLStep, SFTStep, Step

logger = logging.getLogger(__name__)


def train(cfg: Config, dataset: PromptDataset, eval_sets: list[EvalSet] = ()) -> list[dict]:
    """Run `--num-rollout` steps, evaluating on `eval_sets` between them; returns the per-step records (also written
    to metrics.jsonl, with the evals' records)."""
    return Trainer(cfg, dataset, eval_sets).run()


class Trainer:
    """Owns a run's parts: the accelerator and layout, the stop and hang guards, the log, the built parts (memory,
    actor, export, engine, sync: `build.Colocated`), the step and the evaluator."""

    def __init__(self, cfg: Config, dataset: PromptDataset, eval_sets: list[EvalSet] = ()) -> None:
        self.cfg, self.dataset = cfg, dataset
        self.acc = select_accelerator(cfg.parallel.device)
        init_distributed(self.acc)
        torch.manual_seed(cfg.train.seed)
        self.layout = Layout.of_world(cfg.parallel)
        self.stop, self.watchdog = start_guards(cfg, self.layout)
        self.log = RunLog(cfg, enabled=self.layout.rank == 0)  # before the heavy parts: a bad dashboard stops here
        if self.layout.rank == 0:
            dump(cfg, Path(cfg.log.log_dir) / "config.json")
        self.parts = build_colocated(cfg, self.acc, self.layout, dataset)
        generator = self.build_generator()
        self.step = self.build_step(generator)
        self.evaluator = Evaluator(cfg, generator, list(eval_sets)) if eval_sets else None
        self.start_step = self.last_saved = self.parts.start_step

    def build_generator(self) -> RolloutGenerator:
        """The plain one-call rollout, or with --custom-generate-function-path / --max-turns the multi-turn one."""
        cfg, engine = self.cfg, self.parts.engine
        tokenizer = load_tokenizer(cfg.model.hf_checkpoint)
        scorer, seed = Scorer.of(cfg.data, tokenizer), rollout_seed(cfg)
        fn = load_generate_function(cfg.rollout)
        if fn is None:
            return RolloutGenerator(engine, self.layout, scorer, seed)
        name = cfg.rollout.custom_generate_function_path or "the tool loop (--max-turns)"
        return CustomGenerator(engine, self.layout, scorer, seed, fn, tokenizer, self.acc.torch_device, name=name)

    def build_step(self, generator: RolloutGenerator) -> Step:
        p = self.parts
        args = (self.cfg, self.layout, self.dataset, p.actor, p.memory, p.sync,
                lambda: StepTimer(self.acc, on_phase=self.watchdog.enter_phase))
        if self.cfg.sft:
            return SFTStep(*args, tokenizer=load_tokenizer(self.cfg.model.hf_checkpoint))
        return RLStep(*args, generator=generator)

    def run(self) -> list[dict]:
        try:
            self.start()
            return self.run_steps()
        finally:
            self.close()

    def start(self) -> None:
        """Before the first step: the engine gets the trainer's weights when it does not hold them, and a run that
        does not resume evaluates the initial model."""
        if self.start_step:
            logger.info("resumed from %s at step %d", self.cfg.checkpoint.load, self.start_step)
        if self.start_step or self.cfg.rollout.vllm_load_format == "dummy":
            # The engine holds the initial (or, with dummy, no) weights: give it the trainer's before any rollout.
            self.watchdog.enter_phase("priming the engine")
            self.step.prime_engine()
        if self.evaluator and self.start_step == 0:
            self.watchdog.enter_phase("evaluation", 0)
            self.log.eval(*self.evaluator.run(0))

    def run_steps(self) -> list[dict]:
        """The steps after the start, with evaluations when due and saves every `--save-interval`
        (`--save-hf-interval`) and after the last step; a stop signal ends the run after the step during which it
        came (ranks agree on it before each step, so they all stop after the same one), saved."""
        records = []
        for i in range(self.start_step + 1, self.cfg.train.num_rollout + 1):
            if self.stop.agree(self.acc.torch_device):
                self.stop_early(records[-1]["step"] if records else self.start_step, bool(records))
                break
            self.watchdog.enter_phase("step start", i)
            record = self.step.run(i)
            self.log.step(record, self.step.last_batch)
            records.append(record)
            if self.evaluator and self.evaluator.due(i):
                self.watchdog.enter_phase("evaluation", i)
                self.log.eval(*self.evaluator.run(i))
            checkpoint_due, hf_due = saves_due(self.cfg, i)
            if checkpoint_due or hf_due:
                self.save(i, checkpoint_due, hf_due)
        return records

    def stop_early(self, done: int, any_step_ran: bool) -> None:
        """On a stop signal after step `done`: save it (if not yet saved) and say where it is."""
        c = self.cfg.checkpoint
        if c.save and done != self.last_saved:
            self.save(done, checkpoint_due=True, hf_due=False)
        if self.layout.rank != 0:
            return
        if not any_step_ran:
            saved = "no step ran, nothing new to save"
        elif c.save:
            saved = f"the checkpoint of step {done} is in {checkpoint.iteration_dir(c.save, done)}; resume with " \
                    f"--load {c.save}"
        else:
            saved = "nothing saved (no --save)"
        logger.warning("stopped on a stop signal after step %d of %d: %s", done, self.cfg.train.num_rollout, saved)

    def save(self, step: int, checkpoint_due: bool, hf_due: bool) -> None:
        """The checkpoint and the HF folder of `step`; every rank calls this. On accelerators the trainer's memory
        is paused after a step: it wakes (the engine sleeping) to be read, and the engine gets its weights back
        afterwards, as after a resume."""
        c, parts = self.cfg.checkpoint, self.parts
        self.watchdog.enter_phase("checkpoint save")

        def write() -> None:
            if checkpoint_due:
                start = time.perf_counter()
                folder = checkpoint.save(c.save, step, parts.actor, self.dataset, self.layout,
                                         with_optimizer=c.save_optim, keep_last=c.keep_last_n_checkpoints)
                logger.info("checkpoint of step %d: %s (%.1f s)", step, folder, time.perf_counter() - start)
            if hf_due:
                start = time.perf_counter()
                folder = checkpoint.hf_folder(c.save_hf, step)
                checkpoint.save_hf(folder, parts.export.hf_weights(), self.cfg.model.hf_checkpoint, step,
                                   self.layout.rank)
                logger.info("HF model of step %d: %s (%.1f s)", step, folder, time.perf_counter() - start)

        self.step.prime_engine(while_trainer_awake=write)
        if checkpoint_due:
            self.last_saved = step

    def close(self) -> None:
        """The one safe order: Megatron's groups, then the engine (its cleanup destroys the default group), then
        what remains of the world, then the guards."""
        self.watchdog.enter_phase("closing")
        self.log.close()
        self.parts.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.watchdog.close()
        self.stop.uninstall()


def start_guards(cfg: Config, layout: Layout) -> tuple[StopRequests, Watchdog]:
    """From here on SIGTERM/SIGUSR1 stop at a step boundary (before, they end the process: nothing to save), and
    a stalled peer ends the job."""
    stop = StopRequests(layout.rank)
    stop.install()
    r = cfg.resilience
    watchdog = Watchdog(layout.rank, layout.world_size, r.hang_timeout_s, r.phase_timeout_s)
    watchdog.start()
    return stop, watchdog


def saves_due(cfg: Config, step: int) -> tuple[bool, bool]:
    """Whether a checkpoint (--save) and an HF folder (--save-hf) are due after `step`: every --save-interval
    (--save-hf-interval) steps, and after the last."""
    c = cfg.checkpoint

    def due(folder: str | None, interval: int | None) -> bool:
        return folder is not None and (step == cfg.train.num_rollout or bool(interval and step % interval == 0))

    return due(c.save, c.save_interval), due(c.save_hf, c.save_hf_interval)
