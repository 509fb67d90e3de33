"""Rule-based rewards and the batch scorer's failure accounting (CPU)."""

import asyncio
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import vime_spmd.rewards.math as math_reward
from vime_spmd.rewards import load_custom_reward, score, score_batch
from vime_spmd.rewards.dapo import normalize_final_answer

# (response, label, expected reward)
MATH_CASES = [
    # integers
    ("The answer is \\boxed{42}.", "42", 1.0),
    ("\\boxed{42}", "43", 0.0),
    ("\\boxed{042}", "42", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{1000}", "1,000", 1.0),
    ("\\boxed{3.0}", "3", 1.0),
    ("\\boxed{3.5}", "3", 0.0),
    ("\\boxed{10^{3}}", "1000", 1.0),
    # negatives
    ("\\boxed{-7}", "-7", 1.0),
    ("\\boxed{7}", "-7", 0.0),
    ("\\boxed{-3}", "3", 0.0),
    ("The answer is $-3$.", "-3", 1.0),
    ("\\boxed{-\\frac{1}{2}}", "-1/2", 1.0),
    ("\\boxed{-0.5}", "-\\frac{1}{2}", 1.0),
    # fractions and \frac
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
    ("\\boxed{\\tfrac{2}{4}}", "1/2", 1.0),
    ("\\boxed{2^{-1}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{2}{3}}", "\\frac{3}{2}", 0.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1.0),
    ("\\boxed{0.333}", "\\frac{1}{3}", 0.0),  # math-verify rounds to 6 places
    # boxed inside prose
    ("First 2+2=4, then double it. So the final answer is \\boxed{8}.", "8", 1.0),
    ("We get $x = 5$, hence \\boxed{x = 5}", "5", 1.0),
    ("Multiplying, $6 \\times 7 = \\boxed{42}$ apples.", "42", 1.0),
    ("\\boxed{\\frac{1}{2}} cm", "1/2", 1.0),
    ("\\boxed 5", "5", 1.0),
    ("\\fbox{6}", "6", 1.0),
    # units
    ("\\boxed{42 \\text{ cm}}", "42", 1.0),
    ("\\boxed{5\\text{ meters}}", "5", 1.0),
    ("\\boxed{12 \\mathrm{kg}}", "12", 1.0),
    ("\\boxed{7 \\text{ dollars}}", "7", 1.0),
    ("The total is \\boxed{\\$12.50}", "12.5", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{30\\%}", "30", 1.0),
    # several boxed answers: the last one counts
    ("\\boxed{5} is wrong, actually \\boxed{7}", "7", 1.0),
    ("\\boxed{5} is wrong, actually \\boxed{7}", "5", 0.0),
    ("Try \\boxed{1}. Hmm. \\boxed{2}. Final: \\boxed{3}", "3", 1.0),
    ("\\boxed{7} and an unfinished \\boxed{", "7", 1.0),
    # no box: math-verify's own extraction
    ("The answer is 42.", "42", 1.0),
    ("So $x = \\frac{3}{4}$", "3/4", 1.0),
    ("Final answer: 12", "12", 1.0),
    ("I think 1 or maybe 2", "1", 0.0),
    # symbolic, sets, intervals, text
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{\\pi}", "\\pi", 1.0),
    ("\\boxed{3.14159}", "\\pi", 0.0),
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3, 2, 1\\}", 1.0),
    ("\\boxed{[0, 1)}", "[0,1)", 1.0),
    ("\\boxed{(0,1]}", "[0,1)", 0.0),
    ("\\boxed{\\text{Yes}}", "Yes", 1.0),
    # labels that already carry delimiters
    ("\\boxed{42}", "$42$", 1.0),
    ("\\boxed{42}", "\\boxed{42}", 1.0),
    # empty and garbage
    ("", "42", 0.0),
    ("   ", "42", 0.0),
    ("asdf qwer }{}{ \\boxed{", "42", 0.0),
    ("\\boxed{}", "42", 0.0),
    ("\\boxed{\\frac{}{}}", "1", 0.0),
    ("\\boxed{\\left( \\right.}", "1", 0.0),
    ("\\boxed{abc}", "42", 0.0),
    ("🙂🙂🙂 ∑∫∂ ☃", "42", 0.0),
    ("\x00\x01 binary \\\\ \\\\ {{{{", "0", 0.0),
    ("{" * 5000, "1", 0.0),
]


@pytest.mark.parametrize(("response", "label", "expected"), MATH_CASES)
def test_math_reward_table(response: str, label: str, expected: float) -> None:
    assert score(response, label, "math") == expected


@pytest.mark.parametrize(
    ("response", "label", "expected"),
    [
        ("Reasoning...\nAnswer: 42", "42", 1.0),
        ("Answer: 41\nWait, recheck.\nAnswer: 42", "42", 1.0),  # last "Answer:" line
        ("Answer: 42\nAnswer: 41", "42", -1.0),
        ("answer:   $1,000$", "1000", 1.0),
        ("Answer: 5 dollars", "5", 1.0),
        ("Answer: x = 7", "7", 1.0),
        ("Answer: \\frac12", "\\frac{1}{2}", 1.0),
        ("Answer: \\boxed{12}", "12", 1.0),
        ("Answer: 43", "42", -1.0),
        ("The answer is 42", "42", -1.0),  # no "Answer:" line: format failure
        ("", "42", -1.0),
        ("Answer: ", "", -1.0),
    ],
)
def test_dapo_reward(response: str, label: str, expected: float) -> None:
    assert score(response, label, "dapo") == expected


def test_dapo_normalisation() -> None:
    # "$1,000$ dollars" -> strip "dollars" and spaces -> "$1,000$" -> drop $ -> digits: drop comma
    assert normalize_final_answer("$1,000$ dollars") == "1000"
    assert normalize_final_answer("\\text{(B)}") == "(B)"


@pytest.mark.parametrize(
    ("response", "label", "expected"),
    [
        ("<think>hmm</think> so \\boxed{4}", "4", 1.0),
        ("<think>maybe \\boxed{3}</think> no, \\boxed{4}", "4", 1.0),
        ("<think>I think \\boxed{4}</think> done", "4", 0.0),  # box only inside reasoning
        ("<think>unfinished \\boxed{4}", "4", 0.0),  # no </think>
        ("<think>a</think>b</think> \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("<think>x</think> \\boxed{5}", "4", 0.0),
    ],
)
def test_deepscaler_reward(response: str, label: str, expected: float) -> None:
    assert score(response, label, "deepscaler") == expected


def test_letter_demo_reward_is_dispatched() -> None:
    # "aab": 2 of 3 visible characters are "a"
    assert score("aab", "a", "letter") == pytest.approx(2 / 3)


def test_unknown_rm_type() -> None:
    with pytest.raises(ValueError, match="--rm-type.*math.*dapo.*deepscaler"):
        score("x", "y", "count_a")
    with pytest.raises(ValueError, match="--rm-type"):
        score_batch(["x"], ["y"], "count_a")


def test_custom_rm_type_needs_function_and_vice_versa() -> None:
    with pytest.raises(ValueError, match="--custom-rm-path"):
        score_batch(["x"], ["y"], "custom")
    with pytest.raises(ValueError, match="--rm-type=custom"):
        score_batch(["x"], ["y"], "math", custom_fn=lambda r, l, m: 1.0)


def _write_module(tmp_path: Path) -> Path:
    file_path = tmp_path / "my_reward.py"
    file_path.write_text(
        "def exact(response, label, metadata):\n"
        "    return float(response == label) + metadata.get('bonus', 0.0)\n"
        "NOT_CALLABLE = 3\n"
    )
    return file_path


def test_load_custom_reward_from_file_and_module(tmp_path: Path, monkeypatch) -> None:
    file_path = _write_module(tmp_path)
    fn = load_custom_reward(f"{file_path}:exact")
    assert fn("a", "a", {}) == 1.0
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_custom_reward("my_reward.exact")("a", "b", {"bonus": 0.5}) == 0.5


@pytest.mark.parametrize(
    "path_suffix", ["no_such_module.fn", "{file}:missing", "{file}:NOT_CALLABLE", "nodots", "/nope.py:fn"]
)
def test_load_custom_reward_errors_name_the_flag(tmp_path: Path, path_suffix: str) -> None:
    path = path_suffix.format(file=_write_module(tmp_path))
    with pytest.raises(ValueError, match="--custom-rm-path"):
        load_custom_reward(path)


def test_score_batch_builtin_and_metadata_for_custom() -> None:
    rewards, failures = score_batch(["\\boxed{1}", "\\boxed{2}", ""], ["1", "3", "1"], "math")
    assert (rewards, failures) == ([1.0, 0.0, 0.0], 0)
    seen = []

    def custom(response: str, label: str, metadata: dict) -> float:
        seen.append(metadata["id"])
        return 0.25

    rewards, failures = score_batch(
        ["a", "b"], ["x", "y"], "custom", metadata=[{"id": 0}, {"id": 1}], custom_fn=custom
    )
    assert (rewards, failures, sorted(seen)) == ([0.25, 0.25], 0, [0, 1])


def test_custom_exceptions_bad_values_and_timeouts_are_failures() -> None:
    def custom(response: str, label: str, metadata: dict) -> object:
        if response == "raise":
            raise RuntimeError("judge down")
        if response == "slow":
            time.sleep(2.0)
        return {"nan": float("nan"), "str": "oops", "none": None}.get(response, 1.0)

    started = time.monotonic()
    rewards, failures = score_batch(
        ["ok", "raise", "slow", "nan", "str", "none"], [""] * 6, "custom",
        custom_fn=custom, timeout_s=0.2,
    )  # fmt: skip
    assert time.monotonic() - started < 1.5
    assert (rewards, failures) == ([1.0, 0.0, 0.0, 0.0, 0.0, 0.0], 5)


def test_async_custom_reward_runs_concurrently_and_times_out() -> None:
    async def custom(response: str, label: str, metadata: dict) -> float:
        await asyncio.sleep(5.0 if response == "slow" else 0.1)
        if response == "raise":
            raise RuntimeError("bad")
        return 1.0

    started = time.monotonic()
    rewards, failures = score_batch(
        ["a"] * 20 + ["slow", "raise"], [""] * 22, "custom", custom_fn=custom, timeout_s=0.5
    )
    # 20 x 0.1 s sequentially would be 2 s; concurrently ~0.1 s, bounded by the 0.5 s deadline
    assert time.monotonic() - started < 1.5
    assert (rewards, failures) == ([1.0] * 20 + [0.0, 0.0], 2)


def test_async_custom_reward_inside_running_loop() -> None:
    async def custom(response: str, label: str, metadata: dict) -> float:
        return 0.5

    async def caller() -> tuple[list[float], int]:
        return score_batch(["a"], ["b"], "custom", custom_fn=custom)

    assert asyncio.run(caller()) == ([0.5], 0)


def test_main_thread_deadline_interrupts_and_restores_handler(monkeypatch) -> None:
    def slow(response: str, label: str) -> float:
        if response == "slow":
            time.sleep(5.0)  # interruptible, so a broken deadline costs 5 s, not a hang
        return 1.0

    monkeypatch.setattr(math_reward, "score", slow)
    previous_handler = signal.getsignal(signal.SIGALRM)
    started = time.monotonic()
    rewards, failures = score_batch(["slow", "ok"], ["", ""], "math", timeout_s=0.2)
    assert time.monotonic() - started < 1.5
    assert (rewards, failures) == ([0.0, 1.0], 1)
    assert signal.getsignal(signal.SIGALRM) is previous_handler


_PATHOLOGICAL_SCRIPT = r"""
import time
from vime_spmd.rewards import score_batch
started = time.monotonic()
result = score_batch(["\\boxed{10^{10^{10}}}", "\\boxed{1}"], ["1", "1"], "math", timeout_s=0.3)
print(result, time.monotonic() - started)
"""


def test_pathological_math_is_interrupted_in_main_thread() -> None:
    # 10^(10^10) sends sympy into an evaluation that runs for minutes
    # (math-verify's own default gives up at 5 s); the SIGALRM deadline must
    # stop it at 0.3 s. A subprocess, so a regression fails instead of hanging.
    completed = subprocess.run(
        [sys.executable, "-c", _PATHOLOGICAL_SCRIPT],
        capture_output=True, text=True, timeout=20, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    result, elapsed_s = completed.stdout.strip().rsplit(" ", 1)
    assert result == "([0.0, 1.0], 1)"
    assert float(elapsed_s) < 2.0


def test_builtin_failures_off_main_thread(monkeypatch) -> None:
    def flaky(response: str, label: str) -> float:
        if response == "slow":
            time.sleep(2.0)
        if response == "raise":
            raise RuntimeError("parser bug")
        return 1.0

    monkeypatch.setattr(math_reward, "score", flaky)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(
            out=score_batch(["ok", "slow", "raise"], [""] * 3, "math", timeout_s=0.2)
        )
    )
    started = time.monotonic()
    worker.start()
    worker.join()
    assert time.monotonic() - started < 1.5
    assert result["out"] == ([1.0, 0.0, 0.0], 2)


def test_builtin_exception_in_main_thread_and_dapo_failure_scores_zero(monkeypatch) -> None:
    import vime_spmd.rewards.dapo as dapo_reward

    def broken(response: str, label: str) -> float:
        raise RuntimeError("bug")

    monkeypatch.setattr(dapo_reward, "score", broken)
    # a failure is 0.0 even under dapo, whose wrong answers score -1.0
    assert score_batch(["Answer: 1"], ["1"], "dapo") == ([0.0], 1)


def test_math_reward_works_inside_worker_threads() -> None:
    # math-verify's default signal.alarm timeouts raise ValueError off the main thread
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=score("\\boxed{\\frac{1}{2}}", "0.5")))
    worker.start()
    worker.join()
    assert result["out"] == 1.0
