"""The process environment a colocated run needs per platform, and torchrun's rendezvous under Slurm.

Some settings must exist before the process starts (LD_PRELOAD) or before torch / torch_npu / vLLM read them, so
they are set by the launcher, not by run.py. `launch/torchrun.sh` and `launch/slurm.sbatch` print and apply them:

    python -m vime_spmd.runtime.launch_env --device npu     # `export NAME=value  # why` lines, for eval
    python -m vime_spmd.runtime.launch_env --slurm          # torchrun's --nnodes/--node-rank/--master-* from SLURM_*
    python -m vime_spmd.runtime.launch_env --device auto --count   # devices on this node

CPU needs nothing. Every variable carries the one-line reason it is there.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PRELOAD_LIBRARY_GLOB = "torch_memory_saver_hook_mode_preload*.so"
HCCL_CONNECT_TIMEOUT_S = 7200


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: str
    reason: str


def platform_env(kind: str, preload_library: str | None = None) -> list[EnvVar]:
    """The variables a colocated run on `kind` (cpu, cuda, npu) sets before starting. On npu the preload library
    of torch_memory_saver is looked up in the installed package unless given."""
    if kind == "cpu":
        return []
    if kind == "cuda":
        return [
            EnvVar("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False",
                   "torch_memory_saver refuses to run with expandable segments, and vLLM's sleep-mode pool cannot use "
                   "them either"),
        ]
    if kind != "npu":
        raise ValueError(f"--device {kind!r}: no launch environment for it; use cpu, cuda or npu")
    library = preload_library or find_preload_library()
    if library is None:
        raise ValueError("torch_memory_saver's preload library (torch_memory_saver_hook_mode_preload*.so) was not "
                         "found: install the Ascend build of torch_memory_saver (sgl-kernel-npu, "
                         "contrib/torch_memory_saver) into this environment")
    return [
        EnvVar("PYTORCH_NPU_ALLOC_CONF", "expandable_segments:False",
               "torch_memory_saver and vLLM-Ascend's sleep-mode allocator map fixed segments; expandable segments "
               "remap memory under them"),
        EnvVar("TMS_HOOK_MODE", "preload",
               "the Ascend torch_memory_saver takes its hook from this variable; preload hooks CANN's allocation "
               "calls (aclrtMallocAlign32/aclrtFree) for the whole process"),
        EnvVar("LD_PRELOAD", library,
               "the preload hook must be loaded before CANN; the Ascend torch_memory_saver reads its library path "
               "back from LD_PRELOAD, so it must be the only entry"),
        EnvVar("TMS_INIT_ENABLE", "1",
               "the hook's per-thread 'in a region' flag starts from this: allocations on threads that never "
               "entered a region (autograd's) still go through the saver, under the untagged 'default' tag that "
               "this program never pauses"),
        EnvVar("TMS_INIT_ENABLE_CPU_BACKUP", "1",
               "the 'default' tag keeps a host copy if anything pauses it, so memory not classified as rebuildable "
               "is never silently lost; the trainer's own tags set their backup explicitly"),
        EnvVar("VLLM_ASCEND_ENABLE_NZ", "0",
               "keep the engine's weights in the ND layout the trainer sends; FRACTAL_NZ weights converted at load "
               "are not updated correctly in place"),
        EnvVar("HCCL_CONNECT_TIMEOUT", str(HCCL_CONNECT_TIMEOUT_S),
               "HCCL builds a group's communicator at its first collective and waits for every rank; in a "
               "colocated step one rank can arrive a whole rollout before another (default 120 s)"),
    ]


def find_preload_library(search_dirs: list[Path] | None = None) -> str | None:
    """Path of torch_memory_saver's preload library, found without importing torch_memory_saver (which would
    initialise the accelerator runtime): its wheels put the library next to the package."""
    if search_dirs is None:
        spec = importlib.util.find_spec("torch_memory_saver")
        if spec is None or spec.origin is None:
            return None
        package = Path(spec.origin).parent
        search_dirs = [package.parent, package]
    found = sorted(str(p) for d in search_dirs for p in Path(d).glob(PRELOAD_LIBRARY_GLOB))
    return found[0] if found else None


def missing_env(kind: str, environ: Mapping[str, str] = os.environ) -> list[EnvVar]:
    """The platform variables this process lacks or has with another value (LD_PRELOAD: must name the preload
    library). Empty when the run was launched through launch/."""
    wanted = platform_env(kind, preload_library="<torch_memory_saver preload library>") if kind != "cpu" else []
    missing = []
    for var in wanted:
        have = environ.get(var.name)
        ok = (PRELOAD_LIBRARY_GLOB.split("*")[0] in (have or "")) if var.name == "LD_PRELOAD" else have == var.value
        if not ok:
            missing.append(var)
    return missing


def export_lines(env: list[EnvVar]) -> str:
    return "".join(f"export {v.name}={shlex.quote(v.value)}  # {v.reason}\n" for v in env)


# ---- Slurm -----------------------------------------------------------------------------------------------------

MASTER_PORT_BASE, MASTER_PORT_SPAN = 20000, 40000


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: 'gpu[003-004,007],cpu1' -> 'gpu003', 'rack[1-2]-n[5-6]' -> 'rack1-n5'."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    if not first:
        raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r}: no host in it")
    return re.sub(r"\[([^\],\-]+)[^\]]*\]", r"\1", first)


def slurm_rendezvous(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """torchrun's static rendezvous for this Slurm task (one task per node): every node derives the same master
    address (the first host) and port (from the job id, so that jobs sharing a node do not collide)."""
    def need(name: str) -> str:
        if name not in environ:
            raise ValueError(f"{name} is not set: run inside a Slurm allocation (sbatch launch/slurm.sbatch ...)")
        return environ[name]

    nproc = environ.get("NPROC_PER_NODE") or environ.get("SLURM_GPUS_ON_NODE")
    if not nproc:
        raise ValueError("devices per node unknown: Slurm set no SLURM_GPUS_ON_NODE (NPUs are often not Slurm "
                         "GPUs); set NPROC_PER_NODE")
    port = environ.get("MASTER_PORT") or str(MASTER_PORT_BASE + int(need("SLURM_JOB_ID")) % MASTER_PORT_SPAN)
    return {
        "nnodes": need("SLURM_NNODES"),
        "node-rank": need("SLURM_NODEID"),
        "nproc-per-node": nproc,
        "master-addr": environ.get("MASTER_ADDR") or first_host(need("SLURM_JOB_NODELIST")),
        "master-port": port,
    }


def torchrun_args(rendezvous: dict[str, str]) -> str:
    return " ".join(f"--{k} {shlex.quote(v)}" for k, v in rendezvous.items())


# ---- command line ----------------------------------------------------------------------------------------------

def _resolve(device: str) -> str:
    if device != "auto":
        return device
    from .device import available_kind

    return available_kind("auto")


def _device_count(kind: str) -> int:
    from .device import Accelerator

    return Accelerator(kind=kind).device_count()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "npu"])
    parser.add_argument("--count", action="store_true", help="print the number of devices on this node")
    parser.add_argument("--slurm", action="store_true", help="print torchrun's rendezvous flags from SLURM_*")
    args = parser.parse_args(argv)
    try:
        if args.slurm:
            print(torchrun_args(slurm_rendezvous()))
        elif args.count:
            print(_device_count(_resolve(args.device)))
        else:
            sys.stdout.write(export_lines(platform_env(_resolve(args.device))))
    except ValueError as e:
        print(f"launch_env: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
