"""The demo task's reward: the share of the response's visible characters that are the asked letter."""

from __future__ import annotations


def score(response: str, label: str) -> float:
    """1.0 for "aaaa", 0.5 for "a b" with label "a", 0.0 for an empty response. Case-insensitive."""
    if len(label) != 1:
        raise ValueError(f"the letter reward needs a one-character label, got {label!r}")
    visible = [c for c in response.lower() if not c.isspace()]
    if not visible:
        return 0.0
    return sum(c == label.lower() for c in visible) / len(visible)
