"""Watching a run from rank 0: the console (progress, quiet libraries), TensorBoard, wandb, and sample logs.

`RunLog` fans each step's and each eval's record out to metrics.jsonl, the dashboards the user asked for, and the
progress display. Everything here runs on rank 0 only; the other ranks get a disabled `RunLog`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TextIO

from ..config import OBSERVE_EXTRA, Config
from .metrics import MetricsLog, format_line, is_sft_record

NOISY_LOGGERS = ("megatron", "vllm", "transformers", "torch", "math_verify")
LOGGED_PROMPTS = 2  # prompts (each with all its responses) written per --log-samples-interval


def quiet_libraries(verbose: bool) -> None:
    """Keep the libraries' warnings and per-call INFO lines off the console unless --verbose. Call before torch,
    vLLM and transformers are imported: vLLM and torch's C++ logging read their level from the environment once."""
    if verbose:
        return
    for variable, level in (("VLLM_LOGGING_LEVEL", "ERROR"), ("TRANSFORMERS_VERBOSITY", "error"),
                            ("TORCH_CPP_LOG_LEVEL", "ERROR")):
        os.environ.setdefault(variable, level)  # a value the user exported wins
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module="vime_spmd")


def format_eval_line(record: dict) -> str:
    sets: dict[str, list[str]] = {}
    for key, value in record.items():
        if key.startswith("eval/"):
            _, name, metric = key.split("/", 2)
            short = {"accuracy": "acc", "response_len": "len", "truncated_ratio": "trunc"}.get(metric, metric)
            sets.setdefault(name, []).append(f"{short} {value:.3f}" if short != "len" else f"len {value:.1f}")
    parts = " | ".join(f"{name}: {' '.join(values)}" for name, values in sets.items())
    return f"eval {record['step']:>4} | {parts} | {record['perf/eval_time']:.2f}s"


class Progress:
    """Steps done of the total, reward, step time and ETA. On a terminal, a tqdm bar under the per-step lines; else
    (a log file, a pipe) each step's line ends with its progress and ETA, and nothing is redrawn."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.total = total
        self.tty = self.stream.isatty()
        self.bar = None
        self.intervals_s: list[float] = []  # wall time per step, evals and logging included
        self.last_s: float | None = None

    def eta_s(self, done: int) -> float:
        return sum(self.intervals_s) / len(self.intervals_s) * (self.total - done)

    def step(self, record: dict) -> None:
        from tqdm import tqdm

        now, done = time.perf_counter(), record["step"]
        # The first step of this process has no earlier mark: its own step time stands for it.
        self.intervals_s.append(record["perf/step_time"] if self.last_s is None else now - self.last_s)
        self.last_s = now
        if self.tty:
            if self.bar is None:  # opened at the first step, so that start-up log lines do not break it
                self.bar = tqdm(total=self.total, initial=done - 1, file=self.stream, unit="step", desc="steps",
                                dynamic_ncols=True)
            self.bar.write(format_line(record), file=self.stream)
            name, key = ("sft_loss", "train/sft_loss") if is_sft_record(record) else ("reward", "rollout/raw_reward")
            self.bar.set_postfix(**{name: f"{record[key]:.3f}"},
                                 step_s=f"{record['perf/step_time']:.2f}", refresh=False)
            self.bar.update(done - self.bar.n)
            return
        eta = tqdm.format_interval(self.eta_s(done))
        print(f"{format_line(record)} | {done}/{self.total} steps, ETA {eta}", file=self.stream, flush=True)

    def message(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TensorBoardSink:
    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(log_dir) / "tensorboard"))

    def scalars(self, record: dict) -> None:
        for key, value in numeric(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()  # a run can die between steps; what was logged should be on disk

    def samples(self, step: int, rows: list[dict]) -> None:
        text = "\n\n---\n\n".join(f"**reward {r['reward']:.3f}**, label `{r['label']}`\n\n```\n{r['prompt']}\n```"
                                     f"\n\n```\n{r['response']}\n```" for r in rows)
        self.writer.add_text("samples", text, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, cfg: Config) -> None:
        import wandb

        g = cfg.log
        self.wandb = wandb
        self.run = wandb.init(project=g.wandb_project or "vime-spmd", group=g.wandb_group,
                              name=g.wandb_run_name or Path(g.log_dir).name, dir=g.log_dir, config=cfg.to_dict(),
                              settings=wandb.Settings(console="off", quiet=not g.verbose))

    def scalars(self, record: dict) -> None:
        self.run.log(numeric(record), step=record["step"])

    def samples(self, step: int, rows: list[dict]) -> None:
        columns = ["prompt", "response", "label", "reward"]
        self.run.log({"samples": self.wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])},
                     step=step)

    def close(self) -> None:
        self.run.finish()


def numeric(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, int | float)}


class RunLog:
    """Rank 0's record keeping; a no-op elsewhere (`enabled` False)."""

    def __init__(self, cfg: Config, enabled: bool) -> None:
        self.cfg, self.enabled = cfg, enabled
        self.metrics = MetricsLog(cfg.log.log_dir, enabled)
        self.sinks: list = []
        self.progress: Progress | None = None
        self._tokenizer = None
        if not enabled:
            return
        g = cfg.log
        try:
            if g.use_tensorboard:
                self.sinks.append(TensorBoardSink(g.log_dir))
            if g.use_wandb:
                self.sinks.append(WandbSink(cfg))
        except ImportError as e:  # prepare (checks.check_dashboards) checks first; this covers a broken install
            raise RuntimeError(f"{e}; install the observe extra: {OBSERVE_EXTRA}") from e
        self.progress = Progress(cfg.train.num_rollout)

    def step(self, record: dict, batch=None) -> None:
        """A step's record; with --log-samples-interval, a few of its prompts and responses (`batch`)."""
        if not self.enabled:
            return
        self.metrics.write(record)
        for sink in self.sinks:
            sink.scalars(record)
        self.progress.step(record)
        interval = self.cfg.log.log_samples_interval
        if batch is not None and interval and record["step"] % interval == 0:
            self.samples(record["step"], batch)

    def eval(self, record: dict, sample_records: list[dict]) -> None:
        if not self.enabled:
            return
        self.metrics.append(record)
        append_jsonl(Path(self.cfg.log.log_dir) / "eval_samples.jsonl", sample_records)
        for sink in self.sinks:
            sink.scalars(record)
        self.progress.message(format_eval_line(record))

    def samples(self, step: int, batch) -> None:
        n = batch.group_size
        rows = [{"step": step, "prompt": self.decode(s.prompt_ids), "response": s.response_text, "label": s.label,
                 "reward": s.reward, "raw_reward": s.raw_reward, "response_len": len(s.response_ids),
                 "truncated": s.truncated} for s in batch.samples[: LOGGED_PROMPTS * n]]
        append_jsonl(Path(self.cfg.log.log_dir) / "samples.jsonl", rows)
        for sink in self.sinks:
            sink.samples(step, rows)

    def decode(self, ids: list[int]) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.cfg.model.hf_checkpoint)
        return self._tokenizer.decode(ids)

    def close(self) -> None:
        if not self.enabled:
            return
        for sink in self.sinks:
            sink.close()
        self.progress.close()


def append_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(row, allow_nan=True) + "\n" for row in rows)
