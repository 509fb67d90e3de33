"""Timing spans with stable keys, metrics.jsonl, and the one-line progress print."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch stays unimported until run.py has quieted the libraries (observe.quiet_libraries)
    from ..runtime.device import Accelerator

# Every step's record holds these keys (docs/architecture.md), whether or not the phase did work on this hardware.
TIMING_KEYS = (
    "perf/rollout_time", "perf/engine_sleep_time", "perf/train_wake_time", "perf/ref_logprobs_time",
    "perf/actor_train_time", "perf/sleep_time", "perf/wake_up_time", "perf/update_weights_time",
    "perf/step_time",
)
METRIC_KEYS = (
    "rollout/raw_reward", "train/pg_loss", "train/kl_loss", "train/entropy_loss", "train/grad_norm",
    "train/train_rollout_logprob_abs_diff",
)
SFT_METRIC_KEYS = ("train/sft_loss", "train/entropy_loss", "train/grad_norm")  # a --loss-type sft step's


class StepTimer:
    def __init__(self, acc: Accelerator, on_phase: Callable[[str], None] | None = None) -> None:
        self.acc = acc
        self.on_phase = on_phase  # told each phase as it starts (the watchdog names the phase a rank stopped in)
        self.times: dict[str, float] = {key: 0.0 for key in TIMING_KEYS}

    @contextlib.contextmanager
    def span(self, key: str):
        """Time one phase; the device is synchronised at both ends so that async work is counted."""
        if self.on_phase is not None:
            self.on_phase(key)
        self.acc.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.acc.synchronize()
            self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - start


class MetricsLog:
    """Appends one JSON object per step (and per eval) to metrics.jsonl, rank 0 only; `observe.RunLog` prints."""

    def __init__(self, log_dir: str, enabled: bool) -> None:
        self.enabled = enabled
        self.path = Path(log_dir) / "metrics.jsonl"
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        for key in ("step", *TIMING_KEYS, *(SFT_METRIC_KEYS if is_sft_record(record) else METRIC_KEYS)):
            if key not in record:
                raise KeyError(f"metrics record of step {record.get('step')} lacks {key}")
        self.append(record)

    def append(self, record: dict) -> None:
        """Any record with a step (an eval's metrics: `eval/...` keys and `perf/eval_time`)."""
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")


def untimed_share(record: dict) -> float:
    """The share of a step's `perf/step_time` that no phase key covers: the work between the phases (building the
    training inputs) and the timer's own cost. `perf/wake_up_time` holds both engine wakes, so every second of the
    step is counted once."""
    phases = sum(record[key] for key in TIMING_KEYS if key != "perf/step_time")
    return (record["perf/step_time"] - phases) / record["perf/step_time"]


def is_train_record(record: dict) -> bool:
    """metrics.jsonl holds a record per step and one per eval (their keys start with eval/)."""
    return "perf/step_time" in record


def is_sft_record(record: dict) -> bool:
    """A step of supervised fine-tuning (--loss-type sft): no rollout, no reward."""
    return "train/sft_loss" in record


def format_line(r: dict) -> str:
    def f(key: str, fmt: str = ".3f") -> str:
        v = r.get(key, math.nan)
        return format(v, fmt)

    if is_sft_record(r):
        return (f"step {r['step']:>4} | sft loss {f('train/sft_loss', '.4f')} | ent {f('train/entropy_loss')} "
                f"| gnorm {f('train/grad_norm')} | resp len {f('train/response_len', '.1f')} "
                f"| step {f('perf/step_time', '.2f')}s (train {f('perf/actor_train_time', '.2f')}s, "
                f"sync {f('perf/update_weights_time', '.2f')}s)")
    return (f"step {r['step']:>4} | reward {f('rollout/raw_reward')} | pg {f('train/pg_loss', '+.4f')} "
            f"| kl {f('train/kl_loss', '.4f')} | ent {f('train/entropy_loss')} | gnorm {f('train/grad_norm')} "
            f"| lp diff {f('train/train_rollout_logprob_abs_diff', '.1e')} "
            f"| resp len {f('rollout/response_len', '.1f')} "
            f"| step {f('perf/step_time', '.2f')}s (rollout {f('perf/rollout_time', '.2f')}s, "
            f"train {f('perf/actor_train_time', '.2f')}s, sync {f('perf/update_weights_time', '.2f')}s)")
