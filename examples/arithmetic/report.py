"""Held-out accuracy before and after each phase of the arithmetic example, as a table, JSON and one figure.

    python examples/arithmetic/report.py runs/arithmetic

Reads RUN/sft/metrics.jsonl (the supervised warm start) and RUN/grpo/metrics.jsonl (GRPO from its last weights),
prints a markdown table of each eval set's accuracy and pass@k at three points (the random model, after SFT, after
GRPO), writes RUN/report.json, and draws RUN/curves.png: eval accuracy over both phases' steps, the SFT loss and
the GRPO training reward.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read(path: Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) of a metrics.jsonl."""
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file; run examples/arithmetic/run.sh first")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "perf/step_time" in r], [r for r in records if "perf/eval_time" in r]


def eval_sets(record: dict) -> list[str]:
    return sorted({key.split("/")[1] for key in record if key.startswith("eval/")})


def point(record: dict) -> dict[str, dict[str, float]]:
    """Each set's accuracy and pass@k of one eval record."""
    out = {}
    for name in eval_sets(record):
        prefix = f"eval/{name}/"
        out[name] = {key[len(prefix):]: value for key, value in record.items()
                     if key.startswith(prefix) and (key.endswith("accuracy") or "pass@" in key)}
    return out


def report(run: Path) -> dict:
    sft_steps, sft_evals = read(run / "sft" / "metrics.jsonl")
    grpo_steps, grpo_evals = read(run / "grpo" / "metrics.jsonl")
    rewards = [r["rollout/raw_reward"] for r in grpo_steps]
    k = max(1, min(5, len(rewards) // 2))
    return {
        "points": {"random model": point(sft_evals[0]), f"after SFT ({sft_steps[-1]['step']} steps)":
                   point(sft_evals[-1]), f"after GRPO ({grpo_steps[-1]['step']} steps)": point(grpo_evals[-1])},
        "grpo_train_reward": {"first": sum(rewards[:k]) / k, "last": sum(rewards[-k:]) / k, "window": k},
        "time_s": {"sft": sum(r["perf/step_time"] for r in sft_steps) + sum(r["perf/eval_time"] for r in sft_evals),
                   "grpo": sum(r["perf/step_time"] for r in grpo_steps)
                   + sum(r["perf/eval_time"] for r in grpo_evals)},
    }


def table(result: dict) -> str:
    points = result["points"]
    first = next(iter(points.values()))
    metrics = list(next(iter(first.values())))  # accuracy, pass@1, pass@2, ...
    lines = ["| eval set | metric | " + " | ".join(points) + " |", "|---|---|" + "---:|" * len(points)]
    for name in first:
        for metric in metrics:
            lines.append(f"| {name} | {metric} | " + " | ".join(f"{p[name][metric]:.3f}" for p in points.values())
                         + " |")
    return "\n".join(lines)


def draw(run: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft_steps, sft_evals = read(run / "sft" / "metrics.jsonl")
    grpo_steps, grpo_evals = read(run / "grpo" / "metrics.jsonl")
    offset = sft_steps[-1]["step"]  # GRPO's steps follow SFT's on one axis
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for name in eval_sets(sft_evals[0]):
        key = f"eval/{name}/accuracy"
        xs = [r["step"] for r in sft_evals] + [offset + r["step"] for r in grpo_evals[1:]]
        ys = [r[key] for r in sft_evals] + [r[key] for r in grpo_evals[1:]]
        top.plot(xs, ys, marker="o", label=f"held-out {name}: accuracy")
    top.plot([offset + r["step"] for r in grpo_steps], [r["rollout/raw_reward"] for r in grpo_steps], alpha=0.5,
             label="GRPO training reward")
    top.axvline(offset, color="grey", linestyle="--")
    top.text(offset, 1.02, " SFT | GRPO", color="grey", va="bottom", ha="center")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy / reward")
    top.legend(loc="upper left")
    bottom.plot([r["step"] for r in sft_steps], [r["train/sft_loss"] for r in sft_steps], label="SFT loss (NLL/token)")
    bottom.axvline(offset, color="grey", linestyle="--")
    bottom.set_yscale("log")
    bottom.set_xlabel("step (SFT, then GRPO)")
    bottom.legend(loc="upper right")
    fig.tight_layout()
    out = run / "curves.png"
    fig.savefig(out, dpi=80)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="the example's output folder (holds sft/ and grpo/)")
    args = p.parse_args(argv)
    result = report(args.run)
    (args.run / "report.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    g = result["grpo_train_reward"]
    print(f"\nGRPO training reward, mean of the first {g['window']} steps: {g['first']:.3f} -> last {g['window']}: "
          f"{g['last']:.3f}; time: SFT {result['time_s']['sft'] / 60:.1f} min, GRPO "
          f"{result['time_s']['grpo'] / 60:.1f} min (steps and evals)")
    print(f"figure: {draw(args.run)}")


if __name__ == "__main__":
    main()
