"""The step alone, with fakes of the actor, the generator, the data and the sync, and the real memory manager on the
accelerator code path (its owners faked, tests/unit/test_memory.py): the phase order, dynamic sampling's rounds, and
the slicing of a rollout into optimizer steps."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.unit.test_memory import started
from vime_spmd.batch import Sample
from vime_spmd.config import parse_config
from vime_spmd.data.prompts import Prompt
from vime_spmd.loop.step import RLStep, SFTStep
from vime_spmd.parallel import Layout
from vime_spmd.rollout.generate import Scored

BASE = ["--hf-checkpoint", "m", "--prompt-data", "p.jsonl", "--rollout-batch-size", "4", "--n-samples-per-prompt", "2"]


class Log(list):
    def span(self, key: str):
        @contextlib.contextmanager
        def timed():
            self.append(f"span:{key}")
            yield

        return timed()


class FakeTimer:
    def __init__(self, log: Log) -> None:
        self.log, self.times = log, {}

    def span(self, key: str):
        return self.log.span(key)


class FakeDataset:
    def __init__(self) -> None:
        self.position = 0

    def next_batch(self, n: int) -> list[Prompt]:
        prompts = [Prompt([1, 2, 3], label=str(i), source=f"p.jsonl:{i}") for i in range(self.position,
                                                                                            self.position + n)]
        self.position += n
        return prompts


class FakeGenerator:
    """Each prompt's samples get response lengths 1, 2, ... and rewards from `rewards_of(prompt index)`."""

    def __init__(self, log: Log, n: int, rewards_of=lambda index, k: float(k)) -> None:
        self.log, self.n, self.rewards_of, self.calls = log, n, rewards_of, []
        self.seed = 0

    def run(self, prompts: list[Prompt], stream: int, first_index: int = 0, sampling=None) -> Scored:
        self.log.append("generate")
        self.calls.append((len(prompts), stream, first_index))
        samples = []
        for p in prompts:
            for k in range(self.n):
                s = Sample(p.prompt_ids, [7] * (k + 1), [-0.5] * (k + 1), label=p.label)
                s.raw_reward = self.rewards_of(int(p.label), k)
                samples.append(s)
        return Scored(samples, num_reward_failures=1)


class FakeActor:
    def __init__(self, log: Log, with_ref: bool) -> None:
        self.log, self.ref_model, self.steps = log, object() if with_ref else None, []

    def compute_logprobs(self, samples: list[Sample], reference: bool = False) -> torch.Tensor:
        self.log.append("actor:ref_logprobs" if reference else "actor:logprobs")
        width = max(len(s.response_ids) for s in samples)
        pad = torch.nn.functional.pad
        return torch.stack([pad(torch.tensor(s.rollout_logprobs), (0, width - len(s.rollout_logprobs)))
                            for s in samples])

    def train_step(self, inputs, denominator: float) -> dict[str, float]:
        self.log.append("actor:train_step")
        self.steps.append(([s.label for s in inputs.samples], inputs.batch_rows, denominator))
        return {"pg_loss": float(len(self.steps))}

    def sum_over_dp(self, values: dict, op=None) -> dict:
        return values

    def gather_over_dp(self, local: torch.Tensor) -> list[torch.Tensor]:
        return [local]

    def param_norm(self) -> float:
        return 1.0


class FakeSync:
    def __init__(self, log: Log) -> None:
        self.log = log

    def update(self, memory) -> None:
        self.log.append("sync:update")
        memory.load_weights([("w", torch.zeros(1))])


def rl_step(flags: list[str], layout: Layout | None = None, with_ref: bool = False, **generator_kw):
    cfg = parse_config(BASE + flags)
    log = Log()
    memory, _, memory_log, _ = started()
    generator = FakeGenerator(log, cfg.rollout.n_samples_per_prompt, **generator_kw)
    actor = FakeActor(log, with_ref)
    step = RLStep(cfg, layout or Layout(0, 1, tp_size=1, engine_size=1), FakeDataset(), actor, memory,
                  FakeSync(log), lambda: FakeTimer(log), generator=generator)
    return step, log, memory_log, actor, generator


def test_an_rl_step_runs_its_phases_in_order_and_hands_memory_over_in_pairs():
    step, log, memory_log, actor, _ = rl_step(["--use-kl-loss"], with_ref=True)
    record = step.run(1)
    assert log == ["span:perf/step_time", "span:perf/rollout_time", "generate",
                   "span:perf/engine_sleep_time", "span:perf/train_wake_time",
                   "span:perf/ref_logprobs_time", "actor:ref_logprobs",
                   "span:perf/actor_train_time", "actor:logprobs", "actor:train_step",
                   "span:perf/sleep_time", "span:perf/wake_up_time", "span:perf/update_weights_time", "sync:update",
                   "span:perf/wake_up_time"]
    # The memory transitions under those spans, in the manager's order (engine asleep before the trainer wakes, the
    # trainer paused before the engine wakes, weights loaded before the KV cache).
    assert [e for e in memory_log if e.startswith("engine:")] == [
        "engine:sleep(2)", "engine:wake(weights)", "engine:load", "engine:wake(kv_cache)"]
    assert record["step"] == 1 and record["rollout/reward_failures"] == 1.0
    assert record["data/position"] == 4.0


def test_an_sft_step_trains_on_records_without_rollout_or_reference():
    cfg = parse_config(BASE + ["--loss-type", "sft"])
    log = Log()
    memory, _, _, _ = started()

    class Tokenizer:
        eos_token_id = 0

        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [[5] * (len(t) + 1) for t in texts]}

    step = SFTStep(cfg, Layout(0, 1, tp_size=1, engine_size=1), FakeDataset(), FakeActor(log, False), memory,
                   FakeSync(log), lambda: FakeTimer(log), tokenizer=Tokenizer())
    record = step.run(1)
    assert log == ["span:perf/step_time", "span:perf/engine_sleep_time", "span:perf/train_wake_time",
                   "span:perf/actor_train_time", "actor:train_step",
                   "span:perf/sleep_time", "span:perf/wake_up_time", "span:perf/update_weights_time", "sync:update",
                   "span:perf/wake_up_time"]
    assert record["train/response_len"] == 3.0  # "0".."3": one token + 1, then end-of-sequence


def test_dynamic_sampling_generates_rounds_until_enough_groups_pass_the_filter():
    # Prompts 0, 2, 4, ... have all-equal rewards (dropped by the filter), odd ones differ: 2 kept per round of 4.
    def rewards_of(index: int, k: int) -> float:
        return 1.0 if index % 2 == 0 else float(k)

    step, _, _, _, generator = rl_step(["--dynamic-sampling-filter-path", "check_reward_nonzero_std",
                                        "--over-sampling-batch-size", "4"], rewards_of=rewards_of)
    batch = step.rollout()
    assert generator.calls == [(4, 0, 0), (4, 0, 4)]  # 4 prompts a round, seeded from their data positions
    assert [s.label for s in batch.samples] == ["1", "1", "3", "3", "5", "5", "7", "7"]
    assert batch.num_dropped_groups == 4 and batch.num_reward_failures == 2


def test_dynamic_sampling_gives_up_naming_the_filter():
    step, *_ = rl_step(["--dynamic-sampling-filter-path", "check_reward_nonzero_std"],
                       rewards_of=lambda index, k: 0.0)
    with pytest.raises(RuntimeError, match="kept 0 of 4 groups from 40 prompts: the filter check_reward_nonzero_std"):
        step.rollout()


@pytest.mark.parametrize("per_token", [True, False])
def test_a_rollout_is_sliced_into_optimizer_steps_with_their_own_denominators(per_token):
    flags = ["--global-batch-size", "4"] + ([] if per_token else ["--no-calculate-per-token-loss"])
    step, _, _, actor, _ = rl_step(flags)
    record = step.run(1)
    # 8 samples (prompts 0-3, two each, response lengths 1 and 2) in two optimizer steps of 4 samples: prompts 0-1,
    # then 2-3; the denominator of each is its tokens (1 + 2 + 1 + 2) or its samples (4).
    assert [(labels, rows) for labels, rows, _ in actor.steps] == [(["0", "0", "1", "1"], [0, 1, 2, 3]),
                                                                  (["2", "2", "3", "3"], [4, 5, 6, 7])]
    assert [d for *_, d in actor.steps] == ([6.0, 6.0] if per_token else [4.0, 4.0])
    assert record["train/pg_loss"] == 1.5  # the mean over the rollout's two optimizer steps


def test_each_data_parallel_rank_trains_on_its_share_of_every_optimizer_step():
    cfg = parse_config(BASE + ["--global-batch-size", "4", "--rollout-num-gpus-per-engine", "2"])
    memory, _, _, _ = started()
    log = Log()
    step = RLStep(cfg, Layout(1, 2, tp_size=1, engine_size=2), FakeDataset(), FakeActor(log, False), memory,
                  FakeSync(log), lambda: FakeTimer(log), generator=FakeGenerator(log, 2))
    inputs, slices = step.train_inputs(step.rollout())
    # Data-parallel rank 1 of 2: the second half of each step of 4 samples; each slice is 2 of its rows.
    assert inputs.batch_rows == [2, 3, 6, 7]
    assert [(s.start, s.stop) for s, _ in slices] == [(0, 2), (2, 4)]
    assert [d for _, d in slices] == [6.0, 6.0]  # the whole step's tokens, over both ranks
