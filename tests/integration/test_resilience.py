"""A run survives its worst day (2 ranks under torchrun, tiny model): preemption, a stopped rank, a dead launcher."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, product_traceback, read_metrics, run_ranks, start_ranks

pytestmark = pytest.mark.integration

COMMON = ["--apply-chat-template", "--rm-type", "letter", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
          "--rollout-max-response-len", "12", "--micro-batch-size", "4", "--lr", "1e-2", "--seed", "5"]
HANG_TIMEOUT_S = 4.0
HEARTBEAT_INTERVAL_S = 1.0  # watchdog: min(5 s, hang timeout / 4)


def workers(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the launcher's worker processes."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and alive(int(entry.name)):
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
            except OSError:
                continue
            if ppid == launcher_pid and "RANK" in env:
                ranks[int(env["RANK"])] = int(entry.name)
    return ranks


def alive(pid: int) -> bool:
    """Running or stopped, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_step(log_dir: Path, step: int, proc, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before the step"
        if (log_dir / "metrics.jsonl").is_file() and len(read_metrics(log_dir)) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout_s} s")


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "memory/"))} for r in records]


def test_sigterm_saves_the_step_it_finishes_exits_0_and_the_resumed_run_repeats_the_uninterrupted_one(
        tiny_model, letters_data, tmp_path):
    run = ["--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data), "--num-rollout", "12", *COMMON]
    ckpt = tmp_path / "ckpt"
    proc = start_ranks(2, ROOT / "run.py", *run, "--save", str(ckpt), "--log-dir", str(tmp_path / "a"),
                       output=tmp_path / "a")
    wait_for_step(tmp_path / "a", 2, proc)
    for pid in workers(proc.pid).values():  # as Slurm signals every process of a job step
        os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0  # torchrun exits 0 only when both ranks did
    stderr = (tmp_path / "a.err").read_text()
    stopped = read_metrics(tmp_path / "a")
    k = stopped[-1]["step"]
    assert 2 <= k < 12
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(k)  # no --save-interval: saved on stop
    assert f"stopped on a stop signal after step {k} of 12: the checkpoint of step {k} is in" in stderr
    assert not product_traceback(stderr)

    resumed = run_ranks(2, ROOT / "run.py", *run, "--load", str(ckpt), "--log-dir", str(tmp_path / "b"))
    assert resumed.returncode == 0
    uninterrupted = run_ranks(2, ROOT / "run.py", *run, "--log-dir", str(tmp_path / "c"))
    assert uninterrupted.returncode == 0
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == list(range(k + 1, 13))
    # Bit for bit (sampling, losses, norms, data position), timings aside.
    assert without_timings(stopped + read_metrics(tmp_path / "b")) == without_timings(read_metrics(tmp_path / "c"))


def test_a_stopped_rank_ends_the_job_within_the_bound_naming_the_rank_and_its_phase(tiny_model, letters_data,
                                                                                     tmp_path):
    proc = start_ranks(2, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data),
                       "--num-rollout", "1000", "--hang-timeout-s", str(HANG_TIMEOUT_S), "--log-dir",
                       str(tmp_path / "log"), *COMMON, output=tmp_path / "job")
    wait_for_step(tmp_path / "log", 2, proc)
    rank1 = workers(proc.pid)[1]
    os.kill(rank1, signal.SIGSTOP)
    stopped_at = time.monotonic()
    proc.wait(timeout=120)
    ended_s = time.monotonic() - stopped_at
    # Detection within the timeout plus one heartbeat interval; then the launcher tears down (~1 s measured).
    assert ended_s <= HANG_TIMEOUT_S + HEARTBEAT_INTERVAL_S + 5, ended_s
    assert proc.returncode != 0 and not alive(rank1)  # the watchdog killed the stopped rank; nothing is left
    stderr = (tmp_path / "job.err").read_text()
    (line,) = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: rank 1 (pid {rank1} on ") and "stopped in phase perf/" in line
    # The step it was in: one after the last logged, or the last logged when it stopped after that step's last
    # collective (rank 0 could then finish and log it).
    last_step = read_metrics(tmp_path / "log")[-1]["step"]
    assert any(f" of step {k}: no heartbeat for " in line for k in (last_step, last_step + 1)), (line, last_step)


def test_workers_exit_when_the_launcher_is_killed(tiny_model, letters_data, tmp_path):
    proc = start_ranks(2, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data),
                       "--num-rollout", "1000", "--log-dir", str(tmp_path / "log"), *COMMON, output=tmp_path / "job")
    wait_for_step(tmp_path / "log", 1, proc)
    pids = list(workers(proc.pid).values())
    assert len(pids) == 2
    proc.kill()  # SIGKILL: the agent cannot forward anything
    proc.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)
