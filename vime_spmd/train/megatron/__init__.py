"""The Megatron-core training backend: the only package that imports megatron.

Importing this package does not import megatron: `load_actor(acc)` applies the accelerator's patches first and
then imports the actor, because on Ascend MindSpeed must patch megatron-core before its first import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...runtime.device import Accelerator
from . import patches
from .patches import apply_platform_patches

if TYPE_CHECKING:
    from .actor import MegatronActor
    from .export import MegatronExport  # noqa: F401

# The HF `model_type`s the backend converts (families.py serves exactly these; a test holds them equal). Here, where
# nothing imports megatron, so that the input checks can refuse another type before any work, on NPU too (where
# megatron must not be imported before MindSpeed's adaptor).
MODEL_TYPES = ("llama", "qwen2", "qwen3")

def load_actor(acc: Accelerator) -> type[MegatronActor]:
    """The actor class, imported after `acc`'s patches were applied (the only order that works on NPU)."""
    patches.apply_platform_patches(acc)
    from .actor import MegatronActor

    return MegatronActor


def __getattr__(name: str):
    # `from vime_spmd.train.megatron import MegatronActor` still works where no patch must precede megatron's
    # import (CPU and CUDA scripts); on NPU the actor itself refuses to be built without the adaptor.
    if name == "MegatronActor":
        from .actor import MegatronActor

        return MegatronActor
    if name == "MegatronExport":
        from .export import MegatronExport

        return MegatronExport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MegatronActor", "MegatronExport", "apply_platform_patches", "load_actor"]
