"""Which accelerator gets MindSpeed's adaptor, and how it is applied. MindSpeed is a fake package written to a
temporary folder, imported for real: its adaptor module records each time it runs and the command line it saw."""

from __future__ import annotations

import sys

import pytest

import vime_spmd.train.megatron as backend
from vime_spmd.runtime.device import Accelerator
from vime_spmd.train.megatron import npu_adaptor, patches

FAKE_ADAPTOR = """
import sys
import mindspeed
mindspeed.RUNS.append(list(sys.argv))
"""


@pytest.fixture
def fake_mindspeed(tmp_path, monkeypatch):
    """A `mindspeed` package whose `megatron_adaptor` appends the argv it sees to `mindspeed.RUNS` on import; a
    process where neither megatron nor the adaptor was imported yet; CPU shims recorded instead of applied."""
    package = tmp_path / "mindspeed"
    package.mkdir()
    (package / "__init__.py").write_text("RUNS = []\n")
    (package / "megatron_adaptor.py").write_text(FAKE_ADAPTOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "megatron.core", raising=False)  # restored after the test
    monkeypatch.setattr(npu_adaptor, "_applied_flags", None)
    cpu_calls = []
    monkeypatch.setattr("vime_spmd.train.megatron.cpu_patches.apply_cpu_patches", lambda: cpu_calls.append(1))
    yield cpu_calls
    for name in ("mindspeed.megatron_adaptor", "mindspeed"):
        sys.modules.pop(name, None)


def runs() -> list[list[str]]:
    return sys.modules["mindspeed"].RUNS if "mindspeed" in sys.modules else []


def test_npu_applies_the_adaptor_once_and_hides_our_command_line(fake_mindspeed, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["run.py", "--tensor-model-parallel-size", "2", "--lr", "1e-6"])
    backend.apply_platform_patches(Accelerator("npu"))
    backend.apply_platform_patches(Accelerator("npu", local_rank=3))
    assert runs() == [["run.py"]]  # imported once, seeing none of our flags
    assert sys.argv == ["run.py", "--tensor-model-parallel-size", "2", "--lr", "1e-6"]  # restored
    assert fake_mindspeed == []  # no CPU shims on NPU


def test_the_adaptor_sees_exactly_the_feature_flags_we_choose(fake_mindspeed, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["run.py", "--use-kl-loss"])
    flags = {"use_flash_attn": True, "sparse_mode": 2, "use_fused_swiglu": False}
    monkeypatch.setattr(patches, "MINDSPEED_FLAGS", flags)
    backend.apply_platform_patches(Accelerator("npu"))
    assert runs() == [["run.py", "--use-flash-attn", "--sparse-mode", "2"]]  # False: the flag is left out


def test_cpu_and_cuda_never_import_mindspeed(fake_mindspeed):
    backend.apply_platform_patches(Accelerator("cuda"))
    backend.apply_platform_patches(Accelerator("cpu"))
    assert "mindspeed" not in sys.modules and runs() == []
    assert fake_mindspeed == [1]  # the CPU shims, on CPU only


def test_npu_without_mindspeed_names_the_extra_and_the_source_install(monkeypatch):
    monkeypatch.setattr(npu_adaptor, "_applied_flags", None)
    monkeypatch.setattr(npu_adaptor.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"--device npu.*MindSpeed.*\.\[npu\].*core_r0\.16\.0"):
        backend.apply_platform_patches(Accelerator("npu"))
    assert npu_adaptor._applied_flags is None  # nothing was applied; a later call tries again


def test_the_adaptor_refuses_to_patch_an_already_imported_megatron(fake_mindspeed, monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.core", object())
    with pytest.raises(RuntimeError, match="before megatron is first imported.*load_actor"):
        backend.apply_platform_patches(Accelerator("npu"))
    assert runs() == []


def test_other_flags_in_the_same_process_are_refused(fake_mindspeed):
    npu_adaptor.apply_mindspeed_adaptor({})
    with pytest.raises(RuntimeError, match="cannot be re-applied"):
        npu_adaptor.apply_mindspeed_adaptor({"use_flash_attn": True})
    assert len(runs()) == 1


def test_load_actor_applies_the_patches_before_importing_the_actor(monkeypatch):
    actor_module = "vime_spmd.train.megatron.actor"
    monkeypatch.delitem(sys.modules, actor_module, raising=False)  # as in a fresh process; restored after
    monkeypatch.setattr(backend, "actor", None, raising=False)
    seen = []
    monkeypatch.setattr(patches, "apply_platform_patches",
                        lambda acc: seen.append((acc.kind, actor_module in sys.modules)))
    actor_class = backend.load_actor(Accelerator("cuda"))
    assert seen == [("cuda", False)]  # patched while the actor (and so megatron, on NPU) was not imported yet
    assert actor_class is sys.modules[actor_module].MegatronActor
