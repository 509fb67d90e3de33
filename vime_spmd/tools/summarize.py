"""Summarise a run's metrics.jsonl: the reward trend and the per-phase times.

    python -m vime_spmd.tools.summarize runs/demo/run/metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ..loop.metrics import TIMING_KEYS, is_train_record


def load(path: str) -> list[dict]:
    """The step records (eval records, which metrics.jsonl holds too, are left out)."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if is_train_record(r)]


def summarize(records: list[dict], window: int = 5) -> dict:
    rewards = [r["rollout/raw_reward"] for r in records]
    k = max(1, min(window, len(rewards) // 2))
    return {
        "num_steps": len(records),
        "window": k,
        "reward_first": statistics.fmean(rewards[:k]),
        "reward_last": statistics.fmean(rewards[-k:]),
        "max_logprob_abs_diff": max(r["train/train_rollout_logprob_abs_diff"] for r in records),
        "median_times_s": {key: statistics.median(r[key] for r in records) for key in TIMING_KEYS},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("metrics", help="a metrics.jsonl file")
    s = summarize(load(parser.parse_args(argv).metrics))
    print(f"{s['num_steps']} steps | mean reward, first {s['window']}: {s['reward_first']:.3f} -> "
          f"last {s['window']}: {s['reward_last']:.3f} | max train/rollout logprob diff "
          f"{s['max_logprob_abs_diff']:.1e}")
    print("median phase times (s): " + ", ".join(f"{k.split('/')[1]} {v:.3f}"
                                                   for k, v in s["median_times_s"].items()))


if __name__ == "__main__":
    main()
