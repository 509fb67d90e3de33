"""DAPO reward: exact match of the "Answer: ..." line after Minerva normalisation.

Convention (DAPO, Yu et al. 2025): a correct answer scores +1.0 and *anything
else* -- wrong, missing or unparsable -- scores -1.0, so a format failure is
punished as hard as a wrong answer. Note that ``score_batch`` scores a reward
that raises or times out 0.0, not -1.0, and counts it as a failure.

The prompt asks the model to end with a line "Answer: $ANSWER"; the answer is
taken from the last line that has one. Both sides go through the Minerva
normalisation (Lewkowycz et al. 2022, appendix D), which strips units, text
wrappers, dollar signs and thousands separators, then are compared as strings.
"""

from __future__ import annotations

import re

CORRECT_SCORE = 1.0
INCORRECT_SCORE = -1.0

_ANSWER_LINE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# Applied in order, as in the Minerva reference.
_SUBSTITUTIONS = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
_REMOVED_EXPRESSIONS = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km",
    "units", "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents",
    "degrees", "cm", "gm", "pounds", "meters", "meals", "edges", "students",
    "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}",
    "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)  # fmt: skip


def normalize_final_answer(answer: str) -> str:
    """Minerva normalisation of a final-answer string (e.g. "$1,000$ dollars" -> "1000")."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expression in _REMOVED_EXPRESSIONS:
        answer = answer.replace(expression, "")
    # Keep what is inside the first $...$, \text{}, \textbf{}, \overline{}, \boxed{}.
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    # Shorthand TeX: \fracab -> \frac{a}{b}, \sqrta -> \sqrt{a}.
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def extract_answer(response: str) -> str | None:
    """Text after "Answer:" on the last line that has one, or None."""
    matches = _ANSWER_LINE.findall(response)
    return matches[-1] if matches else None


def score(response: str, label: str) -> float:
    """+1.0 if the normalised "Answer:" equals the normalised label, else -1.0."""
    answer = extract_answer(response)
    if answer is None:
        return INCORRECT_SCORE
    predicted = normalize_final_answer(answer)
    correct = predicted != "" and predicted == normalize_final_answer(label)
    return CORRECT_SCORE if correct else INCORRECT_SCORE
