"""Custom generation (`--custom-generate-function-path`, `--max-turns`): trajectories of several engine calls each,
batched turn by turn.

    engine leader: run every trajectory's coroutine (one event loop) until each has finished or waits on the engine
    every rank of the engine: that round's requests, broadcast from the leader -> one engine call -> completions
    every rank: one all-reduce over the world: does any engine still have requests? none -> the rollout is done

Two rules of the in-process SPMD engine shape this (breaking either hangs the job): the ranks of one engine (its
tensor-parallel group) must make identical engine calls, so only the engine leader runs the user's code and it sends
each round's requests to the others; and vLLM's data-parallel engines step together, so every engine makes the same
number of calls: an engine whose trajectories are all done calls with no requests until every engine is done.

An exception in the user's function stops the run (it is a bug); a failing tool is an observation (rollout/tools.py).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

import torch

from ..batch import Sample
from ..data.prompts import Prompt
from ..parallel import Layout
from ..plugins import load_function
from .generate import RolloutGenerator, Scorer
from .sampling import turn_seed
from .trajectory import Completion, Request, Trajectory

GENERATE_ARGS = ("record", "sampling", "tokenizer", "client")
GenerateFn = Callable[..., Awaitable[Trajectory]]


def load_generate_function(rollout) -> GenerateFn | None:
    """The run's generation function: --custom-generate-function-path, or the built-in tool loop with --max-turns;
    None for the plain one-call rollout. Raises ValueError naming the flag."""
    if rollout.max_turns is not None:
        from .tools import ToolLoop

        return ToolLoop.of(rollout)
    path = rollout.custom_generate_function_path
    if path is None:
        return None
    fn = load_function(path, "--custom-generate-function-path")
    if not (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)):
        raise ValueError(f"--custom-generate-function-path={path!r}: must be an async function, "
                         f"async def {getattr(fn, '__name__', 'fn')}({', '.join(GENERATE_ARGS)}) -> Trajectory")
    return fn


class EngineClient:
    """The `client` a generation function gets, one per trajectory. `generate` sends the whole context (the prompt's
    tokens, then the response so far) and returns the turn's `Completion`. The trajectory's response (everything
    after the prompt) is held to the sampling's max_tokens: a turn may generate at most what is left of it, and a
    call with nothing left returns no tokens, finish reason "length", without an engine call."""

    def __init__(self, batcher: TurnBatcher, seed: int, prompt_len: int, sampling: dict) -> None:
        self.batcher, self.seed, self.prompt_len, self.sampling = batcher, seed, prompt_len, sampling
        self.num_turns = 0  # engine calls made

    async def generate(self, token_ids: list[int], sampling_overrides: dict | None = None) -> Completion:
        """`sampling_overrides`: SamplingParams arguments for this turn (stop, max_tokens, temperature, ...)."""
        params = {**self.sampling, **(sampling_overrides or {}), "n": 1}
        left = self.sampling["max_tokens"] - (len(token_ids) - self.prompt_len)
        if left <= 0:
            return Completion([], [], "length")
        params["max_tokens"] = min(params.get("max_tokens") or left, left)
        request = Request(list(token_ids), turn_seed(self.seed, self.num_turns), params)
        self.num_turns += 1
        return await self.batcher.submit(request)


class TurnBatcher:
    """The engine leader's event loop: trajectories submit requests and wait; once every live one waits (or none is
    left), one round sends all waiting requests in one engine call. `round_fn` is the SPMD round (None: every engine
    is done)."""

    def __init__(self, round_fn: Callable[[list[Request]], list[Completion] | None]) -> None:
        self.round_fn = round_fn
        self.waiting: list[tuple[Request, asyncio.Future]] = []
        self.round_sizes: list[int] = []  # requests per engine call, for the batching benchmark
        self._changed: asyncio.Event | None = None

    async def submit(self, request: Request) -> Completion:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((request, future))
        self._changed.set()
        return await future

    async def run(self, coroutines: list[Awaitable[Trajectory]]) -> list[Trajectory]:
        self._changed = asyncio.Event()
        tasks = [asyncio.ensure_future(c) for c in coroutines]
        for task in tasks:
            task.add_done_callback(lambda _: self._changed.set())
        while True:
            while sum(not t.done() for t in tasks) > len(self.waiting):  # some are busy (a tool, a reward, ...)
                self._changed.clear()
                await self._changed.wait()
            failed = next((t for t in tasks if t.done() and t.exception() is not None), None)
            if failed is not None:
                failed.result()  # raises the user's exception
            batch, self.waiting = self.waiting, []
            completions = self.round_fn([request for request, _ in batch])
            if completions is None:
                assert not batch, "every engine reported no requests while this one had some"
                return [t.result() for t in tasks]
            self.round_sizes.append(len(batch))
            for (_, future), completion in zip(batch, completions):
                future.set_result(completion)


class CustomGenerator(RolloutGenerator):
    """`RolloutGenerator` whose share is generated by a generation function, `n` trajectories per prompt (the
    sampling's n), trajectory j of a prompt seeded with its prompt's seed + j (as vLLM seeds the j-th of n samples),
    and its turns from that (`sampling.turn_seed`). The split, seeds, scoring and gather are the base class's."""

    def __init__(self, engine, layout: Layout, scorer: Scorer, seed: int, fn: GenerateFn, tokenizer,
                 device: torch.device, name: str = "the generation function") -> None:
        super().__init__(engine, layout, scorer, seed)
        self.fn, self.tokenizer, self.device, self.name = fn, tokenizer, device, name
        self.last_round_sizes: list[int] = []
        self.group = None
        if layout.engine_size > 1:  # every rank creates every engine's group, in the same order
            size = layout.engine_size
            groups = [torch.distributed.new_group(list(range(e * size, (e + 1) * size)), backend="gloo")
                      for e in range(layout.num_engines)]
            self.group = groups[layout.engine_index]

    def generate_share(self, prompts: list[Prompt], seeds: list[int], sampling: dict | None) -> list[Sample]:
        if not self.layout.is_engine_leader:
            while self.round(None) is not None:  # the leader's requests, until every engine is done
                pass
            return []  # only the leader's samples are gathered
        sampling = self.engine.training_sampling if sampling is None else sampling
        n, sampling = sampling.get("n", 1), {**sampling, "n": 1}
        batcher = TurnBatcher(self.round)
        jobs = [(prompt, EngineClient(batcher, seed + j, len(prompt.prompt_ids), sampling))
                for prompt, seed in zip(prompts, seeds) for j in range(n)]
        trajectories = asyncio.run(batcher.run([self.fn(prompt, dict(sampling), self.tokenizer, client)
                                                for prompt, client in jobs]))
        self.last_round_sizes = batcher.round_sizes
        return [self.sample(prompt, client, t, sampling["max_tokens"])
                for (prompt, client), t in zip(jobs, trajectories)]

    def round(self, requests: list[Request] | None) -> list[Completion] | None:
        """One engine call, on every rank: the leader's `requests` (None on the others, who receive them); None
        when no engine has any."""
        if self.group is not None:
            box = [requests]
            leader = self.layout.engine_index * self.layout.engine_size
            torch.distributed.broadcast_object_list(box, src=leader, group=self.group)
            requests = box[0]
        flag = torch.tensor([1.0 if requests else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() == 0:
            return None
        return self.engine.complete(requests)

    def sample(self, prompt: Prompt, client: EngineClient, t: Trajectory, max_response_len: int) -> Sample:
        """The trajectory as a trainable sample: cut to `max_response_len` (truncated); aborted ones train on
        nothing and score 0."""
        problems = t.problems() if isinstance(t, Trajectory) else [f"returned {type(t).__name__}, not a Trajectory"]
        if problems:
            raise ValueError(f"{self.name}: the trajectory for {prompt.source}: {'; '.join(problems)}")
        status = "truncated" if len(t.response_ids) > max_response_len and t.status != "aborted" else t.status
        cut = slice(0, max_response_len)
        response_ids, loss_mask, logprobs = t.response_ids[cut], t.loss_mask[cut], t.logprobs[cut]
        reward = t.reward
        if status == "aborted":
            loss_mask, reward = [0] * len(response_ids), 0.0
        return Sample(prompt_ids=list(prompt.prompt_ids), response_ids=list(response_ids),
                      rollout_logprobs=[float(x) for x in logprobs], label=prompt.label,
                      response_text=self.tokenizer.decode(response_ids, skip_special_tokens=True),
                      truncated=status == "truncated", metadata={**prompt.metadata, **t.metadata},
                      loss_mask=list(loss_mask), given_reward=None if reward is None else float(reward),
                      num_turns=client.num_turns, num_tool_calls=t.num_tool_calls,
                      num_tool_failures=t.num_tool_failures)
