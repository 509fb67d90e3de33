"""The accelerator, chosen once: cpu (gloo), cuda (nccl) or npu (hccl).

Everything else receives an `Accelerator` and never asks torch which device it is on. This is the only module
that imports torch_npu.
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


@dataclass(frozen=True)
class Accelerator:
    kind: str  # "cpu" | "cuda" | "npu"
    local_rank: int = 0

    @property
    def backend(self) -> str:
        return BACKENDS[self.kind]

    @property
    def torch_device(self) -> torch.device:
        if self.kind == "cpu":
            return torch.device("cpu")
        return torch.device(self.kind, self.local_rank)

    @property
    def has_device_memory(self) -> bool:
        """Whether training and rollout must time-share device memory (sleep/wake matter)."""
        return self.kind != "cpu"

    def synchronize(self) -> None:
        """Wait for this rank's device work (device copies are asynchronous); a no-op on CPU."""
        if self.kind == "cuda":
            torch.cuda.synchronize(self.torch_device)
        elif self.kind == "npu":
            torch.npu.synchronize(self.torch_device)  # type: ignore[attr-defined]

    def device_count(self) -> int:
        """Devices of this kind on this node (1 for the CPU)."""
        if self.kind == "cuda":
            return torch.cuda.device_count()
        if self.kind == "npu":
            _npu_available()  # imports torch_npu, which registers torch.npu
            return torch.npu.device_count()  # type: ignore[attr-defined]
        return 1


def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers torch.npu)

    return torch.npu.is_available()  # type: ignore[attr-defined]


def resolve_kind(requested: str, *, cuda_available: bool, npu_available: bool) -> str:
    """`--device auto` picks npu, then cuda, then cpu; an explicit choice must be available."""
    if requested not in ("auto", "cpu", "cuda", "npu"):
        raise ValueError(f"--device {requested!r} is not a choice; use auto, cpu, cuda or npu")
    if requested == "auto":
        return "npu" if npu_available else "cuda" if cuda_available else "cpu"
    if requested == "cuda" and not cuda_available:
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    if requested == "npu" and not npu_available:
        raise ValueError("--device npu was asked for but torch_npu is missing or sees no NPU; install torch-npu "
                         "(pip install -e '.[npu]') or use --device cpu")
    return requested


def available_kind(requested: str) -> str:
    """`--device` resolved against the devices this machine has (see `resolve_kind`)."""
    npu = requested in ("auto", "npu") and _npu_available()
    return resolve_kind(requested, cuda_available=torch.cuda.is_available(), npu_available=npu)


def select_accelerator(requested: str) -> Accelerator:
    kind = available_kind(requested)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
    elif kind == "npu":
        torch.npu.set_device(local_rank)  # type: ignore[attr-defined]
    return Accelerator(kind=kind, local_rank=local_rank)


def init_distributed(acc: Accelerator, timeout_minutes: int = 30) -> None:
    """Join the torch.distributed world; without torchrun, form a world of one (debug mode).

    On CPU the world is gloo. On accelerators the default group uses the device backend, and Megatron and vLLM
    build their own gloo groups where they need CPU collectives.
    """
    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        logger.info("no torchrun environment: running as a world of one")
    torch.distributed.init_process_group(backend=acc.backend,
                                         timeout=datetime.timedelta(minutes=timeout_minutes))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_info(acc: Accelerator) -> tuple[int, int]:
    """(free, total) device memory in bytes as the driver sees it (every process on the device); (0, 0) on CPU."""
    if acc.kind == "cuda":
        return torch.cuda.mem_get_info(acc.local_rank)
    if acc.kind == "npu":
        return torch.npu.mem_get_info(acc.local_rank)  # type: ignore[attr-defined]
    return 0, 0


def empty_cache(acc: Accelerator) -> None:
    """Give the caching allocator's unused blocks back to the device, so that the other owner can map them."""
    if acc.kind == "cuda":
        torch.cuda.empty_cache()
    elif acc.kind == "npu":
        torch.npu.empty_cache()  # type: ignore[attr-defined]
