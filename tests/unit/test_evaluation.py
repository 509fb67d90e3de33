"""Eval metrics, the eval and sampling flags, and the seed of each request: pure parts, no engine."""

from __future__ import annotations

import pytest

from vime_spmd.config import check_config, parse_config
from vime_spmd.loop.evaluation import is_eval_step, load_eval_sets, pass_at_k, pass_ks, set_metrics
from vime_spmd.parallel import Layout
from vime_spmd.rollout.sampling import eval_sampling, request_seeds, training_sampling

BASE = ["--hf-checkpoint", "m", "--prompt-data", "p.jsonl"]


def test_pass_at_k_by_hand():
    # n=4 samples, c=1 correct, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=4, c=2, k=2: 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    # k=1 is the fraction correct: 3/8; k=n is "any correct"
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert pass_at_k(8, 1, 8) == 1.0 and pass_at_k(8, 0, 8) == 0.0
    # n=5, c=2, k=4: 1 - C(3,4)/C(5,4) = 1 - 0/5 (fewer wrong samples than k: one draw must be right)
    assert pass_at_k(5, 2, 4) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_pass_ks_are_powers_of_two_up_to_n():
    assert pass_ks(1) == [1]
    assert pass_ks(4) == [1, 2, 4]
    assert pass_ks(6) == [1, 2, 4]


def test_set_metrics_average_over_prompts():
    # prompt 1: rewards 1,0,0,0 (c=1); prompt 2: 1,1,0,0 (c=2); a reward of 0.5 counts as correct (positive)
    rewards = [[1.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0]]
    m = set_metrics("aime", rewards, lengths=[4, 4, 8, 8, 2, 2, 2, 2], truncated=[True] + [False] * 7)
    assert m["eval/aime/accuracy"] == pytest.approx(2.5 / 8)
    assert m["eval/aime/pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert m["eval/aime/pass@2"] == pytest.approx((0.5 + 5 / 6) / 2)  # 1 - 3/6 and 1 - 1/6
    assert m["eval/aime/pass@4"] == 1.0
    assert m["eval/aime/response_len"] == pytest.approx(32 / 8)
    assert m["eval/aime/truncated_ratio"] == pytest.approx(1 / 8)
    assert "eval/aime/pass@8" not in m


def test_dapo_wrong_answers_are_not_correct():
    m = set_metrics("d", [[-1.0, -1.0], [1.0, -1.0]], lengths=[1] * 4, truncated=[False] * 4)
    assert m["eval/d/pass@1"] == pytest.approx(0.25) and m["eval/d/pass@2"] == pytest.approx(0.5)


def test_eval_prompts_split_over_engines_without_loss():
    # 5 prompts over 2 engines of 1 rank: 2 and 3; over one engine of 2 ranks: both ranks take all 5.
    shares = [Layout(rank, 2, tp_size=1, engine_size=1).engine_slice(5) for rank in range(2)]
    assert [(s.start, s.stop) for s in shares] == [(0, 2), (2, 5)]
    assert Layout(1, 2, tp_size=1, engine_size=2).engine_slice(5) == slice(0, 5)
    assert Layout(0, 2, tp_size=1, engine_size=1).engine_slice(1) == slice(0, 0)  # an engine may get none


def test_eval_steps_are_every_interval_and_the_last():
    assert [s for s in range(1, 6) if is_eval_step(s, 2, 5)] == [2, 4, 5]
    assert [s for s in range(1, 6) if is_eval_step(s, None, 5)] == [5]  # and before the first (the trainer's)


def test_request_seeds_depend_on_stream_and_index_only():
    a = request_seeds(7, 0, range(4))
    assert a == request_seeds(7, 0, range(4)) and len(set(a)) == 4
    assert request_seeds(7, 0, range(2, 4)) == a[2:]  # a prompt's seed does not depend on the engine's share
    assert not set(a) & set(request_seeds(7, 1, range(4)))  # eval streams differ from training's
    assert request_seeds(8, 0, range(4)) != a
    assert all(0 <= s < 2**31 for s in a)


def test_sampling_flags_reach_the_engine_and_eval_defaults_to_them():
    cfg = parse_config(BASE + ["--rollout-temperature", "0.8", "--rollout-top-p", "0.9", "--rollout-top-k", "20",
                               "--rollout-stop", "</answer>", "\n\n", "--rollout-stop-token-ids", "5", "6",
                               "--rollout-max-response-len", "32", "--n-samples-per-prompt", "8",
                               "--eval-prompt-data", "a", "a.jsonl", "--eval-temperature", "0",
                               "--n-samples-per-eval-prompt", "2", "--eval-max-response-len", "64"])
    train = training_sampling(cfg)
    assert train == {"n": 8, "temperature": 0.8, "top_p": 0.9, "top_k": 20, "max_tokens": 32, "logprobs": 0,
                     "stop": ["</answer>", "\n\n"], "stop_token_ids": [5, 6]}
    ev = eval_sampling(cfg)
    assert ev == {**train, "n": 2, "temperature": 0.0, "max_tokens": 64, "logprobs": None}
    assert training_sampling(parse_config(BASE))["top_k"] == 0  # -1 (all tokens) is vLLM's 0


def test_eval_prompt_data_takes_name_path_pairs():
    cfg = parse_config(BASE + ["--eval-prompt-data", "aime", "aime.jsonl", "math", "m.parquet"])
    assert cfg.eval.eval_prompt_data == ["aime", "aime.jsonl", "math", "m.parquet"]
    check_config(cfg, 1)


@pytest.mark.parametrize("argv,message", [
    (["--eval-prompt-data", "aime"], "give pairs of NAME PATH"),
    (["--eval-prompt-data", "a", "x.jsonl", "a", "y.jsonl"], "repeat"),
    (["--eval-prompt-data", "a/b", "x.jsonl"], "metric key"),
    (["--eval-interval", "2"], "--eval-interval applies to evaluation only; add --eval-prompt-data"),
    (["--eval-prompt-data", "a", "x.jsonl", "--eval-interval", "0"], "--eval-interval 0: must be at least 1"),
    (["--eval-prompt-data", "a", "x.jsonl", "--eval-top-p", "1.5"], "--eval-top-p"),
    (["--eval-prompt-data", "a", "x.jsonl", "--n-samples-per-eval-prompt", "0"], "--n-samples-per-eval-prompt"),
    (["--rollout-top-k", "-2"], "--rollout-top-k -2"),
    (["--rollout-stop-token-ids", "-1"], "token ids are >= 0"),
    (["--wandb-project", "p"], "--wandb-project p: wandb is off; add --use-wandb"),
    (["--log-samples-interval", "0"], "--log-samples-interval 0"),
])
def test_bad_eval_and_log_flags_are_refused(argv, message):
    cfg = parse_config(BASE + argv)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_config(cfg, 1)


def test_a_missing_eval_file_is_named_with_its_set(tmp_path):
    cfg = parse_config(BASE + ["--eval-prompt-data", "aime", str(tmp_path / "aime.jsonl")])
    with pytest.raises(ValueError, match=rf"--eval-prompt-data aime {tmp_path}/aime.jsonl: no such file"):
        load_eval_sets(cfg, tokenizer=None)
