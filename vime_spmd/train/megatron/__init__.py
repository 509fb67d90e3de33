"""The Megatron-core training backend: the only package that imports megatron."""

from .actor import MegatronActor

__all__ = ["MegatronActor"]
