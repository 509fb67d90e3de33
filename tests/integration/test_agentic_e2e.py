"""Multi-turn rollouts end to end (issue 19): real Megatron-core and real in-process vLLM, tiny model, fp32, CPU.

A scripted tool loop (tests/integration/scripts/agent_fns.py) makes every response 3 model turns with tool turns
between them, one tool answering, one raising, one hanging. Tool tokens carry logprob 0 from the rollout and a
trainer logprob far from 0, so a mean |trainer - engine| logprob of ~1e-7 over the masked tokens shows both that the
model's tokens were kept exactly across turns and that the tool tokens are out of the mask (and so of the loss).
Both engine layouts: two engines of one rank (vLLM data parallel: engines must make the same number of calls, also
when one of them has nothing to generate, as in an eval of one prompt) and one engine of two ranks (tensor parallel:
its ranks must make identical calls).
"""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, read_metrics, run_ranks
from tests.integration.test_grpo_e2e import check_steps

pytestmark = pytest.mark.integration

FN = f"{ROOT}/tests/integration/scripts/agent_fns.py:scripted_tools"
SAMPLES = 16  # 4 prompts x 4


@pytest.mark.parametrize("train_tp,engine_tp", [(1, 1), (2, 2)], ids=["two-engines-dp", "one-engine-tp2"])
def test_three_turn_rollouts_train_on_the_models_tokens_only(tiny_model, letters_data, tmp_path, train_tp,
                                                               engine_tp):
    log_dir = tmp_path / "run"
    # An eval set of one prompt: one engine gets it, the other none and must make every turn's call with no
    # requests (vLLM's data-parallel engines step together), 3 turns for each of the 2 samples.
    one = tmp_path / "one.jsonl"
    one.write_text(letters_data.read_text().splitlines()[0] + "\n")
    proc = run_ranks(2, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(letters_data),
                     "--num-rollout", "2", "--tensor-model-parallel-size", str(train_tp),
                     "--rollout-num-gpus-per-engine", str(engine_tp), "--custom-generate-function-path", FN,
                     "--apply-chat-template", "--rm-type", "letter", "--rollout-batch-size", "4",
                     "--n-samples-per-prompt", "4", "--rollout-max-response-len", "200", "--micro-batch-size", "4",
                     "--lr", "1e-2", "--seed", "7", "--eval-prompt-data", "one", str(one), "--eval-interval", "1",
                     "--n-samples-per-eval-prompt", "2", "--log-dir", str(log_dir), timeout_s=600)
    assert proc.returncode == 0
    evals = [r for r in read_metrics(log_dir) if "eval/one/accuracy" in r]
    records = [r for r in read_metrics(log_dir) if "eval/one/accuracy" not in r]
    assert [e["step"] for e in evals] == [0, 1, 2]
    check_steps(records, 2)
    for r in records:
        assert r["train/train_rollout_logprob_max_abs_diff"] <= 1e-5, r
        assert r["rollout/num_samples"] == SAMPLES
        assert r["rollout/turns_mean"] == 3.0
        assert r["rollout/tool_calls_mean"] == 6.0  # 2 tool turns x 3 calls
        assert r["rollout/tool_failures"] == SAMPLES * 4  # the raising and the hanging tool, twice each
        assert r["rollout/response_len"] > 12  # more than the model's 3 x 4 tokens: the tool turns are in it
