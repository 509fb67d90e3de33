"""Multi-turn rollouts with a fake engine (rollout/turns.py, tools.py): trajectories batched turn by turn, each
turn's seed, the response budget, loss masks, given rewards, the tool loop's parsing and its failing tools."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from vime_spmd.batch import RolloutBatch
from vime_spmd.config import check_config, parse_config
from vime_spmd.config.checks import check_generate
from vime_spmd.data.prompts import Prompt
from vime_spmd.loop.step import rollout_metrics
from vime_spmd.parallel import Layout
from vime_spmd.rollout.generate import Scorer
from vime_spmd.rollout.sampling import turn_seed
from vime_spmd.rollout.tools import ToolCall, ToolLoop, call_tool, parse_tool_calls, tool_turn_text
from vime_spmd.rollout.trajectory import Completion, Trajectory
from vime_spmd.rollout.turns import CustomGenerator, TurnBatcher

TOOL_TOKENS = [900, 901, 902]


class CharTokenizer:
    """One token per character; `chat` gives it a ChatML template (what make_tiny_model's tokenizer renders)."""

    eos_token, eos_token_id = "<|im_end|>", 1

    def __init__(self, chat: bool = False) -> None:
        self.chat_template = "chatml" if chat else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids if i >= 32 or i == 10)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class FakeEngine:
    """Each request gets `reply(request)` tokens (default: two tokens from its seed), logprob -0.5 each."""

    training_sampling = {"n": 2, "max_tokens": 12, "temperature": 1.0, "logprobs": 0}

    def __init__(self, reply=None) -> None:
        self.calls: list[list] = []
        self.reply = reply or (lambda r: [r.seed % 500 + 2, r.seed % 500 + 3])

    def complete(self, requests):
        self.calls.append(list(requests))
        out = []
        for r in requests:
            tokens = self.reply(r)[: r.sampling["max_tokens"]]
            out.append(Completion(tokens, [-0.5] * len(tokens), "stop"))
        return out


class LocalGenerator(CustomGenerator):
    """A world of one engine: a round is the engine call itself (no broadcast, no all-reduce)."""

    def round(self, requests):
        return self.engine.complete(requests) if requests else None


def generator(fn, engine=None, tokenizer=None, rm_type="letter") -> LocalGenerator:
    layout = Layout(rank=0, world_size=1, tp_size=1, engine_size=1)
    return LocalGenerator(engine or FakeEngine(), layout, Scorer(rm_type, 5.0), seed=3, fn=fn,
                          tokenizer=tokenizer or CharTokenizer(), device=torch.device("cpu"))


def prompts(k: int, turns=(3,)) -> list[Prompt]:
    return [Prompt([10 + i, 11 + i], label="a", source=f"p.jsonl:{i}", metadata={"turns": turns[i % len(turns)]})
            for i in range(k)]


async def fixed_turns(record, sampling, tokenizer, client) -> Trajectory:
    """record.metadata["turns"] model turns of at most 2 tokens, fixed tool tokens between them, a pause (a tool's
    latency) before each turn."""
    t = Trajectory([], [], [])
    for turn in range(record.metadata["turns"]):
        await asyncio.sleep(0.001 * (turn + 1))
        out = await client.generate(record.prompt_ids + t.response_ids, {"max_tokens": 2})
        t.append(out.token_ids, out.logprobs)
        if turn < record.metadata["turns"] - 1:
            t.append(TOOL_TOKENS)
    return t


def test_live_trajectories_share_one_engine_call_per_turn():
    engine = FakeEngine()
    gen = generator(fixed_turns, engine)
    # 3 prompts x n=2 trajectories; prompt 0 and 2 take 3 turns, prompt 1 takes 1: rounds of 6, 4, 4 requests
    samples = gen.generate_share(prompts(3, turns=(3, 1)), seeds=[100, 200, 300], sampling=None)
    assert [len(c) for c in engine.calls] == [6, 4, 4] == gen.last_round_sizes
    assert [s.num_turns for s in samples] == [3, 3, 1, 1, 3, 3]
    # each request is n=1 with the turn's own max_tokens, the context is the prompt plus the response so far
    first, second = engine.calls[0][0], engine.calls[1][0]
    assert first.sampling["n"] == 1 and first.sampling["max_tokens"] == 2 and first.token_ids == [10, 11]
    assert second.token_ids == [10, 11, *samples[0].response_ids[:2], *TOOL_TOKENS]


def test_each_turn_has_its_own_seed_from_the_trajectory_seed():
    engine = FakeEngine()
    generator(fixed_turns, engine).generate_share(prompts(1), seeds=[100], sampling=None)
    seeds = [[r.seed for r in call] for call in engine.calls]
    # trajectory j of a prompt seeded s starts at s + j (as vLLM seeds the j-th of n); later turns derive from it
    assert seeds == [[turn_seed(100 + j, t) for j in range(2)] for t in range(3)]
    assert seeds[0] == [100, 101] and len({s for call in seeds for s in call}) == 6


def test_tool_tokens_are_masked_with_zero_logprobs():
    samples = generator(fixed_turns).generate_share(prompts(1), seeds=[100], sampling=None)
    s = samples[0]
    # 3 turns of 2 model tokens, 2 tool blocks of 3 tokens: 2+3+2+3+2 = 12 tokens
    assert s.loss_mask == [1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1]
    assert s.rollout_logprobs == [-0.5 if m else 0.0 for m in s.loss_mask]
    batch = RolloutBatch(samples, group_size=2)
    assert batch.response_mask()[0].tolist() == [float(m) for m in s.loss_mask]
    assert torch.equal(batch.rollout_logprobs()[0] != 0, batch.response_mask()[0].bool())


def test_tool_tokens_get_no_gradient_from_any_loss_term():
    from vime_spmd.algorithms import actor_loss
    from vime_spmd.config import AlgorithmConfig

    samples = generator(fixed_turns).generate_share(prompts(1), seeds=[100], sampling=None)
    batch = RolloutBatch(samples, group_size=2)
    mask = batch.response_mask()
    logprobs = (torch.randn(mask.shape) - 1).requires_grad_()
    entropy = torch.rand(mask.shape, requires_grad=True)
    algo = AlgorithmConfig(entropy_coef=0.1, use_kl_loss=True, kl_loss_coef=0.5)
    loss, _ = actor_loss(logprobs, entropy, batch.rollout_logprobs(), torch.ones(mask.shape), mask,
                         mask.sum().item(), algo, ref_logprobs=torch.randn(mask.shape) - 1)
    loss.backward()
    tool = mask == 0
    assert tool.sum() == 12  # 2 samples x 2 tool blocks x 3 tokens
    assert torch.all(logprobs.grad[tool] == 0) and torch.all(entropy.grad[tool] == 0)
    assert torch.all(logprobs.grad[~tool] != 0)


def test_the_response_budget_caps_turns_and_truncates():
    async def long_tools(record, sampling, tokenizer, client) -> Trajectory:
        t = Trajectory([], [], [])
        while True:
            out = await client.generate(record.prompt_ids + t.response_ids)
            if not out.token_ids:
                assert out.finish_reason == "length"
                t.status = "truncated"
                return t
            t.append(out.token_ids, out.logprobs)
            t.append(TOOL_TOKENS * 2)  # 6 tool tokens: the last block overruns max_tokens 12

    engine = FakeEngine(reply=lambda r: [5] * 10)
    samples = generator(long_tools, engine).generate_share(prompts(1), seeds=[1], sampling=None)
    # turn 1 may take all 12 tokens (10 come), 6 tool tokens overrun: nothing left, no second engine call
    assert [r.sampling["max_tokens"] for c in engine.calls for r in c] == [12, 12]
    assert len(engine.calls) == 1
    s = samples[0]
    assert len(s.response_ids) == 12 and s.truncated and s.loss_mask == [1] * 10 + [0, 0]


def test_given_rewards_skip_the_scorer_and_aborted_trajectories_train_nothing():
    async def fn(record, sampling, tokenizer, client) -> Trajectory:
        out = await client.generate(record.prompt_ids)
        t = Trajectory([], [], [], metadata={"k": 1})
        t.append(out.token_ids, out.logprobs)
        if record.source.endswith(":0"):
            t.reward = 0.75
        else:
            t.status, t.reward = "aborted", 1.0
        return t

    gen = generator(fn)
    samples = gen.generate_share(prompts(2), seeds=[1, 2], sampling=None)
    assert gen.scorer.score(samples) == 0
    assert [s.raw_reward for s in samples] == [0.75, 0.75, 0.0, 0.0]
    assert samples[2].loss_mask == [0, 0] and samples[0].metadata == {"turns": 3, "k": 1}


def test_a_bad_trajectory_names_the_record():
    async def empty(record, sampling, tokenizer, client) -> Trajectory:
        return Trajectory([5], [1], [])

    with pytest.raises(ValueError, match=r"p.jsonl:0: logprobs has 0 entries for 1 response tokens"):
        generator(empty).generate_share(prompts(1), seeds=[1], sampling=None)


def test_a_raising_function_stops_the_rollout():
    async def boom(record, sampling, tokenizer, client) -> Trajectory:
        raise RuntimeError("user bug")

    with pytest.raises(RuntimeError, match="user bug"):
        generator(boom).generate_share(prompts(1), seeds=[1], sampling=None)


def test_the_batcher_waits_for_busy_trajectories_before_a_round():
    rounds = []

    def round_fn(requests):
        rounds.append(len(requests))
        return [Completion([1], [0.0], "stop") for _ in requests] if requests else None

    class Client:
        def __init__(self, batcher):
            self.batcher = batcher

    batcher = TurnBatcher(round_fn)

    async def traj(delay_s):
        from vime_spmd.rollout.trajectory import Request

        await asyncio.sleep(delay_s)  # a slow tool: the round must wait for it
        await batcher.submit(Request([1], 0, {}))
        return delay_s

    assert asyncio.run(batcher.run([traj(0.0), traj(0.05), traj(0.02)])) == [0.0, 0.05, 0.02]
    assert rounds == [3, 0]  # one round of all three, then the round that finds none left


# ---- the tool loop -------------------------------------------------------------------------------------------

def test_tool_calls_are_parsed_from_hermes_json():
    text = ('think <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call> and <tool_call>\n{"name": "f"}\n'
            '</tool_call><tool_call>{oops}</tool_call><tool_call>[1]</tool_call>')
    calls, errors = parse_tool_calls(text)
    assert calls == [ToolCall("add", {"a": 1}), ToolCall("f", {})]
    assert len(errors) == 2 and "not JSON" in errors[0] and '"name"' in errors[1]
    assert parse_tool_calls("no calls here") == ([], [])


def test_tool_turns_render_with_the_chat_template_or_a_plain_wrapper():
    assert tool_turn_text(CharTokenizer(chat=True), ["4"]) == \
        "<|im_end|>\n<|im_start|>tool\n4<|im_end|>\n<|im_start|>assistant\n"
    assert tool_turn_text(CharTokenizer(), ["4", "5"]) == \
        "\n<tool_response>\n4\n</tool_response>\n<tool_response>\n5\n</tool_response>\n"


def test_a_raising_and_a_hanging_tool_are_observations_counted_as_failures():
    release = threading.Event()

    def add(a, b):
        return a + b

    def boom():
        raise ValueError("no such file")

    def hang():
        release.wait(30)
        return "late"

    call = '<tool_call>{{"name": "{}", "arguments": {}}}</tool_call>'
    first = call.format("add", '{"a": 2, "b": 3}') + call.format("boom", "{}") + call.format("hang", "{}") + \
        call.format("nope", "{}") + "<tool_call>{bad</tool_call>"
    tokenizer = CharTokenizer(chat=True)

    def reply(request):
        context = tokenizer.decode(request.token_ids)
        return tokenizer.encode(first if "<|im_start|>tool" not in context else "the answer is 5")

    engine = FakeEngine(reply)
    engine.training_sampling = {**engine.training_sampling, "max_tokens": 1000}
    loop = ToolLoop({"add": add, "boom": boom, "hang": hang}, max_turns=4, timeout_s=0.2)
    try:
        (s, _) = generator(loop, engine, tokenizer).generate_share(prompts(1), seeds=[1], sampling=None)
    finally:
        release.set()
    assert (s.num_turns, s.num_tool_calls, s.num_tool_failures, s.truncated) == (2, 5, 4, False)
    text = tokenizer.decode(s.response_ids)
    assert text.endswith("<|im_start|>assistant\nthe answer is 5")
    for observation in ("5<|im_end|>", "ValueError: no such file", "did not answer within 0.2 s",
                        "no tool named 'nope'", "not JSON"):
        assert observation in text
    model = [t for t, m in zip(s.response_ids, s.loss_mask) if m]
    assert tokenizer.decode(model) == first + "the answer is 5"
    # each model turn stops at the end of a tool call and keeps it
    stop = engine.calls[0][0].sampling
    assert stop["stop"] == ["</tool_call>"] and stop["include_stop_str_in_output"]


def test_the_tool_loop_stops_at_max_turns_truncated():
    tokenizer = CharTokenizer()
    engine = FakeEngine(lambda r: tokenizer.encode('<tool_call>{"name": "f", "arguments": {}}</tool_call>'))
    engine.training_sampling = {**engine.training_sampling, "max_tokens": 1000}
    loop = ToolLoop({"f": lambda: "x"}, max_turns=3, timeout_s=1.0)
    (s, _) = generator(loop, engine, tokenizer).generate_share(prompts(1), seeds=[1], sampling=None)
    assert (s.num_turns, s.num_tool_calls, s.truncated) == (3, 2, True)


def test_call_tool_returns_the_result_as_text():
    assert asyncio.run(call_tool(lambda x: x * 2, {"x": 4}, 1.0)) == ("8", True)


def test_rollout_metrics_count_turns_and_tools():
    samples = generator(fixed_turns).generate_share(prompts(2, turns=(3, 1)), seeds=[1, 2], sampling=None)
    samples[0].num_tool_calls, samples[0].num_tool_failures = 4, 1
    metrics = rollout_metrics(RolloutBatch(samples, group_size=2))
    assert metrics["rollout/turns_mean"] == (3 + 3 + 1 + 1) / 4
    assert metrics["rollout/tool_calls_mean"] == 1.0 and metrics["rollout/tool_failures"] == 1.0


# ---- flags ----------------------------------------------------------------------------------------------------

BASE = ["--hf-checkpoint", "m", "--prompt-data", "p.jsonl"]


@pytest.mark.parametrize("flags,expected", [
    (["--custom-generate-function-path", "m.f", "--loss-type", "sft"], "--custom-generate-function-path: RL options"),
    (["--max-turns", "2", "--loss-type", "sft"], "--max-turns: RL options"),
    (["--tools", "m.f"], "--tools needs --max-turns"),
    (["--max-turns", "2", "--custom-generate-function-path", "m.f"], "keep one"),
])
def test_unsupported_combinations_are_refused(flags, expected):
    with pytest.raises(ValueError, match=expected):
        check_config(parse_config(BASE + flags), 1)


def test_the_generation_function_is_checked_when_the_inputs_are(tmp_path):
    fns = tmp_path / "fns.py"
    fns.write_text("def plain(record, sampling, tokenizer, client): pass\n"
                   "async def two(record, sampling): pass\n"
                   "async def good(record, sampling, tokenizer, client): pass\n"
                   "def tool(): pass\n")
    for name, expected in (("plain", "must be an async function"), ("two", "but it is called as"),
                           ("missing", "has no callable")):
        with pytest.raises(ValueError, match=expected):
            check_generate(parse_config(BASE + ["--custom-generate-function-path", f"{fns}:{name}"]))
    check_generate(parse_config(BASE + ["--custom-generate-function-path", f"{fns}:good"]))
    check_generate(parse_config(BASE + ["--max-turns", "2", "--tools", f"{fns}:tool"]))
    with pytest.raises(ValueError, match="--tools"):
        check_generate(parse_config(BASE + ["--max-turns", "2", "--tools", f"{fns}:absent"]))
