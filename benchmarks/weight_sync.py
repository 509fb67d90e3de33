"""Weight sync against the copy floor, per training/rollout layout, on CPU (2 ranks).

    .venv/bin/python benchmarks/weight_sync.py --out runs/bench/weight_sync.json

Builds a ~100M-parameter random Qwen3 (fp32) unless --model-dir exists, then for each layout, transport and sync
format runs 2 ranks under torchrun: the median time of a whole `update_weights` (exchange the Megatron shards,
then either write each engine rank's share into its tensors (direct) or convert to full HF tensors and reload
them through vLLM (reload), in buckets) next to the median time of copying once, into existing buffers, the bytes
an engine rank holds (the floor). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_ARGS = ["--hidden-size", "768", "--num-layers", "12", "--num-heads", "12", "--num-kv-heads", "4",
              "--head-dim", "64", "--intermediate-size", "2048", "--vocab-size", "32768"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default="runs/bench/qwen3-100m")
    p.add_argument("--layouts", default="1x1,2x2,2x1,1x2", help="train_tp x engine_tp, comma separated")
    p.add_argument("--transports", default="shm,collective")
    p.add_argument("--formats", default="direct,reload")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--update-weight-buffer-size", type=int, default=512 << 20)
    p.add_argument("--out", default="runs/bench/weight_sync.json")
    args = p.parse_args()
    if not Path(args.model_dir, "config.json").is_file():
        subprocess.run([sys.executable, "-m", "vime_spmd.tools.make_tiny_model", args.model_dir, *MODEL_ARGS],
                       check=True, cwd=ROOT)
    rows = []
    cases = [(layout, t, f) for layout in args.layouts.split(",") for f in args.formats.split(",")
             for t in args.transports.split(",")]
    for layout, transport, sync_format in cases:
        tp, engine_tp = (int(x) for x in layout.split("x"))
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
                   str(free_port()), str(ROOT / "benchmarks/_weight_sync_worker.py"), args.model_dir, str(tp),
                   str(engine_tp), transport, sync_format, str(args.repeats), str(args.update_weight_buffer_size),
                   out.name]
            subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows.append(json.loads(Path(out.name).read_text()))
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU (gloo), fp32",
              "command": " ".join(sys.argv), "model_params": None, "results": rows}
    num_params = max(r["engine_bytes_per_rank"] for r in rows) // 4
    report["model_params"] = num_params
    print(f"weight sync, {num_params / 1e6:.0f}M params fp32, 2 ranks, {report['machine']}")
    print(f"{'train TP':>8} {'engine TP':>9} {'format':>7} {'transport':>10} {'MiB moved':>10} {'MiB held':>9} "
          f"{'update (s)':>11} {'copy floor (s)':>15} {'ratio':>6}")
    for r in rows:
        print(f"{r['train_tp']:>8} {r['engine_tp']:>9} {r['format']:>7} {r['transport']:>10} "
              f"{r['bytes_moved_per_rank'] / 2**20:>10.0f} {r['engine_bytes_per_rank'] / 2**20:>9.0f} "
              f"{r['update_weights_s']:>11.3f} {r['copy_floor_s']:>15.3f} {r['ratio']:>6.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
