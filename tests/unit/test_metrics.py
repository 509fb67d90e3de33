"""The arithmetic on step records: the share of a step that no phase key covers."""

from __future__ import annotations

import pytest

from vime_spmd.loop.metrics import TIMING_KEYS, untimed_share


def test_untimed_share_is_what_the_phases_leave_of_the_step() -> None:
    record = {key: 0.0 for key in TIMING_KEYS}
    record.update({"perf/rollout_time": 3.0, "perf/actor_train_time": 4.5, "perf/update_weights_time": 0.25,
                   "perf/wake_up_time": 0.15, "perf/step_time": 8.0})
    # 8.0 - (3.0 + 4.5 + 0.25 + 0.15) = 0.1 of 8.0
    assert untimed_share(record) == pytest.approx(0.0125)


def test_untimed_share_is_zero_when_the_phases_cover_the_step() -> None:
    record = {key: 1.0 for key in TIMING_KEYS} | {"perf/step_time": float(len(TIMING_KEYS) - 1)}
    assert untimed_share(record) == 0.0
