"""A reward served over HTTP (`--rm-url URL`): one POST per sample, many in flight.

Request: JSON `{"prompt": str, "response": str, "label": str, "metadata": dict}`. Reply: a number, or a JSON object
with a number under "reward". A reply that is neither, an HTTP error, a refused connection or a reset is retried
with exponential backoff while the sample's deadline (`--reward-timeout-s`, all attempts together) allows; after
that the sample scores 0 and counts in rollout/reward_failures, as every other reward failure does.
"""

from __future__ import annotations

import functools
import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from .custom import MAX_CONCURRENT_CALLS, call_in_threads

FIRST_BACKOFF_S = 0.1
MAX_ATTEMPTS = 4


def score_remote(url: str, prompts: Sequence[str], responses: Sequence[str], labels: Sequence[str],
                 metadata: Sequence[dict], timeout_s: float) -> list[float | None]:
    """Every sample's reward from `url`, up to MAX_CONCURRENT_CALLS requests in flight; None where none came."""
    calls = [functools.partial(post_reward, url, {"prompt": p, "response": r, "label": lab, "metadata": m},
                               timeout_s) for p, r, lab, m in zip(prompts, responses, labels, metadata)]
    return call_in_threads(calls, timeout_s, max_workers=MAX_CONCURRENT_CALLS)


def parse_reply(body: bytes) -> float:
    """The reward in a reply body: a JSON number or {"reward": number}; ValueError otherwise."""
    value = json.loads(body)
    if isinstance(value, dict):
        value = value.get("reward")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"the reply {body[:80]!r} is not a number or {{\"reward\": number}}")
    return float(value)


def post_reward(url: str, payload: dict, timeout_s: float) -> float:
    """POST `payload` to `url` until a reward comes back, within `timeout_s` over all attempts; raises the last
    error when none does."""
    data = json.dumps(payload).encode()
    deadline = time.monotonic() + timeout_s
    backoff_s = FIRST_BACKOFF_S
    for attempt in range(1, MAX_ATTEMPTS + 1):
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            raise TimeoutError(f"no reward from {url} within {timeout_s} s")
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=left_s) as reply:
                return parse_reply(reply.read())
        except (OSError, ValueError):  # URLError, HTTPError, timeouts and resets are OSErrors
            if attempt == MAX_ATTEMPTS or time.monotonic() + backoff_s >= deadline:
                raise
        time.sleep(backoff_s)
        backoff_s *= 2
    raise AssertionError("unreachable")
