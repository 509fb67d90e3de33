"""Build the parts of a colocated RL run, run its steps, and close it in the one safe order."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from . import checkpoint
from .build import build_colocated
from .config import Config, dump, validate
from .data import PromptDataset
from .device import init_distributed, select_accelerator
from .evaluation import EvalSet, Evaluator, load_eval_sets
from .metrics import StepTimer
from .observe import RunLog
from .parallel import Layout
from .step import RLStep

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


def prepare(cfg: Config) -> tuple[PromptDataset, list[EvalSet]]:
    """Everything that can reject the user's input, before any expensive work: the training prompts and the eval
    sets. Raises ValueError."""
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    check_inputs(cfg)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_checkpoint)
    dataset = PromptDataset(cfg.data.prompt_data, tokenizer, input_key=cfg.data.input_key,
                            label_key=cfg.data.label_key, metadata_key=cfg.data.metadata_key,
                            apply_chat_template=cfg.data.apply_chat_template,
                            max_prompt_len=cfg.rollout.rollout_max_prompt_len, seed=cfg.train.seed,
                            skip_bad_records=cfg.data.skip_bad_records)
    return dataset, load_eval_sets(cfg, tokenizer)


def train(cfg: Config, dataset: PromptDataset, eval_sets: list[EvalSet] = ()) -> list[dict]:
    """Run `--num-rollout` steps, evaluating on `eval_sets` between them; returns the per-step records (also written
    to metrics.jsonl, with the evals' records)."""
    acc = select_accelerator(cfg.parallel.device)
    init_distributed(acc)
    torch.manual_seed(cfg.train.seed)
    layout = Layout.of_world(cfg.parallel)
    log = RunLog(cfg, enabled=layout.rank == 0)  # before the heavy parts: a dashboard that cannot start stops here
    if layout.rank == 0:
        dump(cfg, Path(cfg.log.log_dir) / "config.json")

    parts = build_colocated(cfg, acc, layout, dataset)
    actor, start_step = parts.actor, parts.start_step
    step = RLStep(cfg, layout, dataset, actor, parts.engine, parts.memory, parts.sync, lambda: StepTimer(acc))
    evaluator = Evaluator(cfg, layout, parts.engine, list(eval_sets)) if eval_sets else None
    records = []
    try:
        if start_step:
            logger.info("resumed from %s at step %d", cfg.checkpoint.load, start_step)
        if start_step or cfg.rollout.vllm_load_format == "dummy":
            # The engine holds the initial (or, with dummy, no) weights: give it the trainer's before any rollout.
            step.prime_engine()
        if evaluator and start_step == 0:
            log.eval(*evaluator.run(0))
        c = cfg.checkpoint
        for i in range(start_step + 1, cfg.train.num_rollout + 1):
            record = step.run(i)
            log.step(record, step.last_batch)
            records.append(record)
            if evaluator and evaluator.due(i):
                log.eval(*evaluator.run(i))
            if c.save and (i == cfg.train.num_rollout or (c.save_interval and i % c.save_interval == 0)):
                checkpoint.save(c.save, i, actor, dataset, layout)
    finally:
        log.close()
        parts.close()  # Megatron's groups, then the engine (its cleanup destroys the default group), then the rest
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return records
