"""Shared fixtures: tiny models built locally (no hub), and a way to run the product under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_model(out: Path, *extra: str) -> Path:
    from vime_spmd.tools.make_tiny_model import make_tiny_model, parse_args

    return make_tiny_model(parse_args([str(out), "--hidden-size", "64", "--intermediate-size", "128",
                                       "--num-heads", "4", "--num-kv-heads", "2", "--head-dim", "32", *extra]))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model_tied(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny_tied") / "model", "--tie-word-embeddings", "--seed", "1")


@pytest.fixture(scope="session")
def letters_data(tmp_path_factory) -> Path:
    from vime_spmd.tools.make_demo_data import demo_records

    path = tmp_path_factory.mktemp("data") / "letters.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo_records()))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(nproc: int, script: str | Path, *args: str, timeout_s: int = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a script (or `"-m", module`) under torchrun (nproc > 0) or as a plain process (nproc == 0), from the
    repo root, with `env` added to the environment."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master-port", str(free_port()), str(script), *args]
    else:
        cmd = [sys.executable, str(script), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode not in (0, 2):
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
    return proc


def start_ranks(nproc: int, script: str | Path, *args: str, output: Path) -> subprocess.Popen:
    """Start a script under torchrun and return at once; stdout and stderr go to `output`.{out,err} (files, not pipes:
    a test that kills the launcher must not wait on pipes its workers still hold)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master-port",
           str(free_port()), str(script), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(f"{output}.out", "w") as out, open(f"{output}.err", "w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)


def product_traceback(stderr: str) -> bool:
    """Whether a traceback passes through this repository's code (torchrun prints its own when a rank fails; the
    virtual environment may lie inside the repository, as with `make setup`)."""
    ours, venv = f'File "{ROOT}/', f'File "{ROOT}/.venv/'
    return any(line.lstrip().startswith(ours) and not line.lstrip().startswith(venv) for line in stderr.splitlines())


def read_metrics(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_model_qwen2(tmp_path_factory) -> Path:
    # vLLM's Qwen2 derives head_dim from hidden_size / heads: 128 / 4 = 32.
    return make_model(tmp_path_factory.mktemp("tiny_qwen2") / "model", "--family", "qwen2", "--hidden-size", "128",
                      "--seed", "2")


@pytest.fixture(scope="session")
def tiny_model_llama(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny_llama") / "model", "--family", "llama", "--seed", "3")


@pytest.fixture(scope="session")
def tiny_model_kv4(tmp_path_factory) -> Path:
    """Four key/value heads, so that training tensor parallelism can go to 4."""
    return make_model(tmp_path_factory.mktemp("tiny_kv4") / "model", "--num-kv-heads", "4", "--seed", "4")
