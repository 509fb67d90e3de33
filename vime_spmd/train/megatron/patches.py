"""The one place that chooses what megatron-core is patched with, per accelerator. Its own module, imported by the
package and by the actor alike, so that nothing in the package imports upward."""

from __future__ import annotations

from ...runtime.device import Accelerator

# MindSpeed feature flags for our runs (npu_adaptor.mindspeed_argv); none yet: its basic NPU adaptation.
MINDSPEED_FLAGS: dict[str, object] = {}


def apply_platform_patches(acc: Accelerator) -> None:
    """The one place that chooses what megatron-core is patched with on `acc`: MindSpeed's adaptor on NPU (before
    megatron is imported), our CPU shims on CPU, nothing on CUDA. Idempotent."""
    if acc.kind == "npu":
        from .npu_adaptor import apply_mindspeed_adaptor

        apply_mindspeed_adaptor(MINDSPEED_FLAGS)
    elif acc.kind == "cpu":
        from .cpu_patches import apply_cpu_patches

        apply_cpu_patches()
