"""Under torchrun: the direct sync leaves the engine's tensors exactly as vLLM's own loader left them.

The engine loads the checkpoint itself (vLLM's loader); its tensors are saved, overwritten with NaN, then written by
the direct sync from a trainer that loaded the same checkpoint. Writes a JSON report (rank 0)."""

import json
import sys

import torch

from vime_spmd.config import parse_config
from vime_spmd.loop.build import build_colocated
from vime_spmd.parallel import Layout
from vime_spmd.runtime.device import init_distributed, select_accelerator


def main(model_dir: str, tp: int, engine_tp: int, transport: str, divisible_by: int, out: str) -> None:
    cfg = parse_config(["--hf-checkpoint", model_dir, "--prompt-data", "unused", "--device", "cpu",
                        "--tensor-model-parallel-size", str(tp), "--rollout-num-gpus-per-engine", str(engine_tp),
                        "--make-vocab-size-divisible-by", str(divisible_by), "--vllm-kv-cache-bytes", str(16 << 20),
                        "--weight-sync-format", "direct", "--weight-sync-transport", transport,
                        "--update-weight-buffer-size", str(64 << 10)])
    acc = select_accelerator("cpu")
    init_distributed(acc)
    layout = Layout.of_world(cfg.parallel)
    run = build_colocated(cfg, acc, layout)
    engine, sync = run.engine, run.sync
    live = engine.llm.apply_model(lambda model: dict(model.named_parameters()))[0]
    by_vllm = {name: t.detach().clone() for name, t in live.items()}
    with torch.no_grad():
        for t in live.values():
            t.fill_(float("nan"))
    stats = sync.update(engine)
    mismatches = [name for name, t in live.items() if not torch.equal(t, by_vllm[name])]
    report = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(report, {"mismatches": mismatches, "num_tensors": len(live),
                                                 "num_not_gathered": len(sync.local_only),
                                                 "num_buckets": stats.num_buckets, "num_bytes": stats.num_bytes,
                                                 "engine_bytes": sum(t.numel() * t.element_size()
                                                                     for t in live.values())})
    if layout.rank == 0:
        with open(out, "w") as f:
            json.dump({"transport": sync.transport, "ranks": report}, f)
    run.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6])
