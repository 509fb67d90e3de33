"""Checkpoints: save and resume a run (policy shards, optimizer state, data position, step), atomically.

Layout of `--save DIR`:
    DIR/iter_0000010/rank_00000.pt ...   each rank's training state (its Megatron shards and optimizer state)
    DIR/iter_0000010/meta.json           step, data position, and the layout the shards belong to
    DIR/latest_checkpointed_iteration.txt
A checkpoint is written into `iter_X.tmp`, renamed to `iter_X` once every rank has written its file, and only then
named in `latest_checkpointed_iteration.txt` (itself replaced atomically). An interrupted save leaves the previous
checkpoint as the latest; a leftover `.tmp` folder is never read. A write that fails on any rank (a full disk)
removes the `.tmp` folder and raises SaveError on every rank, naming the folder and the bytes needed. Resuming
needs the same world size and training layout (the shards are per rank).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .failures import RunError

LATEST = "latest_checkpointed_iteration.txt"


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def layout_values(world_size: int, tp_size: int, pp_size: int) -> dict:
    """What a checkpoint records of the layout its per-rank shards belong to."""
    return {"world_size": world_size, "tensor_model_parallel_size": tp_size, "pipeline_model_parallel_size": pp_size}


def layout_of(layout) -> dict:
    return layout_values(layout.world_size, layout.tp_size, layout.pp_size)


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(root: str, step: int, actor, dataset, layout) -> Path:
    """Every rank calls this; returns the checkpoint folder. A failed write on any rank (a full disk, say) raises
    SaveError on every rank, after the partial `.tmp` folder is removed; the latest checkpoint stays the latest."""
    final = iteration_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    state = {"actor": actor.state_dict(), "torch_rng": torch.get_rng_state()}
    num_bytes = state_bytes(state)

    def make_tmp() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def finish() -> None:
        meta = {"step": step, "data": dataset.state_dict(), "layout": layout_of(layout)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _replace_text(Path(root) / LATEST, str(step))

    # Each stage ends in a gather of every rank's outcome, which is also the barrier the next stage needs.
    stages = [(make_tmp, layout.rank == 0), (lambda: torch.save(state, tmp / f"rank_{layout.rank:05d}.pt"), True),
              (finish, layout.rank == 0)]
    for stage, mine in stages:
        outcomes: list = [None] * layout.world_size
        torch.distributed.all_gather_object(outcomes, (_attempt(stage) if mine else None, num_bytes))
        failures = [(rank, error) for rank, (error, _) in enumerate(outcomes) if error is not None]
        if failures:
            if layout.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                (Path(root) / (LATEST + ".tmp")).unlink(missing_ok=True)
            torch.distributed.barrier()  # the partial folder is gone before anyone reports
            raise SaveError(_failure_message(root, step, tmp, failures, sum(n for _, n in outcomes)))
    return final


class SaveError(RunError):
    """A checkpoint could not be written; the message names the folder, the cause and the bytes needed."""


def _attempt(stage) -> str | None:
    try:
        stage()
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError (iostream error)
        return f"{type(e).__name__}: {e}"
    return None


def state_bytes(value) -> int:
    """Bytes of the tensors in a nested state (what torch.save writes, less a few KiB of structure)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(state_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(state_bytes(v) for v in value)
    return 0


def _failure_message(root: str, step: int, tmp: Path, failures: list[tuple[int, str]], needed: int) -> str:
    existing = Path(root).absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    previous = latest_step(root)
    kept = f"step {previous} is still the latest checkpoint" if previous else "no earlier checkpoint exists"
    rank, error = failures[0]
    if free < needed or any("No space" in e for _, e in failures):
        cause = (f"no space: the checkpoint of step {step} needs {needed} bytes ({needed / 2**30:.2f} GiB, all "
                 f"ranks), {free} bytes are free there")
        fix = "free space or point --save at a larger disk"
    else:
        cause = f"writing the checkpoint of step {step} failed on rank {rank} ({error})"
        fix = "check the folder's permissions and disk"
    return f"--save {root}: {cause}; the partial {tmp.name} was removed and {kept}; {fix}"


def latest_step(root: str) -> int | None:
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    return int(marker.read_text().strip())


def check_loadable(root: str, layout: dict | None = None) -> int:
    """The step to resume from; raises ValueError naming `--load` when there is nothing complete to load, or (given
    this run's `layout_of` values) when the checkpoint was written with another layout."""
    step = latest_step(root)
    if step is None:
        raise ValueError(f"--load {root}: no {LATEST} inside; point it at a folder written by --save")
    folder = iteration_dir(root, step)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        saved_layout = meta["layout"]
        num_ranks = int(saved_layout["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--load {root}: {LATEST} names step {step} but {folder}/meta.json is missing or "
                         f"unreadable ({type(e).__name__}: {e}); the checkpoint is incomplete") from None
    missing = [name for name in (f"rank_{r:05d}.pt" for r in range(num_ranks)) if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"--load {root}: {folder} lacks {len(missing)} of its {num_ranks} rank files (first: "
                         f"{missing[0]}); the checkpoint is incomplete, restore it or load an earlier one")
    if layout is not None and saved_layout != layout:
        raise ValueError(f"--load {root}: the checkpoint was written with {saved_layout}, this run has {layout}; "
                         "resume with the same ranks and parallel sizes")
    return step


def load(root: str, actor, dataset, layout) -> int:
    """Restore this rank's state from the latest checkpoint; returns its step."""
    step = check_loadable(root, layout_of(layout))
    folder = iteration_dir(root, step)
    meta = json.loads((folder / "meta.json").read_text())
    state = torch.load(folder / f"rank_{layout.rank:05d}.pt", map_location="cpu", weights_only=False)
    actor.load_state_dict(state["actor"])
    torch.set_rng_state(state["torch_rng"])
    dataset.load_state_dict(meta["data"])
    return step
