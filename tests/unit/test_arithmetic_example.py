"""The arithmetic example's task (examples/arithmetic/make_data.py): solutions are right, the math reward accepts
them, and no held-out problem appears in the training data."""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.conftest import ROOT
from vime_spmd.rewards import score

spec = importlib.util.spec_from_file_location("make_data", ROOT / "examples" / "arithmetic" / "make_data.py")
make_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_data)


@pytest.mark.parametrize("a,b,expected", [
    (347, 28, "7+8=15. 4+2+1=7. 3+0=3. \\boxed{375}"),
    (999, 1, "9+1=10. 9+0+1=10. 9+0+1=10. \\boxed{1000}"),
    (0, 0, "0+0=0. \\boxed{0}"),
    (5, 70, "5+0=5. 0+7=7. \\boxed{75}"),
])
def test_solution_writes_each_column_with_its_carry(a, b, expected):
    assert make_data.solution(a, b) == expected


def test_every_written_solution_is_scored_right_by_the_math_reward_and_only_its_own_answer():
    data = make_data.make(num_train=200, num_eval=20, seed=1)
    for r in data["train"][:50]:
        assert score(r["response"], r["label"], "math") == 1.0
        assert score(r["response"], str(int(r["label"]) + 1), "math") == 0.0


def test_held_out_sets_share_no_operand_pair_with_training_and_hard_has_two_carries():
    data = make_data.make(num_train=3000, num_eval=100, seed=2)
    pairs = {name: {tuple(map(int, re.findall(r"\d+", r["prompt"]))) for r in records}
             for name, records in data.items()}
    assert len(pairs["heldout"]) == len(pairs["hard"]) == 100
    assert not pairs["train"] & pairs["heldout"] and not pairs["train"] & pairs["hard"]
    assert all(make_data.held_out(a, b) for a, b in pairs["heldout"] | pairs["hard"])
    assert all(100 <= a <= 999 and 100 <= b <= 999 and make_data.num_carries(a, b) >= 2 for a, b in pairs["hard"])
    assert make_data.make(3000, 100, 2) == data  # the same arguments give the same files
