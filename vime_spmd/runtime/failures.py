"""One `error:` line per failed job, from whichever rank fails first, and a mark that tells peers the job failed.

Every rank runs the same checks, so a bad input usually fails on all of them, at slightly different times. The
first rank to fail must print: torchrun stops the others (SIGTERM) as soon as one rank exits, so a rule like
"rank 0 prints" loses the line when rank 1 gets there first. Ranks therefore count failures in the launcher's
key-value store (torchrun's agent hosts it before any rank starts, so it works before `init_process_group`):
a rank prints only if its increment made the count 1. The same count tells a rank that receives SIGTERM whether
the job is being torn down after a failure (exit at once) or preempted (stop cleanly, see `signals.py`).

Without torchrun (a world of one) there is nobody to race, and the line is always printed.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading

import torch.distributed as dist


class RunError(Exception):
    """A failure during the run that the user can act on; run.py prints its message as one `error:` line (exit 1)
    instead of a traceback on every rank."""


STORE_TIMEOUT_S = 10.0  # for connecting and for each store call; a store slower than this is treated as gone
FAILED_KEY = "failed"


def key(name: str) -> str:
    """A store key of this launch attempt (torchrun's agent keeps its store across restarts)."""
    return f"vime/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"


def connect_store(timeout_s: float = STORE_TIMEOUT_S) -> dist.TCPStore | None:
    """A new client of the launcher's store, or None when there is none to reach now: no torchrun, or a launcher
    whose store rank 0 only opens in `init_process_group` (then only once that has run)."""
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and not dist.is_initialized():
        return None
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, OSError):  # DistStoreError is a RuntimeError
        return None


class _Shared:
    """One client for the main thread and the signal thread; store clients are not meant to be shared unlocked."""

    lock = threading.Lock()
    store: dist.TCPStore | None = None
    tried = False

    @classmethod
    def get(cls) -> dist.TCPStore | None:
        if cls.store is None and (not cls.tried or dist.is_initialized()):
            cls.tried = True
            cls.store = connect_store()
        return cls.store


def _failure_count(increment: int) -> int | None:
    """The job's failure count after adding `increment`; None when there is no store to ask."""
    with _Shared.lock:
        store = _Shared.get()
        if store is None:
            return None
        try:
            return store.add(key(FAILED_KEY), increment)
        except (RuntimeError, OSError):
            return None


def mark_failed() -> bool:
    """Count this rank's failure; True when it is the job's first (or when there is no store to ask)."""
    count = _failure_count(1)
    return count is None or count == 1


def peer_failed() -> bool:
    """Whether any rank of this job has failed (False when there is no store to ask)."""
    count = _failure_count(0)
    return count is not None and count > 0


def report(message: str) -> None:
    """Print `error: message` once for the whole job and mark this rank as failed."""
    if mark_failed():
        print(f"error: {message}", file=sys.stderr, flush=True)
