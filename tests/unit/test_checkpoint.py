"""Checkpoint folders: atomic writes, the --load fallback, pruning, formats refused (a world of one, gloo, no model:
the actor's sharded format is exercised by tests/integration/test_checkpoint.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.distributed as dist

from vime_spmd.loop import checkpoint
from vime_spmd.parallel import Layout


class FakeActor:
    """Writes its weights (and, when asked, an optimizer value) into the checkpoint folder, as the real one does."""

    distributed_optimizer = False

    def __init__(self, value: float) -> None:
        self.weights, self.optimizer_value = torch.full((3,), value), value * 10
        self.loaded_optimizer: bool | None = None

    def checkpoint_bytes(self, with_optimizer: bool) -> int:
        return self.weights.numel() * self.weights.element_size()

    def save_checkpoint(self, folder, step: int, with_optimizer: bool) -> None:
        torch.save({"w": self.weights, "opt": self.optimizer_value if with_optimizer else None}, folder / "fake.pt")
        (folder / checkpoint.MEGATRON_METADATA).write_text("{}")

    def load_checkpoint(self, folder, with_optimizer: bool) -> None:
        state = torch.load(folder / "fake.pt")
        self.weights, self.loaded_optimizer = state["w"], with_optimizer
        if with_optimizer:
            self.optimizer_value = state["opt"]


class FakeData:
    def __init__(self, position: int) -> None:
        self.position = position

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


@pytest.fixture
def world(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield Layout(rank=0, world_size=1, tp_size=1, engine_size=1)
    dist.destroy_process_group()


def test_save_then_load_round_trips_weights_optimizer_data_and_rng(world, tmp_path):
    root = tmp_path / "ckpt"
    torch.manual_seed(3)
    checkpoint.save(str(root), 7, FakeActor(1.5), FakeData(28), world)
    expected_draw = torch.rand(4)  # what the saved RNG state draws next
    actor, data = FakeActor(0.0), FakeData(0)
    assert checkpoint.load(str(root), actor, data, world) == 7
    assert torch.equal(actor.weights, torch.full((3,), 1.5)) and actor.optimizer_value == 15.0
    assert data.position == 28
    assert torch.equal(torch.rand(4), expected_draw)


def test_an_interrupted_save_leaves_the_previous_checkpoint_latest(world, tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    checkpoint.save(str(root), 1, FakeActor(1.0), FakeData(4), world)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(checkpoint.SaveError, match="failed on rank 0 \\(OSError: disk full\\)"):
        checkpoint.save(str(root), 2, FakeActor(2.0), FakeData(8), world)
    monkeypatch.undo()
    assert checkpoint.latest_step(str(root)) == 1
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    actor = FakeActor(0.0)
    checkpoint.load(str(root), actor, FakeData(0), world)
    assert torch.equal(actor.weights, torch.full((3,), 1.0))


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_load_without_a_checkpoint_starts_from_the_initial_weights(world, tmp_path, folder):
    (tmp_path / "empty").mkdir()
    actor, data = FakeActor(0.5), FakeData(0)
    assert checkpoint.check_loadable(str(tmp_path / folder)) is None
    assert checkpoint.load(str(tmp_path / folder), actor, data, world) == 0
    assert torch.equal(actor.weights, torch.full((3,), 0.5)) and data.position == 0


def test_a_checkpoint_without_optimizer_state_loads_weights_only(world, tmp_path):
    root = tmp_path / "ckpt"
    checkpoint.save(str(root), 2, FakeActor(1.0), FakeData(4), world, with_optimizer=False)
    actor = FakeActor(0.0)
    checkpoint.load(str(root), actor, FakeData(0), world)
    assert torch.equal(actor.weights, torch.full((3,), 1.0))
    assert actor.loaded_optimizer is False and actor.optimizer_value == 0.0


def test_keep_last_n_deletes_older_checkpoints_only(world, tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2, 3, 4):
        checkpoint.save(str(root), step, FakeActor(float(step)), FakeData(step), world, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000003", "iter_0000004", checkpoint.LATEST]
    actor = FakeActor(0.0)
    assert checkpoint.load(str(root), actor, FakeData(0), world) == 4


def test_the_per_rank_format_of_earlier_versions_is_refused_naming_the_way_out(world, tmp_path):
    root = tmp_path / "ckpt"
    old = root / "iter_0000003"
    old.mkdir(parents=True)
    torch.save({"actor": {}}, old / "rank_00000.pt")
    (old / "meta.json").write_text(json.dumps({"step": 3, "data": {"position": 4}, "layout": {}}))
    (root / checkpoint.LATEST).write_text("3")
    with pytest.raises(ValueError, match="--load .*per-rank format.*export_hf"):
        checkpoint.check_loadable(str(root))


def test_an_incomplete_latest_checkpoint_is_refused(world, tmp_path):
    (tmp_path / checkpoint.LATEST).write_text("5")
    with pytest.raises(ValueError, match="names step 5 but .*iter_0000005/meta.json is missing or unreadable"):
        checkpoint.check_loadable(str(tmp_path))


def test_a_model_flag_takes_an_hf_folder_or_a_torch_dist_checkpoint(world, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert checkpoint.model_checkpoint(str(hf), "--ref-load") is None
    root = tmp_path / "ckpt"
    folder = checkpoint.save(str(root), 6, FakeActor(1.0), FakeData(4), world)
    assert checkpoint.model_checkpoint(str(root), "--ref-load") == folder
    assert checkpoint.model_checkpoint(str(folder), "--ref-load") == folder
    with pytest.raises(ValueError, match="--ref-load .*neither an HF model folder"):
        checkpoint.model_checkpoint(str(tmp_path), "--ref-load")


def test_hf_folders_follow_the_template(tmp_path):
    assert checkpoint.hf_folder(str(tmp_path / "hf"), 12) == tmp_path / "hf" / "iter_0000012"
    assert checkpoint.hf_folder(str(tmp_path / "hf_{rollout_id}"), 12) == tmp_path / "hf_12"


def test_a_full_disk_names_the_folder_and_bytes_needed_and_keeps_the_latest(world, tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    checkpoint.save(str(root), 1, FakeActor(1.0), FakeData(4), world)
    real_save = torch.save

    def save_until_the_disk_is_full(obj, path):
        real_save(obj, path)  # a partial file is on disk when the error comes, as with a real full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 1000))
    actor = FakeActor(2.0)
    actor.weights = torch.zeros(1 << 20)  # 4 MiB of float32
    needed = 4 * (1 << 20)
    with pytest.raises(checkpoint.SaveError) as error:
        checkpoint.save(str(root), 2, actor, FakeData(8), world)
    assert str(error.value) == (f"--save {root}: no space: the checkpoint of step 2 needs {needed} bytes (0.00 GiB, "
                                "all ranks), 1000 bytes are free there; the partial iter_0000002.tmp was removed and "
                                "step 1 is still the latest checkpoint; free space or point --save at a larger disk")
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    monkeypatch.undo()
    restored = FakeActor(0.0)
    assert checkpoint.load(str(root), restored, FakeData(0), world) == 1
    assert torch.equal(restored.weights, torch.full((3,), 1.0))


def test_a_checkpoint_missing_a_file_is_refused_before_any_work(world, tmp_path):
    root = tmp_path / "ckpt"
    checkpoint.save(str(root), 3, FakeActor(1.0), FakeData(4), world)
    (root / "iter_0000003" / "rng" / "rank_00000.pt").unlink()
    with pytest.raises(ValueError, match=r"--load .*lacks 1 of its files \(first: rng/rank_00000.pt\)"):
        checkpoint.check_loadable(str(root))
    (root / "iter_0000003" / "meta.json").write_text("{")
    with pytest.raises(ValueError, match="meta.json is missing or unreadable"):
        checkpoint.check_loadable(str(root))


FULL_DISK_SCRIPT = """
import sys, torch, torch.distributed as dist
from tests.unit.test_checkpoint import FakeActor, FakeData
from vime_spmd.loop import checkpoint
from vime_spmd.parallel import Layout
root, store = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
world = Layout(rank=0, world_size=1, tp_size=1, engine_size=1)
checkpoint.save(root, 1, FakeActor(1.0), FakeData(4), world)  # ~6 KiB: fits
big = FakeActor(2.0)
big.weights = torch.zeros(1 << 20)  # 4 MiB: does not fit in 1 MiB
try:
    checkpoint.save(root, 2, big, FakeData(8), world)
except checkpoint.SaveError as e:
    print(e)
"""


def test_a_real_full_disk_during_a_save(tmp_path):
    """A 1 MiB tmpfs in a private mount namespace (needs unshare and mount rights; skipped where there are none)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs unshare -rm and mount)")
    script = (f"mount -t tmpfs -o size=1m tmpfs {disk} && {sys.executable} -c '{FULL_DISK_SCRIPT}' {disk}/ckpt "
              f"{tmp_path}/store && ls -A {disk}/ckpt && cat {disk}/ckpt/latest_checkpointed_iteration.txt")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    message, *listing, latest = proc.stdout.strip().splitlines()
    needed = 4 * (1 << 20)
    assert message.startswith(f"--save {disk}/ckpt: no space: the checkpoint of step 2 needs {needed} bytes")
    assert message.endswith("the partial iter_0000002.tmp was removed and step 1 is still the latest checkpoint; "
                            "free space or point --save at a larger disk")
    assert listing == ["iter_0000001", "latest_checkpointed_iteration.txt"] and latest == "1"
