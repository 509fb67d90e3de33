"""One layout of the weight-sync benchmark, run under torchrun by benchmarks/weight_sync.py."""

import json
import statistics
import sys
import time

import torch

from vime_spmd.config import parse_config
from vime_spmd.device import init_distributed, select_accelerator
from vime_spmd.parallel import Layout
from vime_spmd.rollout.engine import RolloutEngine
from vime_spmd.sync import WeightSync
from vime_spmd.train.megatron import MegatronActor


def main(model_dir: str, tp: int, engine_tp: int, transport: str, repeats: int, buffer_bytes: int,
         out: str) -> None:
    cfg = parse_config(["--hf-checkpoint", model_dir, "--prompt-data", "unused", "--device", "cpu",
                        "--tensor-model-parallel-size", str(tp), "--rollout-num-gpus-per-engine", str(engine_tp),
                        "--vllm-kv-cache-bytes", str(64 << 20)])
    acc = select_accelerator("cpu")
    init_distributed(acc)
    from transformers import AutoConfig

    layout = Layout.of_world(cfg.parallel)
    actor = MegatronActor(cfg, acc, AutoConfig.from_pretrained(model_dir))
    engine = RolloutEngine(cfg, acc, layout)

    sync = WeightSync(actor, "cpu", transport, buffer_bytes)

    def update() -> int:
        return sync.update(engine.load_weights).num_bytes

    num_bytes = update()  # warm-up
    update_s, floor_s = [], []
    for _ in range(repeats):
        torch.distributed.barrier()
        start = time.perf_counter()
        update()
        torch.distributed.barrier()
        update_s.append(time.perf_counter() - start)
        # The floor: copying the same tensors once into buffers that already exist.
        tensors = [t.clone() for _, t in actor.hf_weights()]
        targets = [torch.empty_like(t) for t in tensors]
        start = time.perf_counter()
        for src, dst in zip(tensors, targets):
            dst.copy_(src)
        floor_s.append(time.perf_counter() - start)
    if layout.rank == 0:
        result = {"train_tp": tp, "engine_tp": engine_tp, "transport": sync.transport, "bytes_per_rank": num_bytes,
                  "update_weights_s": statistics.median(update_s), "copy_floor_s": statistics.median(floor_s)}
        result["ratio"] = result["update_weights_s"] / result["copy_floor_s"]
        with open(out, "w") as f:
            json.dump(result, f)
    sync.close()
    actor.close()
    engine.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6]),
         sys.argv[7])
