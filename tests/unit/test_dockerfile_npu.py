"""docker/Dockerfile.npu cannot be built here (no Docker engine, no NPU): these keep it equal to what the code and
pyproject.toml say, so that the image and a launcher-started run cannot drift apart."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from vime_spmd.runtime.launch_env import platform_env

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "docker" / "Dockerfile.npu").read_text()


def image_env() -> dict[str, str]:
    """The `ENV A=1 \\ B=2` instruction that follows the colocate comment."""
    block = DOCKERFILE.split("# The colocate environment")[1].split("\nENV ", 1)[1].split("\nCMD")[0]
    return dict(re.findall(r"(\w+)=(\S+)", block))


def npu_pins() -> dict[str, str]:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["npu"]
    return dict(pin.split("==") for pin in extra)


def test_the_image_sets_the_launchers_ascend_environment_except_the_per_run_preload():
    preload = "/x/torch_memory_saver_hook_mode_preload.so"
    wanted = {v.name: v.value for v in platform_env("npu", preload_library=preload)}
    del wanted["LD_PRELOAD"]  # set by launch/torchrun.sh for the run only; image-wide it would hook every process
    assert image_env() == {**wanted, "DEVICE": "npu"}


def test_the_image_installs_the_npu_extras_torch_and_the_vllm_that_vllm_ascend_was_released_for():
    pins = npu_pins()
    assert f"torch=={pins['torch']} torch-npu=={pins['torch-npu']}" in DOCKERFILE  # installed first, on its own
    assert re.search(r"ARG VLLM_VERSION=(\S+)", DOCKERFILE).group(1) == pins["vllm-ascend"]
    assert "pip install -e '.[npu,test]'" in DOCKERFILE
