"""A user's bad input stops the run before any work, with one line that names the input."""

from __future__ import annotations

from tests.conftest import ROOT, run_ranks


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
