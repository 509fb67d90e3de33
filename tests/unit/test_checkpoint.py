"""Checkpoint writing is atomic and resuming checks the layout (a world of one, gloo, no model)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from vime_spmd import checkpoint
from vime_spmd.parallel import Layout


class FakeActor:
    def __init__(self, value: float) -> None:
        self.weights = torch.full((3,), value)

    def state_dict(self) -> dict:
        return {"w": self.weights.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["w"]


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


def test_save_then_load_round_trips(world, tmp_path):
    root = tmp_path / "ckpt"
    checkpoint.save(str(root), 7, FakeActor(1.5), FakeData(28), world)
    actor, data = FakeActor(0.0), FakeData(0)
    assert checkpoint.load(str(root), actor, data, world) == 7
    assert torch.equal(actor.weights, torch.full((3,), 1.5)) and data.position == 28


def test_an_interrupted_save_leaves_the_previous_checkpoint_latest(world, tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    checkpoint.save(str(root), 1, FakeActor(1.0), FakeData(4), world)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save(str(root), 2, FakeActor(2.0), FakeData(8), world)
    assert checkpoint.latest_step(str(root)) == 1
    assert not (root / "iter_0000002").exists()  # only the never-read .tmp folder holds the partial write
    actor = FakeActor(0.0)
    checkpoint.load(str(root), actor, FakeData(0), world)
    assert torch.equal(actor.weights, torch.full((3,), 1.0))


def test_a_different_layout_is_refused_naming_both(world, tmp_path):
    root = tmp_path / "ckpt"
    checkpoint.save(str(root), 3, FakeActor(1.0), FakeData(4), world)
    meta_path = root / "iter_0000003" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["layout"]["tensor_model_parallel_size"] = 2
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="--load .*same ranks and parallel sizes"):
        checkpoint.load(str(root), FakeActor(0.0), FakeData(0), world)
