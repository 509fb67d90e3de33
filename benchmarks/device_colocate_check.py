"""The prepared check for a session with an accelerator: colocated GRPO steps of a real-size random model.

    # on the device machine (one GPU), with the bundle of ../shared/gpu installed:
    torchrun --nproc_per_node 1 benchmarks/device_colocate_check.py --shape qwen3-1.7b --device cuda --out $OUT/c.json
    # here, as a dry run of everything but the device:
    .venv/bin/torchrun --nproc_per_node 1 benchmarks/device_colocate_check.py --shape tiny --device cpu

It runs the product's own loop (`vime_spmd.loop.trainer.train`) and observes it from outside:
- the device memory free at every transition (`memory/free_*_gib`, recorded by the step) and, from them, the
  share of the trainer's memory that its pause returns;
- that the trainer's parameters and optimizer state are bit-identical after pause/resume (checksums of the
  raw bits taken as the trainer pauses and again once it has resumed);
- the weight-sync time next to copying the same bytes once on the device (the floor), and the
  trainer/engine logprob agreement after each sync (`train/train_rollout_logprob_*abs_diff`, bf16 there);
- every phase's time. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # make_tiny_model arguments
    "tiny": ["--hidden-size", "128", "--num-layers", "2", "--num-heads", "4", "--num-kv-heads", "2"],
    "qwen3-1.7b": ["--hidden-size", "2048", "--num-layers", "28", "--num-heads", "16", "--num-kv-heads", "8",
                   "--head-dim", "128", "--intermediate-size", "6144", "--vocab-size", "151936",
                   "--max-position-embeddings", "4096", "--tie-word-embeddings", "--dtype", "bfloat16"],
    "qwen3-4b": ["--hidden-size", "2560", "--num-layers", "36", "--num-heads", "32", "--num-kv-heads", "8",
                 "--head-dim", "128", "--intermediate-size", "9728", "--vocab-size", "151936",
                 "--max-position-embeddings", "4096", "--tie-word-embeddings", "--dtype", "bfloat16"],
}


def checksum(tensors) -> list[int]:
    """Exact checksums of raw bits: per tensor, the sum of its 16-bit words and their position-weighted sum."""
    sums = []
    for t in tensors:
        words = t.detach().contiguous().view(-1).view(torch.int16).to(torch.int64) & 0xFFFF
        weights = torch.arange(words.numel(), device=words.device, dtype=torch.int64) % 65521 + 1
        sums += [int(words.sum()), int((words * weights).sum())]
    return sums


def trainer_state(actor) -> list[torch.Tensor]:
    tensors = [p for p in actor.model.module.parameters()]
    for opt in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer]):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                tensors += [p] + [v for v in opt.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    return tensors


def instrument(observed: dict) -> None:
    """Wrap the memory transitions and the sync to observe them (no product code changes)."""
    from vime_spmd.runtime import memory
    from vime_spmd.sync.weight_sync import weight_sync as sync
    from vime_spmd.train.megatron import MegatronActor

    actors = []
    actor_init = MegatronActor.__init__

    def remember_actor(self, *args, **kwargs):
        actor_init(self, *args, **kwargs)
        actors.append(self)

    MegatronActor.__init__ = remember_actor
    train_sleep, train_wake = memory.MemoryManager.train_sleep, memory.MemoryManager.train_wake

    def sleep_hook(self):
        observed["checksum_at_pause"] = checksum(trainer_state(actors[0]))
        train_sleep(self)

    def wake_hook(self):
        train_wake(self)
        if "checksum_at_pause" in observed:
            same = checksum(trainer_state(actors[0])) == observed.pop("checksum_at_pause")
            observed.setdefault("resume_bit_exact", []).append(same)

    memory.MemoryManager.train_sleep, memory.MemoryManager.train_wake = sleep_hook, wake_hook
    update = sync.WeightSync.update

    def timed_update(self, target):
        start = time.perf_counter()
        stats = update(self, target)
        self.source.acc.synchronize()
        observed.setdefault("update_s", []).append(time.perf_counter() - start)
        observed["sync_bytes"] = stats.num_bytes
        if "floor_s" in observed:
            return stats
        # Once (first step only, so later steps' perf/update_weights_time stays clean): the floor, the same bytes
        # copied once between buffers that already exist.
        tensors = [t.clone() for _, t in self.hf_weights()]
        targets = [torch.zeros_like(t) for t in tensors]  # written once: no first-touch cost in the floor
        self.source.acc.synchronize()
        start = time.perf_counter()
        for src, dst in zip(tensors, targets):
            dst.copy_(src)
        self.source.acc.synchronize()
        observed["floor_s"] = [time.perf_counter() - start]
        del tensors, targets
        return stats

    sync.WeightSync.update = timed_update


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-1.7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--work-dir", default="/tmp/vime-device-check")
    p.add_argument("--out", default="runs/device_colocate_check.json")
    p.add_argument("extra", nargs="*", help="more run.py flags, after --")
    args = p.parse_args()
    work = Path(args.work_dir)
    model_dir, data = work / f"model-{args.shape}", work / "letters.jsonl"
    if os.environ.get("LOCAL_RANK", "0") == "0" and not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "vime_spmd.tools.make_tiny_model", str(model_dir), *SHAPES[args.shape]],
                       check=True, cwd=ROOT)
        subprocess.run([sys.executable, "-m", "vime_spmd.tools.make_demo_data", str(data)], check=True, cwd=ROOT)
    while not (model_dir / "config.json").is_file() or not data.is_file():
        time.sleep(1)

    from vime_spmd.config import parse_config
    from vime_spmd.loop.prepare import prepare
    from vime_spmd.loop.trainer import train

    observed: dict = {}
    instrument(observed)
    cfg = parse_config(["--hf-checkpoint", str(model_dir), "--prompt-data", str(data), "--device", args.device,
                        "--apply-chat-template", "--rm-type", "letter", "--num-rollout", str(args.steps),
                        "--rollout-batch-size", "16", "--n-samples-per-prompt", "4",
                        "--rollout-max-response-len", "64", "--micro-batch-size", "8", "--lr", "1e-5",
                        "--vllm-load-format", "dummy",  # the engine gets every weight from the trainer
                        "--log-dir", str(work / "run"), *args.extra])
    records = train(cfg, *prepare(cfg))
    if os.environ.get("RANK", "0") != "0":
        return
    report = summarize(records, observed, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


def summarize(records: list[dict], observed: dict, args) -> dict:
    last = records[-1]
    times = {k: [r[k] for r in records] for k in records[0] if k.startswith("perf/")}
    memory = {k: v for k, v in last.items() if k.startswith("memory/")}
    report = {"shape": args.shape, "device": args.device, "steps": len(records),
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "times_s": times, "memory_free_gib_last_step": memory,
              "resume_bit_exact": observed.get("resume_bit_exact", []),
              "sync_bytes": observed.get("sync_bytes"), "update_s": observed.get("update_s"),
              "floor_s": observed.get("floor_s"),
              "logprob_abs_diff": [r["train/train_rollout_logprob_abs_diff"] for r in records],
              "logprob_max_abs_diff": [r["train/train_rollout_logprob_max_abs_diff"] for r in records]}
    if memory:
        held = memory["memory/free_after_engine_sleep_gib"] - memory["memory/free_after_train_gib"]
        returned = memory["memory/free_before_engine_wake_kv_gib"] - memory["memory/free_after_train_gib"]
        report["trainer_held_gib"], report["pause_returned_gib"] = held, returned
        report["pause_returned_share"] = returned / held if held > 0 else None
    print(f"{args.shape} on {args.device}, {len(records)} steps")
    for k, v in times.items():
        print(f"  {k:<28} median {statistics.median(v):8.3f} s   all {', '.join(f'{x:.3f}' for x in v)}")
    for k, v in memory.items():
        print(f"  {k:<40} {v:8.2f} GiB")
    if observed.get("update_s"):
        update_s = statistics.median(observed['update_s'][1:] or observed['update_s'])
        print(f"  weight sync (median of steps 2..) {update_s * 1e3:.1f} ms vs copy floor "
              f"{statistics.median(observed['floor_s']) * 1e3:.1f} ms for {observed['sync_bytes'] / 2**30:.2f} GiB")
    print(f"  pause/resume bit-exact: {report['resume_bit_exact']}; pause returned "
          f"{report.get('pause_returned_share')} of the trainer's memory")
    print(f"  logprob |trainer - engine| mean per step: {report['logprob_abs_diff']}")
    return report


if __name__ == "__main__":
    main()
