"""Watching and judging a run: held-out eval during training, TensorBoard, wandb (offline), sample logs, progress in
a non-terminal, and the plot, all from one real 2-rank run (Megatron-core and in-process vLLM, tiny model, CPU),
compared with the same run without any of it."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from tests.conftest import ROOT, read_metrics, run_ranks
from vime_spmd.loop.evaluation import pass_at_k

pytestmark = pytest.mark.integration

COMMON = ["--apply-chat-template", "--rm-type", "letter", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
          "--rollout-max-response-len", "12", "--micro-batch-size", "4", "--lr", "1e-2", "--seed", "7",
          "--num-rollout", "3", "--rollout-num-gpus-per-engine", "1"]  # two engines: eval sets split over both
EVAL_SAMPLES = 4


@pytest.fixture(scope="module")
def runs(tiny_model, letters_data, tmp_path_factory):
    """(watched run folder, its process, plain run folder): the same seed and training flags."""
    root = tmp_path_factory.mktemp("observe")
    one = root / "one.jsonl"  # 1 prompt over 2 engines: one engine has none and must still step with the other
    one.write_text(letters_data.read_text().splitlines(keepends=True)[0])
    base = ["--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data), *COMMON]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")  # no network; run_ranks passes the environment on
        watched = run_ranks(2, ROOT / "run.py", *base, "--log-dir", str(root / "watched"),
                            "--eval-prompt-data", "letters", str(letters_data), "one", str(one),
                            "--eval-interval", "2", "--n-samples-per-eval-prompt", str(EVAL_SAMPLES),
                            "--use-tensorboard", "--use-wandb", "--log-samples-interval", "2")
    plain = run_ranks(2, ROOT / "run.py", *base, "--log-dir", str(root / "plain"))
    assert watched.returncode == 0 and plain.returncode == 0
    return root / "watched", watched, root / "plain"


def test_eval_metrics_at_steps_0_2_3_match_pass_at_k_of_the_recorded_samples(runs):
    log_dir = runs[0]
    evals = [r for r in read_metrics(log_dir) if "perf/eval_time" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    samples = [json.loads(line) for line in (log_dir / "eval_samples.jsonl").read_text().splitlines()]
    groups: dict = defaultdict(lambda: defaultdict(list))  # (step, set) -> prompt -> rewards
    for s in samples:
        groups[s["step"], s["set"]][s["prompt_index"]].append(s["reward"])
    for r in evals:
        for name, num_prompts in (("letters", 16), ("one", 1)):
            prompts = groups[r["step"], name]
            assert len(prompts) == num_prompts and all(len(g) == EVAL_SAMPLES for g in prompts.values())
            flat = [x for g in prompts.values() for x in g]
            assert r[f"eval/{name}/accuracy"] == pytest.approx(sum(flat) / len(flat))
            for k in (1, 2, 4):  # correct = positive reward; averaged over prompts
                expected = sum(pass_at_k(EVAL_SAMPLES, sum(x > 0 for x in g), k) for g in prompts.values())
                assert r[f"eval/{name}/pass@{k}"] == pytest.approx(expected / num_prompts)
            assert 0 < r[f"eval/{name}/response_len"] <= 12
            assert 0 <= r[f"eval/{name}/truncated_ratio"] <= 1
        assert r["perf/eval_time"] > 0


def test_eval_does_not_change_the_training_trajectory(runs):
    watched, _, plain = runs
    steps = [r for r in read_metrics(watched) if "perf/step_time" in r]
    reference = read_metrics(plain)
    assert [r["step"] for r in steps] == [r["step"] for r in reference] == [1, 2, 3]
    for a, b in zip(steps, reference):
        compared = [k for k in b if not k.startswith(("perf/", "memory/"))]  # times differ run to run
        assert {k: a[k] for k in compared} == {k: b[k] for k in compared}
        assert "perf/eval_time" not in a  # eval time stays out of the step's record


def test_tensorboard_events_hold_the_scalars_and_samples_written(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = runs[0]
    events = EventAccumulator(str(log_dir / "tensorboard"))
    events.Reload()
    metrics = read_metrics(log_dir)
    for key in ("rollout/raw_reward", "train/grad_norm", "eval/letters/accuracy", "eval/one/pass@4"):
        written = [(r["step"], r[key]) for r in metrics if key in r]
        read = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in read] == [s for s, _ in written]
        assert [v for _, v in read] == pytest.approx([v for _, v in written], rel=1e-6)  # stored as float32
    assert [e.step for e in events.Tensors("samples/text_summary")] == [2]


def test_wandb_offline_run_directory_is_created(runs):
    (run_dir,) = (runs[0] / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb")), sorted(p.name for p in run_dir.iterdir())


def test_samples_log_holds_prompts_responses_rewards_and_labels(runs, letters_data):
    from vime_spmd.rewards.letter import score

    labels = {r["prompt"]: r["label"] for r in map(json.loads, letters_data.read_text().splitlines())}
    rows = [json.loads(line) for line in (runs[0] / "samples.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {2} and len(rows) == 2 * 4  # two prompts, all four responses each
    for r in rows:
        (asked,) = [p for p in labels if p in r["prompt"]]  # the chat-rendered prompt holds its record's text
        assert r["label"] == labels[asked]
        assert r["raw_reward"] == score(r["response"], r["label"])  # the reward belongs to this response


def test_console_in_a_pipe_shows_progress_and_no_library_noise(runs):
    out, err = runs[1].stdout, runs[1].stderr
    lines = out.splitlines()
    for step in (1, 2, 3):
        assert any(line.startswith(f"step    {step} |") and f"| {step}/3 steps, ETA " in line for line in lines)
    assert [line.split("|")[0].strip() for line in lines if line.startswith("eval")] == ["eval    0", "eval    2",
                                                                                        "eval    3"]
    assert "\r" not in out
    for noise in ("Successfully reset prefix cache", "warnings.warn", "Apex is not installed", "non-default args"):
        assert noise not in out + err, noise


def test_plot_from_the_recorded_run(runs):
    from vime_spmd.tools.plot import plot

    out = plot(runs[0])
    assert out == runs[0] / "plots.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
