"""Peak training memory per rank against response length, per attention backend; and training tokens/s with
micro-batches by token budget against fixed micro-batches, on a mix of short and long responses (CPU).

    .venv/bin/python benchmarks/train_memory.py --out runs/bench/train_memory.json

Builds a small random Qwen3 (hidden 256, 4 layers, 4 heads / 2 KV heads of 64, MLP 768, vocab 2048) unless
--model-dir exists. Each measurement is its own process, a world of one (benchmarks/_train_memory_worker.py: what
one rank holds is the same with more data-parallel ranks): the actor is built, a warm-up step allocates Adam's
state, then one sample of 64 prompt tokens + RESPONSE_LEN response tokens goes through the logprob pass and one
training step (micro-batch of one). Peak memory is the kernel's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) during the call, minus the resident set before it. `--skip` leaves out backend/length pairs
that would not fit (Megatron's local attention keeps [heads, s, s] probabilities per layer: quadratic).
The throughput cases train on 12 responses of 128 tokens and 4 of 1024 (shuffled), fixed micro-batches of 4 samples
against a token budget of 4 x the longest sample (the same peak memory bound), 5 steps each: tokens per second of the
fastest step (wall) and per CPU second (median; one thread, so CPU time is the step's work whatever else runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_ARGS = ["--hidden-size", "256", "--num-layers", "4", "--num-heads", "4", "--num-kv-heads", "2", "--head-dim",
              "64", "--intermediate-size", "768", "--vocab-size", "2048", "--max-position-embeddings", "16384"]


def measure(model_dir: str, backend: str, mode: str, arg: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, str(ROOT / "benchmarks/_train_memory_worker.py"), model_dir, backend, out.name,
                        mode, arg], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default="runs/bench/qwen3-small")
    p.add_argument("--backends", default="sdpa,local")
    p.add_argument("--lengths", default="512,2048,4096,8192", help="response lengths, comma separated")
    p.add_argument("--skip", default="local:8192", help="backend:length pairs not run, comma separated")
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default="runs/bench/train_memory.json")
    args = p.parse_args()
    if not Path(args.model_dir, "config.json").is_file():
        subprocess.run([sys.executable, "-m", "vime_spmd.tools.make_tiny_model", args.model_dir, *MODEL_ARGS],
                       check=True, cwd=ROOT)
    skip = set(args.skip.split(",")) if args.skip else set()
    memory = [measure(args.model_dir, b, "memory", n) for b in args.backends.split(",")
              for n in args.lengths.split(",") if f"{b}:{n}" not in skip and not args.no_memory]
    throughput = [] if args.no_throughput else [measure(args.model_dir, "sdpa", "throughput", batching)
                                                for batching in ("fixed", "dynamic")]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU, fp32, 1 rank, 1 thread"
    print(f"peak memory added per rank by one sample (64-token prompt), {machine}")
    print(f"{'backend':>8} {'response':>9} {'tokens':>7} {'logprobs MiB':>13} {'train MiB':>10} {'train (s)':>10} "
          f"{'load':>5}")
    for r in memory:
        print(f"{r['backend']:>8} {r['response_len']:>9} {r['tokens']:>7} {r['logprobs_peak_added_mib']:>13.0f} "
              f"{r['train_peak_added_mib']:>10.0f} {r['train_step_s']:>10.2f} {r['load_avg_1min']:>5.1f}")
    if throughput:
        print("training step, 12 x 128 + 4 x 1024 response tokens (64-token prompts), sdpa, 5 steps")
        print(f"{'batching':>9} {'micro-batches':>14} {'padding':>8} {'min (s)':>8} {'tokens/s':>9} {'CPU (s)':>8} "
              f"{'tokens/CPU s':>13} {'peak MiB':>9} {'load':>5}")
        for r in throughput:
            print(f"{r['batching']:>9} {r['num_micro_batches']:>14} {r['padding_ratio']:>8.2f} "
                  f"{r['train_step_s']:>8.2f} {r['tokens_per_s']:>9.0f} {r['train_step_cpu_s']:>8.2f} "
                  f"{r['tokens_per_cpu_s']:>13.0f} {r['train_peak_added_mib']:>9.0f} {r['load_avg_1min']:>5.1f}")
    report = {"machine": machine, "command": " ".join(sys.argv), "model_args": MODEL_ARGS, "memory": memory,
              "throughput": throughput}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
