"""The launch environment per platform (each variable with its reason) and torchrun's rendezvous under Slurm."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vime_spmd.runtime.launch_env import (
    HCCL_CONNECT_TIMEOUT_S,
    export_lines,
    find_preload_library,
    first_host,
    missing_env,
    platform_env,
    slurm_rendezvous,
    torchrun_args,
)

ROOT = Path(__file__).resolve().parents[2]
LIB = "/site/torch_memory_saver_hook_mode_preload.abi3.so"
ASCEND_ONLY = {"PYTORCH_NPU_ALLOC_CONF", "TMS_HOOK_MODE", "LD_PRELOAD", "TMS_INIT_ENABLE",
               "TMS_INIT_ENABLE_CPU_BACKUP", "VLLM_ASCEND_ENABLE_NZ", "HCCL_CONNECT_TIMEOUT"}


def as_dict(kind: str, **kw) -> dict[str, str]:
    return {v.name: v.value for v in platform_env(kind, **kw)}


def test_npu_gets_every_ascend_variable_each_with_a_reason():
    env = platform_env("npu", preload_library=LIB)
    assert {v.name: v.value for v in env} == {
        "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:False",
        "TMS_HOOK_MODE": "preload",
        "LD_PRELOAD": LIB,  # alone: the Ascend torch_memory_saver reads its path back from it
        "TMS_INIT_ENABLE": "1",
        "TMS_INIT_ENABLE_CPU_BACKUP": "1",
        "VLLM_ASCEND_ENABLE_NZ": "0",
        "HCCL_CONNECT_TIMEOUT": str(HCCL_CONNECT_TIMEOUT_S),
    }
    assert all(v.reason and "\n" not in v.reason for v in env)


def test_cuda_and_cpu_get_no_ascend_variables():
    assert as_dict("cuda") == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}
    assert as_dict("cpu") == {}
    assert not ASCEND_ONLY & set(as_dict("cuda"))


def test_npu_without_the_preload_library_says_what_to_install(monkeypatch):
    monkeypatch.setattr("vime_spmd.runtime.launch_env.find_preload_library", lambda: None)
    with pytest.raises(ValueError, match="Ascend build of torch_memory_saver"):
        platform_env("npu")


def test_preload_library_is_found_next_to_the_package(tmp_path):
    (tmp_path / "torch_memory_saver").mkdir()
    (tmp_path / "torch_memory_saver_hook_mode_torch.abi3.so").touch()
    (tmp_path / "torch_memory_saver_hook_mode_preload.abi3.so").touch()
    assert find_preload_library([tmp_path]) == str(tmp_path / "torch_memory_saver_hook_mode_preload.abi3.so")
    assert find_preload_library([tmp_path / "torch_memory_saver"]) is None


def test_export_lines_set_the_values_in_a_shell():
    lines = export_lines(platform_env("npu", preload_library="/odd path/torch_memory_saver_hook_mode_preload.so"))
    out = subprocess.run(["bash", "-c", lines + 'echo "$LD_PRELOAD|$HCCL_CONNECT_TIMEOUT|$TMS_HOOK_MODE"'],
                         capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == f"/odd path/torch_memory_saver_hook_mode_preload.so|{HCCL_CONNECT_TIMEOUT_S}|preload"
    assert all("  # " in line for line in lines.splitlines())  # every export carries its reason


def test_missing_env_names_what_a_bare_torchrun_lacks():
    assert {v.name for v in missing_env("npu", {})} == ASCEND_ONLY
    launched = {**as_dict("npu", preload_library=LIB)}
    assert missing_env("npu", launched) == []
    assert [v.name for v in missing_env("npu", {**launched, "LD_PRELOAD": "/usr/lib/libjemalloc.so"})] == \
        ["LD_PRELOAD"]
    assert [v.name for v in missing_env("cuda", {})] == ["PYTORCH_CUDA_ALLOC_CONF"]
    assert missing_env("cpu", {}) == []


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[003-004,007],cpu1", "gpu003"),
    ("node7", "node7"),
    ("a1,b2", "a1"),
    ("rack[1-2]-n[5-6]", "rack1-n5"),
    ("n[12]", "n12"),
])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


SLURM = {"SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "12345",
         "SLURM_GPUS_ON_NODE": "8"}


def test_slurm_variables_map_onto_torchrun_rendezvous():
    assert slurm_rendezvous(SLURM) == {"nnodes": "2", "node-rank": "1", "nproc-per-node": "8",
                                       "master-addr": "gpu003", "master-port": str(20000 + 12345)}
    assert torchrun_args(slurm_rendezvous(SLURM)).split() == [
        "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "8", "--master-addr", "gpu003",
        "--master-port", "32345"]


def test_slurm_overrides_and_missing_values():
    r = slurm_rendezvous({**SLURM, "NPROC_PER_NODE": "16", "MASTER_PORT": "29400", "MASTER_ADDR": "head"})
    assert (r["nproc-per-node"], r["master-port"], r["master-addr"]) == ("16", "29400", "head")
    no_gpus = {k: v for k, v in SLURM.items() if k != "SLURM_GPUS_ON_NODE"}
    with pytest.raises(ValueError, match="NPROC_PER_NODE"):
        slurm_rendezvous(no_gpus)
    with pytest.raises(ValueError, match="SLURM_NODEID"):
        slurm_rendezvous({k: v for k, v in SLURM.items() if k != "SLURM_NODEID"})


@pytest.mark.parametrize("script", ["launch/torchrun.sh", "launch/slurm.sbatch"])
def test_launch_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)
