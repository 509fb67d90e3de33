"""The console a user watches: progress lines in a log file or pipe, a tqdm bar on a terminal, eval lines, and the
error that names the extra to install."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from vime_spmd.config import parse_config
from vime_spmd.config.checks import check_dashboards
from vime_spmd.loop.metrics import TIMING_KEYS
from vime_spmd.loop.observe import Progress, format_eval_line


def record(step: int, reward: float = 0.5, step_time: float = 2.0) -> dict:
    return {"step": step, **{k: 0.0 for k in TIMING_KEYS}, "perf/step_time": step_time, "rollout/raw_reward": reward}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_pipe_is_plain_lines_with_steps_and_eta():
    out = io.StringIO()  # not a terminal: isatty() is False
    progress = Progress(total=4, stream=out)
    progress.step(record(1, step_time=2.0))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in out.getvalue()
    assert lines[0].startswith("step    1 | reward 0.500")
    # one step of 2 s done, three left: ETA 6 s
    assert lines[0].endswith("| 1/4 steps, ETA 00:06")
    progress.message("eval    1 | ...")
    assert out.getvalue().splitlines()[-1] == "eval    1 | ..."


def test_progress_on_a_terminal_is_a_tqdm_bar_below_the_step_lines():
    out = Terminal()
    progress = Progress(total=3, stream=out)
    for step in (1, 2, 3):
        progress.step(record(step, reward=0.25))
    progress.close()
    text = out.getvalue()
    assert "\r" in text  # the bar redraws in place
    assert "3/3" in text and "reward=0.250" in text and "step_s=2.00" in text
    assert "step    3 | reward 0.250" in text


def test_progress_of_a_resumed_run_counts_from_its_first_step():
    out = io.StringIO()
    progress = Progress(total=10, stream=out)
    progress.step(record(9, step_time=5.0))
    assert out.getvalue().rstrip().endswith("| 9/10 steps, ETA 00:05")


def test_eval_line_names_each_set():
    line = format_eval_line({"step": 2, "eval/aime/accuracy": 0.25, "eval/aime/pass@1": 0.25,
                             "eval/aime/response_len": 12.0, "eval/gsm/accuracy": 0.5, "perf/eval_time": 1.5})
    assert line == "eval    2 | aime: acc 0.250 pass@1 0.250 len 12.0 | gsm: acc 0.500 | 1.50s"


@pytest.mark.parametrize("flag,package", [("--use-tensorboard", "tensorboard"), ("--use-wandb", "wandb")])
def test_a_missing_dashboard_package_names_the_extra(monkeypatch, flag, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    cfg = parse_config(["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", flag])
    with pytest.raises(ValueError, match=rf"{flag} needs the {package} package.*pip install 'vime-spmd\[observe\]'"):
        check_dashboards(cfg.log)


def test_libraries_are_quiet_unless_verbose():
    """A library's warning and INFO line are hidden by default and shown with --verbose."""
    script = ("import logging, sys, warnings\n"
              "from vime_spmd.loop.observe import quiet_libraries\n"
              "logging.basicConfig(level=logging.INFO)\n"
              "quiet_libraries(verbose=sys.argv[1] == 'verbose')\n"
              "logging.getLogger('vllm.engine').info('per-call line')\n"
              "logging.getLogger('megatron.core').warning('megatron warning')\n"
              "warnings.warn_explicit('lib warning', UserWarning, 'x.py', 1, module='megatron.core')\n"
              "logging.getLogger('vime_spmd.loop.trainer').info('our line')\n")
    quiet, verbose = (subprocess.run([sys.executable, "-c", script, mode], cwd=ROOT, capture_output=True, text=True)
                      for mode in ("quiet", "verbose"))
    assert "our line" in quiet.stderr and "our line" in verbose.stderr
    for noise in ("per-call line", "megatron warning", "lib warning"):
        assert noise not in quiet.stderr and noise in verbose.stderr, noise
