"""DAPO overlong penalty and dynamic-sampling group filters, with hand-computed values."""

from __future__ import annotations

import pytest

from vime_spmd.algorithms.shaping import overlong_penalty
from vime_spmd.rollout.filters import check_reward_nonzero_std, keep_groups, load_filter


@pytest.mark.parametrize("length,expected", [
    (10, 0.0),    # 10 <= 16 - 4: no penalty
    (12, 0.0),    # exactly at the start of the buffer: excess 0
    (13, -0.25),  # excess 1 of buffer 4: -1.0 * 1/4
    (14, -0.5),   # -1.0 * 2/4
    (16, -1.0),   # the full buffer: -penalty_factor
])
def test_overlong_penalty_is_linear_in_the_buffer(length, expected):
    assert overlong_penalty(length, max_response_len=16, buffer_len=4, penalty_factor=1.0) == pytest.approx(expected)


def test_overlong_penalty_scales_with_factor_and_is_off_without_buffer():
    assert overlong_penalty(14, 16, 4, penalty_factor=0.5) == pytest.approx(-0.25)  # -0.5 * 2/4
    assert overlong_penalty(16, 16, 0, penalty_factor=1.0) == 0.0


def test_nonzero_std_filter_keeps_only_groups_with_signal():
    rewards = [1.0, 1.0, 1.0,   0.0, 1.0, 0.0,   0.0, 0.0, 0.0,   0.5, 0.5, 0.25]
    # groups: all 1 (drop), mixed (keep), all 0 (drop), mixed (keep)
    assert keep_groups(rewards, 3, check_reward_nonzero_std) == [1, 3]
    assert not check_reward_nonzero_std([1.0])  # a group of one has no variance to learn from


def test_filters_load_by_builtin_name_module_path_or_user_file(tmp_path):
    assert load_filter("check_reward_nonzero_std") is check_reward_nonzero_std
    assert load_filter("vime_spmd.rollout.filters.check_reward_nonzero_std") is check_reward_nonzero_std
    user = tmp_path / "my_filter.py"
    user.write_text("def keep_high(rewards):\n    return max(rewards) > 0.5\n")
    keep_high = load_filter(f"{user}:keep_high")
    assert keep_groups([0.1, 0.9, 0.2, 0.3], 2, keep_high) == [0]


def test_unknown_filter_names_the_flag():
    with pytest.raises(ValueError, match="--dynamic-sampling-filter-path"):
        load_filter("no_such_module.no_such_function")
