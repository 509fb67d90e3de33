"""The actor's weights and optimizer state as a Megatron distributed checkpoint (torch_dist), in any training layout.

Every rank contributes its pieces described as `ShardedTensor`s (the model's `sharded_state_dict()`: each piece's
place in the global tensor, with pipeline stages' layers at their global index; the optimizer's
`sharded_state_dict(model_sharded_sd)`: Adam's moments and main params shaped like those pieces). torch.distributed's
checkpoint writer stores global tensors, so a later run reads whatever pieces its own layout needs: TP, PP and DP may
all differ. The state dict has the shape Megatron-LM gives its checkpoints ("model", "optimizer", "iteration",
"checkpoint_version"), so a folder written here is a Megatron-LM `iter_*` checkpoint of the same model (with
Megatron's local layer spec).

Only the sharded state lives here; the folder layout, the atomic rename, data position and RNG states are
`vime_spmd.loop.checkpoint`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3.0  # Megatron-LM's, for the torch_dist format
BACKEND = ("torch_dist", 1)


def _in_process_write_results() -> None:
    """Megatron's torch_dist writer returns each file's write results through a queue served by a multiprocessing
    Manager, a process it spawns at the first save (a fresh interpreter that re-imports the main module: seconds
    on CPU) so that an asynchronous save can report from its own process. Our saves are synchronous: the results
    never leave this process, so a plain thread-safe queue carries them. Idempotent."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_vime_in_process_queue", False):
        return
    filesystem_async._results_queue = queue.Queue()
    filesystem_async._vime_in_process_queue = True


def _sharded_state(model: torch.nn.Module, optimizer, scheduler, step: int, is_loading: bool) -> dict:
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd, "iteration": step, "checkpoint_version": CHECKPOINT_VERSION}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    if scheduler is not None:
        # The learning-rate schedule's position: common (unsharded) state, under Megatron-LM's key; saved also without
        # the optimizer (--no-save-optim), so that a resumed run continues its schedule.
        state["opt_param_scheduler"] = scheduler.state_dict()
    return state


def save(folder: str | Path, model: torch.nn.Module, optimizer, scheduler, step: int) -> None:
    """Every rank calls this: write the model's pieces (and, unless None, the optimizer's, and the learning-rate
    `scheduler`'s position) into the empty `folder`, which every rank can reach."""
    _in_process_write_results()
    dist_checkpointing.save(_sharded_state(model, optimizer, scheduler, step, is_loading=False), str(folder),
                            sharded_strategy=BACKEND)


def load(folder: str | Path, model: torch.nn.Module, optimizer=None, scheduler=None) -> None:
    """Every rank calls this: fill `model` (and `optimizer` and `scheduler`, unless None) with this layout's pieces of
    the checkpoint in `folder`, whatever layout wrote it."""
    state = dist_checkpointing.load(_sharded_state(model, optimizer, scheduler, 0, is_loading=True), str(folder))
    model.load_state_dict(state["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in state:  # absent from older weights-only checkpoints
        scheduler.load_state_dict(state["opt_param_scheduler"])
