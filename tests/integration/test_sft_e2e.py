"""Supervised fine-tuning through the same colocated loop (`--loss-type sft`): one real 2-rank run (Megatron-core and
in-process vLLM, tiny model, CPU) on the letter task's prompts with written-out responses.

What a user relies on: the first step's loss is exactly the response tokens' negative log-likelihood under the
initial model (the prompt masked, end-of-sequence learnt), the loss falls, the engine gets the new weights (its
held-out eval improves), and an eval larger than one engine step's token budget runs with per-request seeds.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, read_metrics, run_ranks

pytestmark = pytest.mark.integration

RESPONSE = "{c}{c}{c}{c}{c}{c}"
EVAL_SAMPLES = 32  # 16 prompts x 32 samples x ~20 prompt tokens: more than vLLM's 4096 tokens per engine step


@pytest.fixture(scope="module")
def sft_run(tiny_model, letters_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    records = [{**r, "response": RESPONSE.format(c=r["label"])}
               for r in map(json.loads, letters_data.read_text().splitlines())]
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = run_ranks(2, ROOT / "run.py", "--hf-checkpoint", str(tiny_model), "--prompt-data", str(data),
                     "--apply-chat-template", "--loss-type", "sft", "--rm-type", "letter",
                     "--rollout-batch-size", str(len(records)), "--micro-batch-size", "4", "--lr", "1e-2",
                     "--num-rollout", "12", "--rollout-max-response-len", "12",
                     "--eval-prompt-data", "letters", str(letters_data), "--eval-interval", "12",
                     "--n-samples-per-eval-prompt", str(EVAL_SAMPLES), "--log-dir", str(root / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, records, read_metrics(root / "run")


def test_first_step_loss_is_the_response_nll_under_the_initial_model(sft_run, tiny_model):
    """Step 1 trains on every record once (the batch is the whole file), so its loss is the token mean over all
    records of -log p(response tokens, then end-of-sequence | prompt), computed here with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, records, metrics = sft_run
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    total, tokens = 0.0, 0
    for r in records:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                               add_generation_prompt=True)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            logp = model(ids).logits.log_softmax(-1)[0, len(p_ids) - 1 : -1]
        total -= logp.gather(1, torch.tensor(r_ids)[:, None]).sum().item()
        tokens += len(r_ids)
    first = next(m for m in metrics if m.get("step") == 1 and "train/sft_loss" in m)
    assert first["train/sft_loss"] == pytest.approx(total / tokens, abs=1e-5)
    assert first["train/response_len"] == pytest.approx(tokens / len(records))
    assert first["train/truncated_ratio"] == 0.0


def test_loss_falls_and_the_engine_serves_the_new_weights(sft_run):
    _, _, metrics = sft_run
    steps = [m for m in metrics if "train/sft_loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 13))
    assert steps[-1]["train/sft_loss"] < 0.3 * steps[0]["train/sft_loss"]
    evals = {m["step"]: m for m in metrics if "perf/eval_time" in m}
    assert sorted(evals) == [0, 12]
    # The letter reward is the share of the asked letter: the random model rarely writes it, the tuned one does.
    assert evals[12]["eval/letters/accuracy"] > evals[0]["eval/letters/accuracy"] + 0.5
    assert evals[12]["eval/letters/pass@32"] == 1.0
