"""Which prompts each engine generates and which samples each data-parallel rank trains on."""

from __future__ import annotations

import pytest

from vime_spmd.device import resolve_kind
from vime_spmd.parallel import Layout


def layouts(world: int, tp: int, engine: int) -> list[Layout]:
    return [Layout(rank=r, world_size=world, tp_size=tp, engine_size=engine) for r in range(world)]


def test_tp2_engines_on_four_ranks():
    ranks = layouts(4, tp=2, engine=2)
    # Megatron order: tensor parallel fastest. Ranks 0,1 form DP rank 0; 2,3 DP rank 1.
    assert [l.dp_rank for l in ranks] == [0, 0, 1, 1]
    assert [l.tp_rank for l in ranks] == [0, 1, 0, 1]
    # Two engines of two ranks; each generates half of 8 prompts, the same half on both of its ranks.
    assert [l.engine_slice(8) for l in ranks] == [slice(0, 4), slice(0, 4), slice(4, 8), slice(4, 8)]
    assert [l.is_engine_leader for l in ranks] == [True, False, True, False]


def test_training_and_rollout_layouts_are_independent():
    ranks = layouts(4, tp=1, engine=4)  # pure data-parallel training, one engine over all ranks
    assert [l.dp_slice(8) for l in ranks] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert [l.engine_slice(8) for l in ranks] == [slice(0, 8)] * 4
    assert [l.is_engine_leader for l in ranks] == [True, False, False, False]


def test_every_sample_is_trained_exactly_once():
    for tp in (1, 2, 4):
        ranks = layouts(8, tp=tp, engine=2)
        covered = sorted(i for l in ranks if l.tp_rank == 0 for i in range(64)[l.dp_slice(64)])
        assert covered == list(range(64))


def test_train_rows_cover_every_optimizer_step_once():
    ranks = layouts(4, tp=2, engine=1)  # data parallel 2
    # 16 samples, optimizer steps of 8: DP rank 0 takes rows 0-3 of each step, DP rank 1 rows 4-7.
    assert ranks[0].train_rows(16, 8) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert ranks[2].train_rows(16, 8) == [4, 5, 6, 7, 12, 13, 14, 15]
    assert ranks[1].train_rows(16, 8) == ranks[0].train_rows(16, 8)  # TP peers train on the same rows
    assert ranks[0].train_rows(16, 8, dp_rank=1) == ranks[2].train_rows(16, 8)


@pytest.mark.parametrize("requested,cuda,npu,expected", [
    ("auto", False, False, "cpu"), ("auto", True, False, "cuda"), ("auto", True, True, "npu"),
    ("cpu", True, True, "cpu"), ("cuda", True, False, "cuda"), ("npu", False, True, "npu"),
])
def test_device_selection(requested, cuda, npu, expected):
    assert resolve_kind(requested, cuda_available=cuda, npu_available=npu) == expected


@pytest.mark.parametrize("requested,message", [("cuda", "--device cuda"), ("npu", "--device npu"),
                                               ("tpu", "not a choice")])
def test_unavailable_device_is_refused(requested, message):
    with pytest.raises(ValueError, match=message):
        resolve_kind(requested, cuda_available=False, npu_available=False)
