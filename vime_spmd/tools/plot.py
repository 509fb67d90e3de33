"""A run's curves in one picture: RUN_DIR/plots.png from RUN_DIR/metrics.jsonl.

    python -m vime_spmd.tools.plot runs/demo/run

Panels: reward (and each eval set's accuracy), losses, gradient norm, the trainer/engine logprob difference (the
weight-sync check), response length, and the phase times stacked per step. Needs matplotlib (the observe extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import OBSERVE_EXTRA
from ..loop.metrics import TIMING_KEYS, is_train_record

PHASE_KEYS = [key for key in TIMING_KEYS if key != "perf/step_time"]


def load(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) of a run folder's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file; give a run's --log-dir")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if is_train_record(r)], [r for r in records if not is_train_record(r)]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def plot(run_dir: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(f"error: plotting needs matplotlib; install the observe extra: {OBSERVE_EXTRA}") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps, evals = load(run_dir)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), constrained_layout=True)
    fig.suptitle(f"{run_dir} ({len(steps)} steps)")

    ax = axes[0, 0]
    ax.plot(*series(steps, "rollout/raw_reward"), label="rollout reward")
    for key in sorted({k for r in evals for k in r if k.endswith("/accuracy")}):
        ax.plot(*series(evals, key), marker="o", label=key.removesuffix("/accuracy").replace("eval/", "eval ")
                + " accuracy")
    ax.set_title("reward")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    for key in ("train/pg_loss", "train/kl_loss", "train/entropy_loss"):
        ax.plot(*series(steps, key), label=key.removeprefix("train/"))
    ax.set_title("losses")
    ax.legend(fontsize=8)

    ax = axes[0, 2]
    ax.plot(*series(steps, "train/grad_norm"))
    ax.set_title("grad norm")

    ax = axes[1, 0]
    for key, label in (("train/train_rollout_logprob_abs_diff", "mean"),
                       ("train/train_rollout_logprob_max_abs_diff", "max")):
        x, y = series(steps, key)
        if x:
            ax.plot(x, [max(v, 1e-12) for v in y], label=label)  # log scale: an exact 0 would vanish
    ax.set_yscale("log")
    ax.set_title("|trainer - engine| logprob")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    ax.plot(*series(steps, "rollout/response_len"), label="rollout")
    for key in sorted({k for r in evals for k in r if k.endswith("/response_len")}):
        ax.plot(*series(evals, key), marker="o", label=key.removesuffix("/response_len").replace("eval/", "eval "))
    ax.set_title("response length (tokens)")
    ax.legend(fontsize=8)

    ax = axes[1, 2]
    x = [r["step"] for r in steps]
    bottom = [0.0] * len(steps)
    for key in PHASE_KEYS:
        values = [r.get(key, 0.0) for r in steps]
        ax.bar(x, values, bottom=bottom, label=key.removeprefix("perf/").removesuffix("_time"))
        bottom = [b + v for b, v in zip(bottom, values)]
    other = [max(r["perf/step_time"] - b, 0.0) for r, b in zip(steps, bottom)]
    ax.bar(x, other, bottom=bottom, label="other", color="lightgray")
    ax.set_title("phase times per step (s)")
    ax.legend(fontsize=7, ncol=2)

    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    out = run_dir / "plots.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run's --log-dir (holds metrics.jsonl)")
    print(plot(parser.parse_args(argv).run_dir))


if __name__ == "__main__":
    main()
