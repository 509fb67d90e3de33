"""Preemption: SIGTERM and SIGUSR1 stop the run cleanly at the next step boundary; a second signal stops it at once.

What reaches a rank, and from whom:
- torchrun's agent (torch 2.13) catches the signals in `--signals-to-handle` (default SIGTERM, SIGINT, SIGHUP,
  SIGQUIT; our launch scripts add SIGUSR1), sends the same signal to every worker's process group, waits
  `--shutdown-timeout` seconds (default 30) and then SIGKILLs what is left. A signal it does not handle (SIGUSR1
  by default) kills the agent itself, and the workers with it (watchdog.exit_with_launcher).
- The agent also sends SIGTERM to the other workers when one fails. A rank tells the two apart through the
  failure count in the launcher's store (failures.py): after a failure it exits at once, there is nothing to save.
- Slurm signals every process of a job step, so a worker may get the same signal twice within milliseconds (from
  Slurm and from the agent): a repeat within DUPLICATE_WINDOW_S of the first counts once.

A rank learns of a signal through a pipe (`signal.set_wakeup_fd`) read by a thread, not in the Python handler,
which only runs when the main thread returns to Python: a rank blocked in a collective still exits on a second
signal. Ranks agree on stopping with one all-reduce of a flag per step (`agree`), so all stop after the same step.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from multiprocessing import resource_tracker

import torch

from . import failures

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DUPLICATE_WINDOW_S = 2.0  # a repeat sooner than this is the same request delivered twice (Slurm + torchrun)


def _ignore(signum, frame) -> None:
    """The work happens in the reader thread; a Python handler must exist for the wakeup byte to be written."""


class StopRequests:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.requested = threading.Event()
        self.signal_name: str | None = None
        self._first_at: float | None = None
        self._previous: dict[int, object] = {}
        self._previous_fd = -1
        self._pipe: tuple[int, int] | None = None

    def install(self) -> None:
        """Main thread only (Python's rule for signal handlers)."""
        # torchrun signals the worker's whole process group, which holds multiprocessing's resource tracker (it
        # unlinks our shared memory). It ignores SIGTERM itself but dies of SIGUSR1, and the worker then stalls
        # ~12 s at exit. Started now with SIGUSR1 ignored, it keeps ignoring it (an ignored signal survives exec).
        previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        resource_tracker.ensure_running()
        signal.signal(signal.SIGUSR1, previous)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, _ignore)
        self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._read, args=(read_fd,), name="vime-stop-signals", daemon=True).start()

    def uninstall(self) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.close(self._pipe[1])  # the reader sees end of file and returns
        self._pipe = None

    def _read(self, read_fd: int) -> None:
        while data := os.read(read_fd, 64):
            for signum in data:  # one byte per signal: its number (other signals with Python handlers too)
                if signum in STOP_SIGNALS:
                    self.on_signal(signal.Signals(signum))
        os.close(read_fd)

    def on_signal(self, sig: signal.Signals) -> None:
        now = time.monotonic()
        if failures.peer_failed():
            os._exit(128 + sig)  # the launcher is ending the job after a rank failed: nothing to save or wait for
        if self._first_at is None:
            self._first_at, self.signal_name = now, sig.name
            self.requested.set()
            logger.warning("rank %d: %s: finishing the current step, then saving (with --save) and exiting; "
                           "send it again to exit at once", self.rank, sig.name)
        elif now - self._first_at > DUPLICATE_WINDOW_S:
            print(f"rank {self.rank}: second stop signal ({sig.name}): exiting now, without saving",
                  file=sys.stderr, flush=True)
            os._exit(128 + sig)

    def agree(self, device: torch.device) -> bool:
        """Every rank calls this at the same point: whether any rank was asked to stop."""
        flag = torch.tensor([1.0 if self.requested.is_set() else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item() > 0)
