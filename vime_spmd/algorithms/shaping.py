"""Reward shaping applied before advantages: pure functions of per-sample numbers."""

from __future__ import annotations


def overlong_penalty(response_len: int, max_response_len: int, buffer_len: int, penalty_factor: float) -> float:
    """DAPO's soft overlong punishment, a reward term <= 0.

    Responses up to `max_response_len - buffer_len` tokens are not penalised; within the last `buffer_len`
    tokens the penalty grows linearly to `-penalty_factor` at `max_response_len`:
        penalty = -penalty_factor * (len - (max - buffer)) / buffer
    """
    if buffer_len <= 0:
        return 0.0
    excess = response_len - (max_response_len - buffer_len)
    return -penalty_factor * min(max(excess, 0), buffer_len) / buffer_len
