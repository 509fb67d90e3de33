"""The sbatch wrapper under a real Slurm: a one-node cluster on localhost (tests/slurm/setup_cluster.sh: munged,
slurmctld, slurmd, no cgroups) runs `sbatch --nodes 1 launch/slurm.sbatch ...` to completion.

Needs root and Debian's slurm-wlm and munge; skipped, with the reason, without them (`.ci/run` installs them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SETUP = ROOT / "tests" / "slurm" / "setup_cluster.sh"
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")


@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("a Slurm cluster needs root (slurmd, munged's key)")
    missing = [b for b in NEEDED if shutil.which(b) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: apt-get install -y slurm-wlm munge")
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(SETUP), "start", str(state)], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    yield started.stdout.strip().removeprefix("export SLURM_CONF=")
    subprocess.run(["bash", str(SETUP), "stop", str(state)], timeout=60)


def test_sbatch_runs_grpo_steps_to_completion(slurm_conf, tiny_model, letters_data, tmp_path):
    env = {**os.environ, "SLURM_CONF": slurm_conf, "DEVICE": "cpu", "NPROC_PER_NODE": "2", "PYTHON": sys.executable}
    run_dir = tmp_path / "run"
    # --wait: sbatch returns when the job ends, with its exit status. Submitted from the repository root (the
    # wrapper finds the code there); --chdir is where the job runs and where its log goes.
    job = subprocess.run(
        ["sbatch", "--wait", "--parsable", "--nodes", "1", "--chdir", str(tmp_path), "launch/slurm.sbatch",
         "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data), "--apply-chat-template",
         "--rm-type", "letter", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
         "--rollout-max-response-len", "12", "--micro-batch-size", "4", "--lr", "1e-2", "--num-rollout", "2",
         "--tensor-model-parallel-size", "2", "--rollout-num-gpus-per-engine", "2", "--log-dir", str(run_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    job_id = job.stdout.strip().split(";")[0]
    log = tmp_path / f"vime-spmd-{job_id}.out"  # the wrapper's --output, in the job's working directory
    assert log.is_file(), (job.stdout, job.stderr)
    text = log.read_text()
    assert job.returncode == 0, text[-6000:]
    # One node: a static rendezvous of one node, every rank on it, so the weight sync shares memory.
    assert re.search(r"node 0: torchrun --nnodes 1 --node-rank 0 --nproc-per-node 2 ", text)
    assert "direct format, shm transport" in text
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["train/train_rollout_logprob_abs_diff"] <= 1e-5 for r in records)


def test_a_stop_signal_to_the_job_step_saves_the_running_step(slurm_conf, tiny_model, letters_data, tmp_path):
    """The warning `#SBATCH --signal=USR1@900` gives before the time limit, sent now with `scancel --signal USR1`
    (to the job step's processes: torchrun forwards it to the ranks): they finish the step they are in, save it,
    and the job ends."""
    env = {**os.environ, "SLURM_CONF": slurm_conf, "DEVICE": "cpu", "NPROC_PER_NODE": "2", "PYTHON": sys.executable}
    ckpt, run_dir = tmp_path / "ckpt", tmp_path / "run"
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--nodes", "1", "--chdir", str(tmp_path), "launch/slurm.sbatch",
         "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data), "--apply-chat-template",
         "--rm-type", "letter", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
         "--rollout-max-response-len", "12", "--micro-batch-size", "4", "--num-rollout", "1000", "--save", str(ckpt),
         "--log-dir", str(run_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    deadline = time.time() + 600
    while not (run_dir / "metrics.jsonl").is_file() and time.time() < deadline:
        time.sleep(2)
    assert (run_dir / "metrics.jsonl").is_file(), (tmp_path / f"vime-spmd-{job_id}.out").read_text()[-6000:]
    subprocess.run(["scancel", "--signal", "USR1", job_id], env=env, check=True)
    while subprocess.run(["squeue", "--noheader", "-j", job_id], env=env, capture_output=True,
                         text=True).stdout.strip() and time.time() < deadline:
        time.sleep(2)
    steps = [r["step"] for r in read_metrics(run_dir)]
    log = (tmp_path / f"vime-spmd-{job_id}.out").read_text()
    assert steps and steps[-1] < 1000, log[-6000:]
    latest = ckpt / "latest_checkpointed_iteration.txt"
    assert latest.is_file() and int(latest.read_text()) == steps[-1], log[-6000:]
    assert "stopped on a stop signal after step" in log
