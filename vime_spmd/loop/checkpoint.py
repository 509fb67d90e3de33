"""Checkpoints: save and resume a run (policy, optimizer state, data position, step, RNG), atomically, in any layout.

Layout of `--save DIR`:
    DIR/iter_0000010/                    the policy and its optimizer state as a Megatron distributed checkpoint
                                         (torch_dist: .metadata, *.distcp, common.pt, metadata.json), written by the
                                         actor; it loads under any training layout (TP, PP, DP, number of ranks)
    DIR/iter_0000010/rng/rank_00000.pt   each rank's RNG state
    DIR/iter_0000010/meta.json           step, data position, the layout that wrote it, whether optimizer state is in
    DIR/latest_checkpointed_iteration.txt
A checkpoint is written into `iter_X.tmp`, renamed to `iter_X` once every rank has written its part, and only then
named in `latest_checkpointed_iteration.txt` (itself replaced atomically). An interrupted save leaves the previous
checkpoint as the latest; a leftover `.tmp` folder is never read. A write that fails on any rank (a full disk)
removes the `.tmp` folder and raises SaveError on every rank, naming the folder and the bytes needed. `--load DIR`
without a checkpoint inside starts from `--hf-checkpoint` (so `--load X --save X` serves the first launch and every
relaunch). RNG states are restored when the world size is the one that wrote them (resume is then bit-exact);
under another one each rank keeps its seeded state. `--save-hf` folders (`save_hf`) are plain HF model folders,
written the same atomic way.

This module knows folders and files only; the sharded format is the actor's (train/megatron/dist_checkpoint.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from ..runtime.failures import RunError

logger = logging.getLogger(__name__)

LATEST = "latest_checkpointed_iteration.txt"
FORMAT = "torch_dist"
MEGATRON_METADATA = "metadata.json"  # Megatron's marker of a distributed checkpoint folder
_ITERATION = re.compile(r"iter_(\d{7})")


def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def layout_of(layout) -> dict:
    """What a checkpoint records of the training layout that wrote it (for RNG states and the log)."""
    return {"world_size": layout.world_size, "tensor_model_parallel_size": layout.tp_size,
            "pipeline_model_parallel_size": layout.pp_size}


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(root: str, step: int, actor, dataset, layout, *, with_optimizer: bool = True,
         keep_last: int | None = None) -> Path:
    """Every rank calls this; returns the checkpoint folder. `keep_last`: then delete all but the newest that many.
    A failed write on any rank (a full disk, say) raises SaveError on every rank, after the partial `.tmp` folder is
    removed; the latest checkpoint stays the latest."""
    final = iteration_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    num_bytes = actor.checkpoint_bytes(with_optimizer)

    def make_tmp() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)

    def finish() -> None:
        meta = {"format": FORMAT, "step": step, "data": dataset.state_dict(), "layout": layout_of(layout),
                "optimizer": with_optimizer, "distributed_optimizer": actor.distributed_optimizer}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _replace_text(Path(root) / LATEST, str(step))
        if keep_last:
            prune(root, keep_last)

    # Each stage ends in a gather of every rank's outcome, which is also the barrier the next stage needs. The
    # actor's sharded write is itself collective (every rank writes its pieces, then the metadata is gathered).
    stages = [(make_tmp, layout.rank == 0), (lambda: actor.save_checkpoint(tmp, step, with_optimizer), True),
              (lambda: torch.save({"torch_rng": torch.get_rng_state()}, tmp / "rng" / f"rank_{layout.rank:05d}.pt"),
               True),
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
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: list it by name

    try:
        stage()
    except (OSError, RuntimeError, CheckpointException) as e:  # torch.save reports a full disk as RuntimeError
        return f"{type(e).__name__}: {e}"
    return None


def _failure_message(root: str, step: int, tmp: Path, failures: list[tuple[int, str]], needed: int) -> str:
    existing = Path(root).absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    previous = latest_step(root)
    kept = f"step {previous} is still the latest checkpoint" if previous else "no earlier checkpoint exists"
    rank, error = failures[0]
    if free < needed or any("No space" in e or "ENOSPC" in e for _, e in failures):
        cause = (f"no space: the checkpoint of step {step} needs {needed} bytes ({needed / 2**30:.2f} GiB, all "
                 f"ranks), {free} bytes are free there")
        fix = "free space or point --save at a larger disk"
    else:
        cause = f"writing the checkpoint of step {step} failed on rank {rank} ({error})"
        fix = "check the folder's permissions and disk"
    return f"--save {root}: {cause}; the partial {tmp.name} was removed and {kept}; {fix}"


def prune(root: str, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` (never the latest); returns what went."""
    latest = latest_step(root)
    steps = sorted(int(m.group(1)) for p in Path(root).iterdir() if (m := _ITERATION.fullmatch(p.name)))
    doomed = [iteration_dir(root, s) for s in steps[:-keep_last] if s != latest]
    for folder in doomed:
        shutil.rmtree(folder)
    if doomed:
        logger.info("--keep-last-n-checkpoints %d: removed %s", keep_last, ", ".join(p.name for p in doomed))
    return doomed


def latest_step(root: str) -> int | None:
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{marker} holds {text!r}, not a step number; fix or remove it")
    return int(text)


def check_loadable(root: str) -> int | None:
    """The step to resume from, or None when `root` holds no checkpoint yet (the run starts from --hf-checkpoint).
    Raises ValueError naming `--load` when the latest checkpoint is incomplete or in a format this version refuses."""
    step = latest_step(root)
    if step is None:
        return None
    folder = iteration_dir(root, step)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") == FORMAT:
            num_ranks = int(meta["layout"]["world_size"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--load {root}: {LATEST} names step {step} but {folder}/meta.json is missing or "
                         f"unreadable ({type(e).__name__}: {e}); the checkpoint is incomplete") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"--load {root}: {folder} is in the per-rank format of earlier vime-spmd versions, which "
                         f"this version does not read; resume it with the version that wrote it (export it to an HF "
                         f"folder with that version's vime_spmd.tools.export_hf and pass that as --hf-checkpoint)")
    needed = [MEGATRON_METADATA, *(f"rng/rank_{r:05d}.pt" for r in range(num_ranks))]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"--load {root}: {folder} lacks {len(missing)} of its files (first: {missing[0]}); the "
                         f"checkpoint is incomplete, restore it or load an earlier one")
    return step


def load(root: str, actor, dataset, layout, *, with_optimizer: bool = True) -> int:
    """Restore the latest checkpoint in `root` into this rank (whatever layout wrote it); returns its step, or 0 when
    there is none (the actor keeps its --hf-checkpoint weights)."""
    step = check_loadable(root)
    if step is None:
        logger.info("--load %s: no checkpoint inside; starting from --hf-checkpoint", root)
        return 0
    folder = iteration_dir(root, step)
    meta = json.loads((folder / "meta.json").read_text())
    with_optimizer = with_optimizer and meta["optimizer"]
    if not meta["optimizer"]:
        logger.info("--load %s: step %d was saved with --no-save-optim; the optimizer starts afresh", root, step)
    if with_optimizer and meta.get("distributed_optimizer", False) != actor.distributed_optimizer:
        flag = "with" if meta.get("distributed_optimizer") else "without"
        raise ValueError(f"--load {root}: step {step}'s optimizer state was written {flag} "
                         f"--use-distributed-optimizer; resume {flag} that flag")
    actor.load_checkpoint(folder, with_optimizer)
    written_by = meta["layout"]
    if written_by["world_size"] == layout.world_size:
        torch.set_rng_state(torch.load(folder / "rng" / f"rank_{layout.rank:05d}.pt")["torch_rng"])
    else:
        logger.info("--load %s: written by %d ranks, this run has %d: RNG states keep their seeds", root,
                    written_by["world_size"], layout.world_size)
    if written_by != layout_of(layout):
        logger.info("--load %s: resharded from %s to %s", root, written_by, layout_of(layout))
    dataset.load_state_dict(meta["data"])
    return step


def model_checkpoint(path: str, flag: str) -> Path | None:
    """For a flag that takes a model (`--ref-load`): None for an HF model folder, else the torch_dist checkpoint
    folder it names (a `--save` folder's latest checkpoint, or one `iter_*` folder). Raises ValueError otherwise."""
    where = Path(path)
    if (where / "config.json").is_file():
        return None
    if (where / LATEST).is_file():
        where = iteration_dir(where, check_loadable(path))
    if (where / MEGATRON_METADATA).is_file():
        return where
    raise ValueError(f"{flag} {path}: neither an HF model folder (no config.json) nor a torch_dist checkpoint (no "
                     f"{LATEST} or {MEGATRON_METADATA}); give one of those")


HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")


def hf_folder(template: str, step: int) -> Path:
    """Where `--save-hf TEMPLATE` puts step `step`: TEMPLATE with `{rollout_id}` filled in (slime's form), else
    TEMPLATE/iter_XXXXXXX."""
    return Path(template.format(rollout_id=step)) if "{rollout_id}" in template else iteration_dir(template, step)


def save_hf(out: str | Path, weights: Iterable[tuple[str, torch.Tensor]], base: str, step: int, rank: int) -> None:
    """Every rank calls this with the same collective iterator of full HF tensors; rank 0 writes them, with the base
    model's config and tokenizer files, into `out` (as `out.tmp`, renamed when complete)."""
    from safetensors.torch import save_file

    kept = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in weights if rank == 0}
    if rank != 0:
        return
    final = Path(out)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in HF_FILES:
        if (Path(base) / name).is_file():
            shutil.copy(Path(base) / name, tmp / name)
    save_file(kept, str(tmp / "model.safetensors"), metadata={"format": "pt", "vime_step": str(step)})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
