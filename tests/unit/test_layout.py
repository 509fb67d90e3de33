"""Which prompts each engine generates and which samples each data-parallel rank trains on."""

from __future__ import annotations

import pytest

from vime_spmd.parallel import Layout
from vime_spmd.runtime.device import resolve_kind


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


# ---- pipeline parallelism ----------------------------------------------------------------------------------

def pipeline_layouts(world: int, tp: int, pp: int) -> list[Layout]:
    return [Layout(rank=r, world_size=world, tp_size=tp, engine_size=1, pp_size=pp) for r in range(world)]


def test_pipeline_stages_are_the_slowest_dimension():
    # Megatron's tp-cp-ep-dp-pp: 8 ranks, TP 2, PP 2 -> DP 2. Stage 0 is ranks 0-3, stage 1 ranks 4-7.
    ranks = pipeline_layouts(8, tp=2, pp=2)
    assert [l.tp_rank for l in ranks] == [0, 1, 0, 1, 0, 1, 0, 1]
    assert [l.dp_rank for l in ranks] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [l.pp_rank for l in ranks] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert {l.dp_size for l in ranks} == {2}


def test_pipeline_ranks_name_the_stages_of_each_rank_s_own_pipeline():
    # 8 ranks, TP 2, PP 2, DP 2 (as above): rank 3 (tp 1, dp 1, stage 0) pipelines with rank 7 (tp 1, dp 1, stage 1)
    ranks = pipeline_layouts(8, tp=2, pp=2)
    assert [l.pipeline_ranks for l in ranks] == [[0, 4], [1, 5], [2, 6], [3, 7]] * 2
    assert pipeline_layouts(2, tp=1, pp=1)[1].pipeline_ranks == [1]


def test_stages_of_one_pipeline_train_on_the_same_rows():
    ranks = pipeline_layouts(4, tp=1, pp=2)  # DP 2: ranks 0 and 2 are one pipeline, 1 and 3 the other
    assert ranks[0].train_rows(16, 8) == ranks[2].train_rows(16, 8) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert ranks[1].train_rows(16, 8) == ranks[3].train_rows(16, 8) == [4, 5, 6, 7, 12, 13, 14, 15]
    only = pipeline_layouts(2, tp=1, pp=2)  # DP 1: both stages train on everything
    assert only[0].train_rows(8, 8) == only[1].train_rows(8, 8) == list(range(8))


def test_every_sample_is_trained_exactly_once_with_stages():
    for tp, pp in ((1, 2), (2, 2), (4, 2), (2, 1)):
        ranks = pipeline_layouts(16, tp=tp, pp=pp)
        covered = sorted(i for l in ranks if l.tp_rank == 0 and l.pp_rank == 0 for i in l.train_rows(64, 32))
        assert covered == list(range(64))


def test_engines_ignore_the_training_pipeline():
    ranks = [Layout(rank=r, world_size=4, tp_size=1, engine_size=2, pp_size=2) for r in range(4)]
    assert [l.engine_slice(8) for l in ranks] == [slice(0, 4), slice(0, 4), slice(4, 8), slice(4, 8)]


def _config(*flags: str):
    from vime_spmd.config import parse_config

    return parse_config(["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--rollout-batch-size", "8", *flags])


@pytest.mark.parametrize("tp, world", [(1, 2), (2, 4), (4, 8), (1, 4)])
def test_two_pipeline_stages_are_accepted(tp, world):
    from vime_spmd.config import check_config

    check_config(_config("--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", str(tp)), world)


@pytest.mark.parametrize("flags, world, message", [
    (["--pipeline-model-parallel-size", "3"], 2,
     "--tensor-model-parallel-size 1 x --pipeline-model-parallel-size 3 does not divide the world of 2"),
    (["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2"], 2,
     "--tensor-model-parallel-size 2 x --pipeline-model-parallel-size 2 does not divide the world of 2"),
    # 32 samples per step over DP 2 (4 ranks / PP 2) x micro-batch 32 is not divisible.
    (["--pipeline-model-parallel-size", "2", "--micro-batch-size", "32"], 4, "data-parallel size 2"),
])
def test_bad_pipeline_sizes_are_refused_naming_the_flag(flags, world, message):
    from vime_spmd.config import check_config

    with pytest.raises(ValueError, match=message):
        check_config(_config(*flags), world)
