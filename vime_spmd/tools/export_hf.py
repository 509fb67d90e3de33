"""Export a checkpoint's policy as an HF model folder (the base model's config and tokenizer, the trained weights).

    torchrun --nproc_per_node 2 -m vime_spmd.tools.export_hf --out runs/exported \\
        --hf-checkpoint BASE_MODEL --load runs/ckpt --tensor-model-parallel-size 2

Run it with the ranks and parallel sizes the checkpoint was written with (every rank loads its own shards).
The folder is written as `OUT.tmp` and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from .. import checkpoint, failures
from ..config import parse_config, validate
from ..device import init_distributed, select_accelerator
from ..parallel import Layout

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")


class _NoData:
    """The export has no dataset; the checkpoint's data position is not needed."""

    def load_state_dict(self, state: dict) -> None:
        pass


def export(out: str, run_flags: list[str]) -> None:
    cfg = parse_config(["--prompt-data", "unused", *run_flags])
    if not cfg.checkpoint.load:
        raise ValueError("export_hf needs --load CHECKPOINT_DIR")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size)
    checkpoint.check_loadable(cfg.checkpoint.load)
    acc = select_accelerator(cfg.parallel.device)
    init_distributed(acc)
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from ..train.megatron import load_actor

    MegatronActor = load_actor(acc)  # noqa: N806 (a class)
    from ..train.megatron import MegatronExport

    layout = Layout.of_world(cfg.parallel)
    actor = MegatronActor(cfg, acc, layout, AutoConfig.from_pretrained(cfg.model.hf_checkpoint))
    export = MegatronExport.of(actor)
    step = checkpoint.load(cfg.checkpoint.load, actor, _NoData(), layout)
    weights = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in export.hf_weights()}
    if layout.rank == 0:
        final = Path(out)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in COPIED:
            if (Path(cfg.model.hf_checkpoint) / name).is_file():
                shutil.copy(Path(cfg.model.hf_checkpoint) / name, tmp / name)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt", "vime_step": str(step)})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        print(f"step {step} of {cfg.checkpoint.load} exported to {final}", flush=True)
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
