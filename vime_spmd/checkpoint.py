"""Checkpoints: save and resume a run (policy shards, optimizer state, data position, step), atomically.

Layout of `--save DIR`:
    DIR/iter_0000010/rank_00000.pt ...   each rank's training state (its Megatron shards and optimizer state)
    DIR/iter_0000010/meta.json           step, data position, and the layout the shards belong to
    DIR/latest_checkpointed_iteration.txt
A checkpoint is written into `iter_X.tmp`, renamed to `iter_X` once every rank has written its file, and only then
named in `latest_checkpointed_iteration.txt` (itself replaced atomically). An interrupted save leaves the previous
checkpoint as the latest; a leftover `.tmp` folder is never read. Resuming needs the same world size and
training layout (the shards are per rank).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

LATEST = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def layout_of(layout) -> dict:
    return {"world_size": layout.world_size, "tensor_model_parallel_size": layout.tp_size,
            "pipeline_model_parallel_size": layout.pp_size}


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(root: str, step: int, actor, dataset, layout) -> Path:
    """Every rank calls this; returns the checkpoint folder."""
    final = iteration_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if layout.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    torch.save({"actor": actor.state_dict(), "torch_rng": torch.get_rng_state()},
               tmp / f"rank_{layout.rank:05d}.pt")
    torch.distributed.barrier()  # every rank's file is complete
    if layout.rank == 0:
        meta = {"step": step, "data": dataset.state_dict(), "layout": layout_of(layout)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _replace_text(Path(root) / LATEST, str(step))
    torch.distributed.barrier()
    return final


def latest_step(root: str) -> int | None:
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    return int(marker.read_text().strip())


def check_loadable(root: str) -> int:
    """The step to resume from; raises ValueError naming `--load` when there is nothing complete to load."""
    step = latest_step(root)
    if step is None:
        raise ValueError(f"--load {root}: no {LATEST} inside; point it at a folder written by --save")
    if not (iteration_dir(root, step) / "meta.json").is_file():
        raise ValueError(f"--load {root}: {LATEST} names step {step} but {iteration_dir(root, step)} is incomplete")
    return step


def load(root: str, actor, dataset, layout) -> int:
    """Restore this rank's state from the latest checkpoint; returns its step."""
    step = check_loadable(root)
    folder = iteration_dir(root, step)
    meta = json.loads((folder / "meta.json").read_text())
    if meta["layout"] != layout_of(layout):
        raise ValueError(f"--load {root}: the checkpoint was written with {meta['layout']}, this run has "
                         f"{layout_of(layout)}; resume with the same ranks and parallel sizes")
    state = torch.load(folder / f"rank_{layout.rank:05d}.pt", map_location="cpu", weights_only=False)
    actor.load_state_dict(state["actor"])
    torch.set_rng_state(state["torch_rng"])
    dataset.load_state_dict(meta["data"])
    return step
