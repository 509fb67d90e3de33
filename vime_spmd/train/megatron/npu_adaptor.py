"""MindSpeed's adaptor: how megatron-core gets Ascend NPU kernels. Applied once, before megatron is imported.

Sources read: MindSpeed branch core_r0.16.0 (the branch for megatron-core 0.16), `mindspeed/megatron_adaptor.py`,
`args_utils.py`, `patch_utils.py`, `features_manager/`, `core/megatron_basic/arguments_basic.py`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Mapping

logger = logging.getLogger(__name__)

ADAPTOR_MODULE = "mindspeed.megatron_adaptor"
# MindSpeed is not on PyPI and its requirements pin numpy<=1.26, which the npu extra's stack cannot take: it is
# installed from source without its dependencies (docker/Dockerfile.npu does exactly this).
INSTALL_HINT = ("install the npu extra (pip install -e '.[npu]') and MindSpeed from source, branch core_r0.16.0 "
                "(git clone -b core_r0.16.0 https://gitcode.com/Ascend/MindSpeed.git && "
                "pip install --no-deps -e MindSpeed), or use docker/Dockerfile.npu")

_applied_flags: dict[str, object] | None = None


def mindspeed_argv(program: str, flags: Mapping[str, object]) -> list[str]:
    """The command line MindSpeed's parser sees: the program name and the feature flags we choose, nothing of ours.
    {"use_flash_attn": True, "sparse_mode": 2} -> [program, "--use-flash-attn", "--sparse-mode", "2"]."""
    argv = [program]
    for name, value in flags.items():
        option = "--" + name.replace("_", "-")
        if value is True:
            argv.append(option)
        elif value is not False and value is not None:
            argv += [option, str(value)]
    return argv


def apply_mindspeed_adaptor(flags: Mapping[str, object] | None = None) -> None:
    """Import `mindspeed.megatron_adaptor`, once, with MindSpeed feature `flags` (none: its basic NPU adaptation).

    Why: megatron-core assumes CUDA, Transformer Engine and apex. The adaptor redirects torch.cuda calls and "cuda"
    devices to the NPU (torch_npu's transfer_to_npu), and puts NPU stand-ins where megatron looks for apex and
    Transformer Engine and NPU kernels into its fused functions, TransformerConfig and grad buffers. Some stand-ins
    are modules megatron probes while it is imported, so MindSpeed (and verl, AReaL, ms-swift with it) imports the
    adaptor before the first megatron import; this function refuses to run after one.

    Why the argv swap: at import MindSpeed parses `sys.argv` with `parse_known_args`, keeps the flags it does not
    know as strings, and copies all of them into every TransformerConfig (our `--tensor-model-parallel-size 2`
    would become a string field). It sees only `flags`; without Megatron-LM's training package it keeps what it
    parsed here for the whole process. The flags that matter on megatron-core: docs/ascend.md."""
    global _applied_flags
    wanted = dict(flags or {})
    if _applied_flags is not None:
        if _applied_flags != wanted:
            raise RuntimeError(f"MindSpeed's adaptor was applied with {_applied_flags}; it cannot be re-applied with "
                               f"{wanted} in the same process")
        return
    if importlib.util.find_spec("mindspeed") is None:
        raise ValueError(f"--device npu: MindSpeed (the `mindspeed` package) is not installed; {INSTALL_HINT}")
    if "megatron.core" in sys.modules:
        raise RuntimeError("MindSpeed's adaptor must be applied before megatron is first imported: get the actor "
                           "through vime_spmd.train.megatron.load_actor(acc), not by importing it directly")
    argv = sys.argv[:]
    sys.argv[:] = mindspeed_argv(argv[0] if argv else "vime_spmd", wanted)
    try:
        importlib.import_module(ADAPTOR_MODULE)
    finally:
        sys.argv[:] = argv
    _applied_flags = wanted
    logger.info("MindSpeed adaptor applied to megatron-core (flags: %s)", wanted or "none")
