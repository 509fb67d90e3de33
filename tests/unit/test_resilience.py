"""Stop signals, the heartbeat watchdog and the one-line error report, in one process (a real TCPStore, no model).

The behaviour of whole jobs under torchrun is in tests/integration/test_resilience.py.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import threading
import time

import pytest
import torch.distributed as dist

from tests.conftest import free_port
from vime_spmd.runtime import failures, signals
from vime_spmd.runtime.watchdog import Watchdog


class Exited(BaseException):
    pass


@pytest.fixture
def exits(monkeypatch) -> list[int]:
    """os._exit recorded instead of run (raised as Exited, so the calling thread stops there)."""
    codes: list[int] = []

    def fake_exit(code: int):
        codes.append(code)
        raise Exited

    monkeypatch.setattr(os, "_exit", fake_exit)
    return codes


@pytest.fixture
def store(monkeypatch):
    """A launcher-like store (what torchrun's agent hosts), and the environment that points ranks at it."""
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=5),
                           wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(port))  # keys of this test only
    monkeypatch.setattr(failures._Shared, "store", None)
    monkeypatch.setattr(failures._Shared, "tried", False)
    yield master


def test_only_the_first_failing_rank_prints_the_error(store, capsys):
    failures.report("first")  # as rank 1 would, before rank 0
    failures.report("second")
    assert capsys.readouterr().err == "error: first\n"
    assert failures.peer_failed()


def test_without_a_store_the_error_is_always_printed(monkeypatch, capsys):
    for name in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(failures._Shared, "store", None)
    monkeypatch.setattr(failures._Shared, "tried", False)
    failures.report("alone")
    assert capsys.readouterr().err == "error: alone\n" and not failures.peer_failed()


def test_a_stop_signal_sets_the_request_and_a_repeat_within_the_window_counts_once(store, exits, monkeypatch):
    stop = signals.StopRequests(rank=0)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested.wait(5)
        os.kill(os.getpid(), signal.SIGTERM)  # what Slurm and torchrun both send: the same request twice
        time.sleep(0.3)
        assert exits == [] and stop.signal_name == "SIGUSR1"
    finally:
        stop.uninstall()
    # A second signal after the window exits at once (128 + the signal, as a shell reports a signal's death).
    monkeypatch.setattr(signals, "DUPLICATE_WINDOW_S", 0.0)
    with pytest.raises(Exited):
        stop.on_signal(signal.SIGTERM)
    assert exits == [128 + signal.SIGTERM]


def test_a_stop_signal_after_a_peer_failed_exits_at_once(store, exits):
    failures.mark_failed()  # another rank failed: the launcher's SIGTERM is a teardown, not a preemption
    stop = signals.StopRequests(rank=1)
    with pytest.raises(Exited):
        stop.on_signal(signal.SIGTERM)
    assert exits == [128 + signal.SIGTERM] and not stop.requested.is_set()


def run_watchdog(watchdog: Watchdog, client) -> threading.Thread:
    thread = threading.Thread(target=watchdog._run, args=(client,), daemon=True)
    thread.start()
    return thread


def test_a_peer_that_stops_beating_is_named_with_its_phase_within_the_timeout(store, exits, capsys):
    client = failures.connect_store()
    peer = {"beat": 7, "phase": "perf/rollout_time", "step": 5, "pid": 999_999_999, "host": "elsewhere"}
    client.set(failures.key("heartbeat/1"), json.dumps(peer))  # rank 1's last beat; then it stops
    watchdog = Watchdog(rank=0, world_size=2, hang_timeout_s=0.8, phase_timeout_s=None)
    started = time.monotonic()
    run_watchdog(watchdog, failures.connect_store()).join(timeout=5)
    elapsed_s = time.monotonic() - started
    assert exits == [124]
    assert 0.8 <= elapsed_s <= 0.8 + watchdog.interval_s + 0.5
    assert capsys.readouterr().err == ("error: rank 1 (pid 999999999 on elsewhere) stopped in phase perf/rollout_time "
                                       "of step 5: no heartbeat for 1 s (--hang-timeout-s 0.8); ending the job\n")


def test_a_beating_peer_in_a_long_phase_and_a_closed_peer_are_not_reported(store, exits):
    watchdogs = [Watchdog(rank=r, world_size=2, hang_timeout_s=0.6, phase_timeout_s=None) for r in (0, 1)]
    threads = [run_watchdog(w, failures.connect_store()) for w in watchdogs]
    watchdogs[1].enter_phase("perf/rollout_time", 3)  # and stays there, longer than the hang timeout
    time.sleep(2.0)
    assert exits == [] and all(t.is_alive() for t in threads)
    watchdogs[1].close()  # rank 1 finished first: rank 0 must not take it for stalled
    time.sleep(1.5)
    assert exits == [] and threads[0].is_alive()
    watchdogs[0].close()


def test_a_phase_longer_than_the_phase_timeout_ends_the_job_naming_it(store, exits, capsys):
    watchdog = Watchdog(rank=0, world_size=1, hang_timeout_s=60, phase_timeout_s=0.5)
    watchdog.enter_phase("perf/actor_train_time", 2)
    run_watchdog(watchdog, None).join(timeout=5)
    assert exits == [124]
    assert capsys.readouterr().err.startswith("error: rank 0 has been in phase perf/actor_train_time of step 2 for ")
