"""A user's bad input stops the run before any work, with one line that names the input."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, product_traceback, run_ranks


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_missing_checkpoint_directory_is_named(letters_data, tmp_path):
    missing = tmp_path / "no-such-model"
    proc = run_ranks(0, ROOT / "run.py", "--hf-checkpoint", str(missing), "--prompt-data", str(letters_data),
                     timeout_s=120)
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert str(missing) in line and "--hf-checkpoint" in line
    assert "Traceback" not in proc.stderr


def test_prompt_line_that_is_not_json_is_named_with_its_line(tiny_model, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "one", "label": "a"}\n{"prompt": "two", "label": \n')
    proc = run_ranks(0, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(data),
                     timeout_s=120)
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert f"{data}:2" in line and "JSON" in line
    assert "Traceback" not in proc.stderr


def test_inconsistent_batch_flags_are_refused_with_the_fix(tiny_model, letters_data):
    proc = run_ranks(0, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data),
                     "--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--global-batch-size", "6",
                     timeout_s=120)
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "--global-batch-size 6" in line and "divisor of 16" in line


# Under torchrun: whichever rank fails first prints the job's one error line (exit code 2), even when the other
# rank is still working or never fails. torchrun then prints its own summary, with its own traceback.

def test_a_record_without_its_label_gives_one_error_line_from_two_ranks(tiny_model, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "write a", "label": "a"}\n{"prompt": "write b"}\n')
    proc = run_ranks(2, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(data),
                     timeout_s=300)
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr
    (line,) = error_lines(proc)
    assert line.startswith(f"error: {data}:2: no 'label' value")
    assert not product_traceback(proc.stderr)


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_an_error_on_one_rank_only_is_printed_once_whichever_rank_it_is(tiny_model, letters_data, tmp_path,
                                                                        failing_rank):
    reward = tmp_path / "reward.py"  # a reward whose import fails on one rank only (say, a missing local file)
    reward.write_text(f"import os\nif os.environ['RANK'] == '{failing_rank}':\n"
                      "    raise ImportError('judge.key not found')\n"
                      "def score(response, label, metadata):\n    return 0.0\n")
    proc = run_ranks(2, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data),
                     "--custom-rm-path", f"{reward}:score", timeout_s=300)
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr
    (line,) = error_lines(proc)
    assert line.startswith(f"error: --custom-rm-path='{reward}:score': cannot import") and "judge.key" in line
    assert not product_traceback(proc.stderr)
