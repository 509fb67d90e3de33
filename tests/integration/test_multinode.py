"""Two nodes on loopback: two torchrun invocations (one rank each, c10d rendezvous on 127.0.0.1) train together with
a tensor-parallel group and an engine spanning both "nodes", and give the metrics of the same layout on one node.

Across nodes no shared memory may be used: neither our weight-sync transport (auto picks the process groups) nor
vLLM's CPU all-reduce (its group falls back to torch.distributed once the ranks' shared-memory names differ).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, read_metrics, run_ranks

pytestmark = pytest.mark.integration

LAYOUT = ["--tensor-model-parallel-size", "2", "--rollout-num-gpus-per-engine", "2", "--apply-chat-template",
          "--rm-type", "letter", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
          "--rollout-max-response-len", "12", "--micro-batch-size", "4", "--lr", "1e-2", "--seed", "5",
          "--num-rollout", "2"]


def run_two_nodes(logs: Path, *args: str, timeout_s: int = 600) -> list[subprocess.CompletedProcess]:
    """`run.py args` as two torchrun nodes of one rank each on this machine; returns each node's process, its output
    (also in logs/node{0,1}.log: files, not pipes, so that neither node blocks on a full pipe while the other waits
    for it in a collective)."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    logs.mkdir(parents=True, exist_ok=True)
    nodes = []
    for rank in (0, 1):
        with open(logs / f"node{rank}.log", "w") as log:
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                 "--node_rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                 "--rdzv-id", "vime-loopback", str(ROOT / "run.py"), *args],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
    done = []
    for rank, node in enumerate(nodes):
        node.wait(timeout=timeout_s)
        output = (logs / f"node{rank}.log").read_text()
        done.append(subprocess.CompletedProcess(node.args, node.returncode, output, output))
        if node.returncode:
            sys.stderr.write(output[-6000:])
    return done


def test_two_loopback_nodes_train_like_one_node(tiny_model, letters_data, tmp_path):
    inputs = ["--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data), *LAYOUT]
    one = run_ranks(2, ROOT / "run.py", *inputs, "--log-dir", str(tmp_path / "one"))
    assert one.returncode == 0
    # --verbose: vLLM's own log says which all-reduce it chose (hidden by default)
    two = run_two_nodes(tmp_path / "logs", *inputs, "--log-dir", str(tmp_path / "two"), "--verbose")
    assert [node.returncode for node in two] == [0, 0]
    assert "direct format, shm transport" in one.stderr
    for node in two:
        assert "direct format, collective transport" in node.stderr
        assert "CPU SHM communicator disabled for group tp:0" in node.stderr
    one_node, two_nodes = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two_nodes] == [1, 2]
    for a, b in zip(one_node, two_nodes):
        assert b["train/train_rollout_logprob_abs_diff"] <= 1e-5
        for key in a:
            if not key.startswith(("perf/", "memory/")):
                assert b[key] == pytest.approx(a[key], abs=1e-6), key
