"""The Megatron-core training backend: the only package that imports megatron."""

from .actor import MegatronActor
from .export import MegatronExport

__all__ = ["MegatronActor", "MegatronExport"]
