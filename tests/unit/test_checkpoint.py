"""Checkpoint folders: atomic writes, the --load fallback, pruning, formats refused (a world of one, gloo, no model:
the actor's sharded format is exercised by tests/integration/test_checkpoint.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from vime_spmd import checkpoint
from vime_spmd.parallel import Layout


class FakeActor:
    """Writes its weights (and, when asked, an optimizer value) into the checkpoint folder, as the real one does."""

    def __init__(self, value: float) -> None:
        self.weights, self.optimizer_value = torch.full((3,), value), value * 10
        self.loaded_optimizer: bool | None = None

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
    with pytest.raises(OSError):
        checkpoint.save(str(root), 2, FakeActor(2.0), FakeData(8), world)
    monkeypatch.undo()
    assert checkpoint.latest_step(str(root)) == 1
    assert not (root / "iter_0000002").exists()  # only the never-read .tmp folder holds the partial write
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
    with pytest.raises(ValueError, match="names step 5 but .*iter_0000005 is incomplete"):
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
