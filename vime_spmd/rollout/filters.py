"""DAPO dynamic sampling: which generated groups are kept for training.

A filter is `fn(rewards: list[float]) -> bool` over one prompt's group of samples: True keeps the group.
`--dynamic-sampling-filter-path` names one, built in or a user's (`package.module.function`, as in slime).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from ..plugins import load_function

GroupFilter = Callable[[list[float]], bool]


def check_reward_nonzero_std(rewards: list[float]) -> bool:
    """Keep groups whose rewards disagree: a group where all agree has zero GRPO advantage, so no signal."""
    return len(rewards) > 1 and statistics.pstdev(rewards) > 0.0


BUILTIN_FILTERS = {"check_reward_nonzero_std": check_reward_nonzero_std}


def load_filter(path: str) -> GroupFilter:
    """A built-in filter by name (also as `vime_spmd.rollout.filters.<name>`), or a user's function."""
    name = path.rpartition(".")[2]
    if path in BUILTIN_FILTERS or path == f"{__name__}.{name}" and name in BUILTIN_FILTERS:
        return BUILTIN_FILTERS[name]
    return load_function(path, "--dynamic-sampling-filter-path")


def keep_groups(rewards: list[float], group_size: int, group_filter: GroupFilter) -> list[int]:
    """Indices of the groups (contiguous runs of `group_size` rewards) the filter keeps."""
    num_groups = len(rewards) // group_size
    return [g for g in range(num_groups) if group_filter(rewards[g * group_size : (g + 1) * group_size])]
