"""User-supplied reward functions: loading them and running them under a deadline.

A custom reward is ``fn(response: str, label: str, metadata: dict) -> float``,
plain or ``async``. It is named on the command line by ``--custom-rm-path`` as
``package.module.function`` or ``path/to/file.py:function``.

Sync functions run in daemon worker threads, async ones concurrently on one
event loop. Either way a function that raises, times out, or returns
something that is not a finite number is reported as a failure (None).
Python cannot kill a thread: a sync function past its deadline is abandoned,
keeps running in the background until it returns, and never blocks exit.
Worker threads also mean signal-based timeouts (e.g. math-verify's defaults)
raise inside a custom function; use ``vime_spmd.rewards.math.score``, which
turns them off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from vime_spmd.plugins import load_function

RewardFn = Callable[[str, str, dict], "float | Awaitable[float]"]

# Most custom rewards call a remote judge; bound the requests in flight.
MAX_CONCURRENT_CALLS = 32


def load_custom_reward(path: str) -> RewardFn:
    """Resolve ``module.function`` or ``file.py:function`` to the callable."""
    return load_function(path, "--custom-rm-path")


def as_reward(value: Any) -> float | None:
    """``value`` as a finite float, or None: a NaN reward would poison every advantage."""
    try:
        reward = float(value)
    except (TypeError, ValueError):
        return None
    return reward if math.isfinite(reward) else None


def call_in_threads(
    calls: Sequence[Callable[[], Any]], timeout_s: float, max_workers: int
) -> list[float | None]:
    """Run each call in its own daemon thread, at most ``max_workers`` at once.

    Each call gets ``timeout_s`` from its own start. A coroutine returned by a
    call (e.g. a ``functools.partial`` of an async function) is run to
    completion in its thread. Daemon threads, not a ThreadPoolExecutor, because
    the executor joins its workers at interpreter exit and one hung reward
    would then hang the whole job on shutdown.
    """
    # Written by worker threads; read only for threads that finished in time,
    # so a reward that returns after its deadline cannot undo its failure.
    outcomes: dict[int, float | None] = {}

    def run(index: int) -> None:
        try:
            value = calls[index]()
            if inspect.isawaitable(value):
                value = asyncio.run(_awaited(value))
            outcomes[index] = as_reward(value)
        except Exception:
            outcomes[index] = None

    results: list[float | None] = [None] * len(calls)
    for chunk_start in range(0, len(calls), max_workers):
        indices = range(chunk_start, min(chunk_start + max_workers, len(calls)))
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in indices]
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.start()
        for index, thread in zip(indices, threads):
            thread.join(max(0.0, deadline - time.monotonic()))
            results[index] = None if thread.is_alive() else outcomes.get(index)
    return results


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def call_async(
    fn: Callable[..., Awaitable[Any]],
    arguments: Sequence[tuple[str, str, dict]],
    timeout_s: float,
) -> list[float | None]:
    """Await ``fn(*args)`` for every argument tuple concurrently, each under ``timeout_s``.

    Runs its own event loop; when the caller already has one running in this
    thread, the loop runs in a helper thread (the caller blocks either way;
    async callers should use ``asyncio.to_thread(score_batch, ...)``).
    """

    async def one(semaphore: asyncio.Semaphore, args: tuple[str, str, dict]) -> float | None:
        async with semaphore:
            try:
                return as_reward(await asyncio.wait_for(fn(*args), timeout_s))
            except Exception:
                return None

    async def run_all() -> list[float | None]:
        semaphore = asyncio.Semaphore(MAX_CONCURRENT_CALLS)
        return list(await asyncio.gather(*(one(semaphore, args) for args in arguments)))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_all())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, run_all()).result()


def is_async_reward(fn: Callable[..., Any]) -> bool:
    """True for ``async def`` functions and objects with an ``async def __call__``."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 (the method itself, to ask if it is async)
    )
