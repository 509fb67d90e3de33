"""Hangs and orphans: each rank beats a heartbeat into the launcher's store and watches the next rank's.

Heartbeat: a thread writes (beat count, phase, step, pid, host) every `interval_s` and at each new phase. It is a
thread, so a healthy rank beats through a 10-minute rollout; it stops only when the process is stopped (SIGSTOP, a
frozen node), dead, or stuck holding the GIL. Rank r watches rank r+1 (mod world): the load on the store stays two
calls per rank per beat at any scale, and the first stalled rank of any run of stalled ranks is watched by a live one.
Staleness is measured on the watcher's own clock (the beat count stops changing), so clocks need not agree.

When the watched rank has not beaten for `--hang-timeout-s`, the watcher prints one `error:` line naming that
rank, its host and pid and the phase it stopped in, SIGKILLs it when it is on the same host (a stopped process
ignores SIGTERM until continued, and the launcher would wait `--shutdown-timeout` for it), and exits, which makes
torchrun end the job. Bound: hang timeout + one interval after the last beat, plus the launcher's teardown.
With `--phase-timeout-s`, a rank whose own current phase runs longer than that ends the job the same way.

Orphans: `exit_with_launcher` asks Linux to SIGKILL a worker when its parent (the torchrun agent) dies.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from typing import NoReturn

from . import failures

EXIT_HUNG = 124  # the exit status of a rank that ended the job because a rank stopped (timeout(1)'s convention)
MAX_INTERVAL_S = 5.0
PR_SET_PDEATHSIG = 1


def exit_with_launcher() -> None:
    """Under torchrun on Linux: die with the agent (kill -9 of the agent would otherwise leave workers training
    unsupervised). Not without torchrun: the parent is then a shell, and `nohup python run.py &` must survive it."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() == 1:  # the agent died before the request was made
        os._exit(1)


class Watchdog:
    def __init__(self, rank: int, world_size: int, hang_timeout_s: float, phase_timeout_s: float | None) -> None:
        self.rank, self.world_size = rank, world_size
        self.hang_timeout_s, self.phase_timeout_s = hang_timeout_s, phase_timeout_s
        self.interval_s = min(MAX_INTERVAL_S, hang_timeout_s / 4, phase_timeout_s / 4 if phase_timeout_s else math.inf)
        self.phase, self.step = "startup", 0
        self._phase_since = time.monotonic()
        self._stop = threading.Event()
        self._wake = threading.Event()  # a new phase is beaten at once, so a stalled rank's last phase is exact
        self._thread: threading.Thread | None = None

    def enter_phase(self, phase: str, step: int | None = None) -> None:
        """Called by the main thread; read by the heartbeat (a str assignment is atomic under the GIL)."""
        self.phase, self._phase_since = phase, time.monotonic()
        if step is not None:
            self.step = step
        self._wake.set()

    def start(self) -> None:
        store = failures.connect_store() if self.world_size > 1 else None
        if store is None and self.phase_timeout_s is None:
            return  # a world of one has no peer to watch
        self._thread = threading.Thread(target=self._run, args=(store,), name="vime-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """The rank is done: its watcher stops expecting beats (so a rank that ends first is not taken for dead)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s)

    def _run(self, store) -> None:
        peer = (self.rank + 1) % self.world_size
        mine, theirs = failures.key(f"heartbeat/{self.rank}"), failures.key(f"heartbeat/{peer}")
        try:
            self._watch(store, peer, mine, theirs)
        finally:
            if store is not None and self._stop.is_set():
                try:
                    store.set(mine, json.dumps({"closed": True}))
                except (RuntimeError, OSError):
                    pass

    def _watch(self, store, peer: int, mine: str, theirs: str) -> None:
        beat, seen, seen_at = 0, None, time.monotonic()
        while not self._stop.is_set():
            self._wake.clear()  # before reading the phase: a phase entered from here on wakes the next beat
            beat += 1
            now = time.monotonic()
            if store is not None:
                try:
                    store.set(mine, json.dumps({"beat": beat, "phase": self.phase, "step": self.step,
                                                "pid": os.getpid(), "host": socket.gethostname()}))
                    value = store.get(theirs).decode() if store.check([theirs]) else None
                except (RuntimeError, OSError) as e:
                    self._end(f"rank {self.rank}: the launcher's store at {os.environ.get('MASTER_ADDR')}:"
                              f"{os.environ.get('MASTER_PORT')} stopped answering ({e}); its torchrun agent has "
                              "probably died; ending this rank")
                if value != seen:
                    seen, seen_at = value, now
                elif now - seen_at > self.hang_timeout_s and not json.loads(seen or "{}").get("closed"):
                    self._peer_stalled(peer, seen, now - seen_at)
            timed = self.phase_timeout_s is not None and self.phase != "startup"  # builds may take long: not a phase
            if timed and now - self._phase_since > self.phase_timeout_s:
                self._end(f"rank {self.rank} has been in phase {self.phase} of step {self.step} for "
                          f"{now - self._phase_since:.0f} s (--phase-timeout-s {self.phase_timeout_s:g}); "
                          "ending the job")
            self._wake.wait(self.interval_s)

    def _peer_stalled(self, peer: int, last: str | None, silent_s: float) -> None:
        if last is None:
            self._end(f"rank {peer} has sent no heartbeat in {silent_s:.0f} s since rank {self.rank} started "
                      f"watching it (--hang-timeout-s {self.hang_timeout_s:g}); ending the job")
        info = json.loads(last)
        failures.report(f"rank {peer} (pid {info['pid']} on {info['host']}) stopped in phase {info['phase']} of "
                        f"step {info['step']}: no heartbeat for {silent_s:.0f} s (--hang-timeout-s "
                        f"{self.hang_timeout_s:g}); ending the job")
        if info["host"] == socket.gethostname():
            try:
                os.kill(info["pid"], signal.SIGKILL)
            except OSError:
                pass
        os._exit(EXIT_HUNG)

    def _end(self, message: str) -> NoReturn:
        failures.report(message)
        os._exit(EXIT_HUNG)
