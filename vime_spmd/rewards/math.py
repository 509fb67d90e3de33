"""Math reward: 1.0 when the response's final answer equals the label, else 0.0.

Equivalence is decided by math-verify (sympy-backed: 1/2 == \\frac{1}{2} == 0.5,
units and \\text{} stripped, sets/intervals/matrices compared structurally).

math-verify's own timeouts use ``signal.alarm``, which raises ValueError
outside the main thread and, nested inside another alarm, cancels it. So
every call here disables them (``parsing_timeout=None``,
``timeout_seconds=None``) and the deadline is enforced by the caller,
``vime_spmd.rewards.score_batch``. Calling ``score`` directly has no deadline.
"""

from __future__ import annotations

import re

from math_verify import parse, verify

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "\boxed 5" (no braces) is valid LaTeX and some models emit it.
_UNBRACED_BOXED = re.compile(r"\\boxed ([^\s${][^\s$]*)")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or None.

    Braces are matched, so nested groups such as ``\\boxed{\\frac{1}{2}}``
    come back whole; an unterminated box is skipped.
    """
    candidates = []
    for match in reversed(list(_BOX_OPEN.finditer(text))):
        content = _braced_content(text, match.end() - 1)
        if content is not None:
            candidates.append((match.start(), content))
            break
    unbraced = list(_UNBRACED_BOXED.finditer(text))
    if unbraced:
        candidates.append((unbraced[-1].start(), unbraced[-1].group(1)))
    return max(candidates)[1] if candidates else None


def _braced_content(text: str, open_index: int) -> str | None:
    """Text inside the brace group opening at ``text[open_index] == '{'``."""
    depth = 0
    for index in range(open_index, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : index]
    return None


def parse_label(label: str) -> list:
    """math-verify parse of a gold answer.

    Bare LaTeX labels such as ``\\frac{\\sqrt{3}}{2}`` or ``\\pi`` parse to
    nothing without math delimiters, so a label that has none is boxed first.
    """
    if "\\boxed" in label or "$" in label:
        return parse(label, parsing_timeout=None)
    return parse("\\boxed{" + label + "}", parsing_timeout=None) or parse(
        label, parsing_timeout=None
    )


def answer_matches(answer_latex: str, label: str) -> bool:
    """True when the LaTeX expression ``answer_latex`` equals ``label``."""
    gold = parse_label(label)
    predicted = parse("\\boxed{" + answer_latex + "}", parsing_timeout=None)
    return bool(gold and predicted and verify(gold, predicted, timeout_seconds=None))


def score(response: str, label: str) -> float:
    """1.0 if the response's answer equals ``label`` else 0.0.

    The answer is the last ``\\boxed{}`` when there is one (math-verify would
    otherwise read several boxes as a set: \\boxed{5} ... \\boxed{7} -> {5, 7}),
    else math-verify's own extraction from the raw text ("the answer is 42",
    the last $...$, or the last number).
    """
    boxed = last_boxed(response)
    if boxed is not None:
        return 1.0 if answer_matches(boxed, label) else 0.0
    gold = parse_label(label)
    predicted = parse(response, parsing_timeout=None)
    return 1.0 if gold and predicted and verify(gold, predicted, timeout_seconds=None) else 0.0
