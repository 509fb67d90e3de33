"""Under torchrun: the shared-memory and collective transports deliver the same HF tensors as a plain export,
twice in a row (the arenas are reused), after the weights changed in between. Writes a JSON report (rank 0)."""

import json
import sys
import time

import torch

from vime_spmd.config import parse_config
from vime_spmd.parallel import Layout
from vime_spmd.runtime.device import init_distributed, select_accelerator
from vime_spmd.sync.weight_sync import SyncPlan, WeightSync
from vime_spmd.train.megatron import MegatronActor, MegatronExport
from vime_spmd.train.spec import ActorSpec


class Collect:
    """Stands in for the engine: keeps copies of what the reload sync hands over, after `delay_s` per bucket."""

    def __init__(self, got: dict, delay_s: float = 0.0) -> None:
        self.got, self.delay_s = got, delay_s

    def load_weights(self, bucket) -> None:
        time.sleep(self.delay_s)
        self.got.update({k: v.clone() for k, v in bucket})


def main(model_dir: str, tp: int, transport: str, out: str) -> None:
    cfg = parse_config(["--hf-checkpoint", model_dir, "--prompt-data", "unused", "--device", "cpu",
                        "--tensor-model-parallel-size", str(tp)])
    acc = select_accelerator("cpu")
    init_distributed(acc)
    from transformers import AutoConfig

    # No engine: `Collect` stands in for it, so the reload format (full HF tensors) is what it receives.
    actor = MegatronActor(ActorSpec.of(cfg), acc, Layout.of_world(cfg.parallel), AutoConfig.from_pretrained(model_dir))
    export = MegatronExport.of(actor)
    sync = WeightSync(export, SyncPlan("reload", transport, buffer_size_bytes=64 << 10))
    mismatches, num_buckets = [], []
    for round_ in range(2):
        expected = {k: v.clone() for k, v in export.hf_weights()}
        got = {}
        stats = sync.update(Collect(got))
        num_buckets.append(stats.num_buckets)
        mismatches += [f"{round_}:{k}" for k in expected if k not in got or not torch.equal(got[k], expected[k])]
        with torch.no_grad():  # change every weight before the second round
            for p in actor.model.module.parameters():
                p.add_(0.5)
    # A slow engine rank: rank 1 takes 50 ms per bucket, rank 0 none, and overwrites its arena (as its next sync
    # would) the moment its update returns. What rank 1 loads must still be this sync's weights.
    expected = {k: v.clone() for k, v in export.hf_weights()}
    got = {}
    sync.update(Collect(got, delay_s=0.05 if torch.distributed.get_rank() == 1 else 0.0))
    if sync.exchange is not None:
        sync.exchange.own.bytes.fill_(0)
    torch.distributed.barrier()
    mismatches += [f"slow:{k}" for k in expected if k not in got or not torch.equal(got[k], expected[k])]
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mismatches)
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"transport": sync.transport, "mismatches": sum(everyone, []), "num_buckets": num_buckets,
                       "num_tensors": len(expected)}, f)
    sync.close()
    actor.close()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
