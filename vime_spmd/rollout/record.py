"""Record a run's rollouts and replay them: `--save-debug-rollout-data` writes each step's rollout as it was trained
on; `--load-debug-rollout-data` trains on those files without starting an engine, so a training bug can be
replayed, and bisected, without generation. A replay of a recorded run computes the same training metrics: the
samples, the engine's logprobs, the rewards and the data position are the recorded ones."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ..batch import RolloutBatch, Sample
from ..runtime.failures import RunError


def rollout_path(template: str, step: int) -> Path:
    return Path(template.format(rollout_id=step))


def save_rollout(template: str, step: int, batch: RolloutBatch, data_position: int) -> Path:
    """Write `batch` (and the data position after it) for `step`, atomically: a crash leaves the previous file or
    none, never half of one."""
    path = rollout_path(template, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"samples": [dataclasses.asdict(s) for s in batch.samples], "group_size": batch.group_size,
              "num_reward_failures": batch.num_reward_failures, "num_dropped_groups": batch.num_dropped_groups,
              "data_position": data_position, "step": step}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(record, tmp)
    os.replace(tmp, path)
    return path


def load_rollout(template: str, step: int) -> tuple[RolloutBatch, int]:
    """The batch recorded for `step` and the data position after it. Raises RunError (one `error:` line) naming the
    file when it is missing or not such a record."""
    path = rollout_path(template, step)
    if not path.is_file():
        raise RunError(f"--load-debug-rollout-data: no recorded rollout for step {step} ({path}); record as many "
                           f"steps with --save-debug-rollout-data, or lower --num-rollout")
    try:
        record = torch.load(path, weights_only=True)
        samples = [Sample(**s) for s in record["samples"]]
    except Exception as e:  # a truncated file, another format: say which file
        raise RunError(f"--load-debug-rollout-data: {path} is not a recorded rollout "
                       f"({type(e).__name__}: {e})") from None
    batch = RolloutBatch(samples, record["group_size"], num_reward_failures=record["num_reward_failures"],
                         num_dropped_groups=record["num_dropped_groups"])
    return batch, record["data_position"]
