"""DeepScaleR reward: 1.0 only for a finished reasoning trace with a correct boxed answer.

The response must close its reasoning with ``</think>``; the answer is the
last ``\\boxed{}`` *after* the final ``</think>``, so a box inside the
reasoning does not count. A missing ``</think>`` or box scores 0.0, the same
as a wrong answer. Equivalence is math-verify's (see ``rewards.math``).
"""

from __future__ import annotations

from vime_spmd.rewards.math import answer_matches, last_boxed

THINK_END = "</think>"


def score(response: str, label: str) -> float:
    """1.0 if the box after the last ``</think>`` equals ``label`` else 0.0."""
    _, found, answer_part = response.rpartition(THINK_END)
    if not found:
        return 0.0
    boxed = last_boxed(answer_part)
    if boxed is None:
        return 0.0
    return 1.0 if answer_matches(boxed, label) else 0.0
