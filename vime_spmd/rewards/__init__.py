"""Rule-based rewards: one float per (response, label).

``--rm-type`` choices:
    math        1.0 / 0.0, math-verify equivalence of the last \\boxed{} (rewards.math)
    dapo        +1.0 / -1.0, normalised "Answer:" line (rewards.dapo)
    deepscaler  1.0 / 0.0, \\boxed{} after </think> (rewards.deepscaler)
    letter      share of the asked letter, the CPU demo task (rewards.letter)
    custom      the function named by --custom-rm-path (rewards.custom)
    remote      the server at --rm-url (rewards.remote)

``score_batch`` is what the rollout uses: it puts every reward under a
deadline and turns a reward that raises, times out or returns a non-finite
value into 0.0, counted as a failure (so the trainer can log it rather than
crash a step on one bad sample).
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType

from vime_spmd.config.sections import RM_TYPES  # the --rm-type choices: one list
from vime_spmd.rewards import dapo, deepscaler, letter
from vime_spmd.rewards import math as math_reward
from vime_spmd.rewards.custom import (
    MAX_CONCURRENT_CALLS,
    RewardFn,
    as_reward,
    call_async,
    call_in_threads,
    is_async_reward,
    load_custom_reward,
)
from vime_spmd.rewards.remote import score_remote

# Modules, not functions, so tests can monkeypatch ``<module>.score``.
_BUILTIN_REWARDS: dict[str, ModuleType] = {
    "math": math_reward,
    "dapo": dapo,
    "deepscaler": deepscaler,
    "letter": letter,
}

__all__ = ["RM_TYPES", "RewardFn", "load_custom_reward", "score", "score_batch"]


def score(response: str, label: str, rm_type: str = "math") -> float:
    """Reward of one response under a built-in ``rm_type``; no deadline, may raise."""
    _check_rm_type(rm_type, custom_fn=None)
    return _BUILTIN_REWARDS[rm_type].score(response, label)


def score_batch(
    responses: Sequence[str],
    labels: Sequence[str],
    rm_type: str,
    *,
    metadata: Sequence[dict] | None = None,
    custom_fn: RewardFn | None = None,
    timeout_s: float = 10.0,
    url: str | None = None,
    prompts: Sequence[str] | None = None,
) -> tuple[list[float], int]:
    """Rewards for a batch and the number of failures.

    A reward that raises, exceeds ``timeout_s`` or is not a finite number
    scores 0.0 (also under "dapo", whose wrong answers score -1.0) and counts
    as one failure. Built-in rewards called from the main thread are stopped
    at the deadline by SIGALRM; anywhere else they, and sync custom rewards,
    run in daemon threads that are abandoned at the deadline (Python cannot
    stop a thread, so a runaway sympy call keeps a core busy until it ends).
    Async custom rewards run concurrently and are cancelled at the deadline.
    ``metadata`` (one dict per sample) is passed to custom rewards only.
    Under "remote", each sample's ``prompts`` entry, response, label and
    metadata are POSTed to ``url``, many at once.
    """
    _check_rm_type(rm_type, custom_fn)
    num_samples = len(responses)
    if len(labels) != num_samples or (metadata is not None and len(metadata) != num_samples):
        raise ValueError(
            f"score_batch got {num_samples} responses, {len(labels)} labels and "
            f"{'no' if metadata is None else len(metadata)} metadata entries; they must match."
        )
    if timeout_s <= 0:
        raise ValueError(f"reward timeout must be > 0 seconds, got {timeout_s}")

    if rm_type == "remote":
        if not url:
            raise ValueError("--rm-type=remote needs a server: set --rm-url http://host:port/path.")
        rewards = score_remote(url, prompts or [""] * num_samples, responses, labels,
                               metadata or [{}] * num_samples, timeout_s)
    elif rm_type == "custom":
        assert custom_fn is not None
        per_sample = [{} if metadata is None else metadata[i] for i in range(num_samples)]
        arguments = list(zip(responses, labels, per_sample))
        if is_async_reward(custom_fn):
            rewards = call_async(custom_fn, arguments, timeout_s)
        else:
            calls = [functools.partial(custom_fn, *args) for args in arguments]
            rewards = call_in_threads(calls, timeout_s, max_workers=MAX_CONCURRENT_CALLS)
    else:
        reward_fn = _BUILTIN_REWARDS[rm_type].score
        calls = [functools.partial(reward_fn, r, l) for r, l in zip(responses, labels)]
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
            rewards = [_call_with_alarm(call, timeout_s) for call in calls]
        else:
            # CPU-bound under the GIL: more threads would not go faster.
            rewards = call_in_threads(calls, timeout_s, max_workers=1)

    num_failures = sum(reward is None for reward in rewards)
    return [0.0 if reward is None else reward for reward in rewards], num_failures


def _check_rm_type(rm_type: str, custom_fn: RewardFn | None) -> None:
    if rm_type not in RM_TYPES:
        raise ValueError(
            f"--rm-type={rm_type!r} is not supported; choose one of {', '.join(RM_TYPES)}."
        )
    if rm_type == "custom" and custom_fn is None:
        raise ValueError(
            "--rm-type=custom needs a reward function: set --custom-rm-path to "
            "'package.module.function' or 'path/to/file.py:function'."
        )
    if rm_type != "custom" and custom_fn is not None:
        raise ValueError(
            f"--custom-rm-path is set but --rm-type={rm_type!r}; use --rm-type=custom "
            "or drop --custom-rm-path."
        )


class _RewardDeadline(BaseException):
    """Raised by SIGALRM. A BaseException so the ``except Exception`` blocks in
    math-verify and sympy cannot swallow it and carry on past the deadline."""


def _call_with_alarm(call: Callable[[], object], timeout_s: float) -> float | None:
    """``as_reward(call())`` interrupted after ``timeout_s``; None on timeout or error.

    Main thread only. Restores the previous SIGALRM handler and re-arms a
    timer that was already pending, minus the time spent here.
    """

    def on_alarm(signum: int, frame: object) -> None:
        raise _RewardDeadline

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay_s, previous_interval_s = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        try:
            return as_reward(call())
        finally:
            # Nested so the handler is restored even if the alarm fires
            # between the call returning and the timer being disarmed.
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
            finally:
                # None means the old handler was not installed from Python.
                signal.signal(signal.SIGALRM, previous_handler or signal.SIG_DFL)
    except (_RewardDeadline, Exception):
        return None
    finally:
        if previous_delay_s > 0:
            remaining_s = max(previous_delay_s - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining_s, previous_interval_s)
