"""Export a checkpoint's policy as an HF model folder (the base model's config and tokenizer, the trained weights).

    torchrun --nproc_per_node 2 -m vime_spmd.tools.export_hf --out runs/exported \\
        --hf-checkpoint BASE_MODEL --load runs/ckpt --tensor-model-parallel-size 2

Any ranks and parallel sizes will do: the checkpoint is resharded to them. The folder is written as `OUT.tmp` and
renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ..config import check_config, parse_config
from ..loop import checkpoint
from ..parallel import Layout
from ..runtime import failures
from ..runtime.device import init_distributed, select_accelerator
from ..train.spec import ActorSpec


class _NoData:
    """The export has no dataset; the checkpoint's data position is not needed."""

    def load_state_dict(self, state: dict) -> None:
        pass


def export(out: str, run_flags: list[str]) -> None:
    cfg = parse_config(["--prompt-data", "unused", *run_flags])
    if not cfg.checkpoint.load:
        raise ValueError("export_hf needs --load CHECKPOINT_DIR")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_config(cfg, world_size)
    if checkpoint.check_loadable(cfg.checkpoint.load) is None:
        raise ValueError(f"--load {cfg.checkpoint.load}: no checkpoint inside to export")
    acc = select_accelerator(cfg.parallel.device)
    init_distributed(acc)
    from transformers import AutoConfig

    from ..train.megatron import load_actor

    MegatronActor = load_actor(acc)  # noqa: N806 (a class)
    from ..train.megatron import MegatronExport

    layout = Layout.of_world(cfg.parallel)
    actor = MegatronActor(ActorSpec.of(cfg), acc, layout, AutoConfig.from_pretrained(cfg.model.hf_checkpoint))
    step = checkpoint.load(cfg.checkpoint.load, actor, _NoData(), layout, with_optimizer=False)
    checkpoint.save_hf(out, MegatronExport.of(actor).hf_weights(), cfg.model.hf_checkpoint, step, layout.rank)
    if layout.rank == 0:
        print(f"step {step} of {cfg.checkpoint.load} exported to {out}", flush=True)
    actor.close()
    torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="HF model folder to write")
    args, run_flags = parser.parse_known_args(argv)
    try:
        export(args.out, run_flags)
    except ValueError as e:  # a bad flag or checkpoint: one line, as run.py prints it
        failures.report(str(e))
        sys.exit(2)


if __name__ == "__main__":
    main()
