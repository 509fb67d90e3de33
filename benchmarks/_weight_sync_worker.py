"""One layout of the weight-sync benchmark, run under torchrun by benchmarks/weight_sync.py."""

import json
import statistics
import sys
import time

import torch

from vime_spmd.config import parse_config
from vime_spmd.loop.build import build_colocated
from vime_spmd.parallel import Layout
from vime_spmd.runtime.device import init_distributed, select_accelerator

_INPUT_SPLIT = ("o_proj.weight", "down_proj.weight")  # split on dim 1 in the engine; other matrices on dim 0


def engine_share(name: str, t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """About what engine rank `rank` of `size` holds of HF tensor `name` (norms whole): the floor's bytes."""
    if "norm" in name or size == 1:
        return t
    return t.chunk(size, dim=1 if name.endswith(_INPUT_SPLIT) else 0)[rank]


def main(model_dir: str, tp: int, engine_tp: int, transport: str, sync_format: str, repeats: int,
         buffer_bytes: int, out: str) -> None:
    cfg = parse_config(["--hf-checkpoint", model_dir, "--prompt-data", "unused", "--device", "cpu",
                        "--tensor-model-parallel-size", str(tp), "--rollout-num-gpus-per-engine", str(engine_tp),
                        "--vllm-kv-cache-bytes", str(64 << 20), "--weight-sync-format", sync_format,
                        "--weight-sync-transport", transport, "--update-weight-buffer-size", str(buffer_bytes)])
    acc = select_accelerator("cpu")
    init_distributed(acc)
    layout = Layout.of_world(cfg.parallel)
    run = build_colocated(cfg, acc, layout)
    engine, sync = run.engine, run.sync

    num_bytes = sync.update(engine).num_bytes  # warm-up
    update_s, floor_s = [], []
    for _ in range(repeats):
        torch.distributed.barrier()
        start = time.perf_counter()
        sync.update(engine)
        torch.distributed.barrier()
        update_s.append(time.perf_counter() - start)
        # The floor: copying once, into buffers that already exist, the bytes this rank's engine holds. The
        # buffers are written once before the timed copy: a first write into fresh memory also pays its page
        # faults (480 MB, one thread, this VM: 0.206 s fresh, 0.040 s written before), which the engine's
        # long-lived tensors never do.
        tensors = [engine_share(n, t, layout.engine_rank, engine_tp).clone() for n, t in run.export.hf_weights()]
        targets = [torch.zeros_like(t) for t in tensors]
        start = time.perf_counter()
        for src, dst in zip(tensors, targets):
            dst.copy_(src)
        floor_s.append(time.perf_counter() - start)
    if layout.rank == 0:
        result = {"train_tp": tp, "engine_tp": engine_tp, "transport": sync.transport, "format": sync.format,
                  "bytes_moved_per_rank": num_bytes, "engine_bytes_per_rank": sum(t.numel() * 4 for t in tensors),
                  "update_weights_s": statistics.median(update_s), "copy_floor_s": statistics.median(floor_s)}
        result["ratio"] = result["update_weights_s"] / result["copy_floor_s"]
        with open(out, "w") as f:
            json.dump(result, f)
    run.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]),
         int(sys.argv[7]), sys.argv[8])
