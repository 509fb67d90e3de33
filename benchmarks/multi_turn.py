"""Turn-by-turn batching of multi-turn rollouts (rollout/turns.py) against one engine call per turn (CPU).

    torchrun --nproc_per_node 1 benchmarks/multi_turn.py MODEL_DIR [--prompts 8 --n 4 --turns 4 --tokens 8]

One rank, one in-process engine (no trainer). The same generation function (TURNS model turns of TOKENS tokens,
eight fixed tool tokens between them) runs over PROMPTS x N trajectories three ways:
- batched: every trajectory in one event loop, a round per turn (`CustomGenerator`);
- one at a time: each trajectory alone, so every turn is an engine call of one request;
- the plain one-call rollout of the same number of tokens per response, for reference.
Prints a table: engine calls, requests per call, wall seconds, generated tokens/s (model tokens only).
"""

from __future__ import annotations

import argparse
import time

import torch

from vime_spmd.config import parse_config
from vime_spmd.config.checks import load_tokenizer
from vime_spmd.data.prompts import Prompt
from vime_spmd.parallel import Layout
from vime_spmd.rollout.engine import RolloutEngine
from vime_spmd.rollout.generate import Scorer
from vime_spmd.rollout.sampling import request_seeds, training_sampling
from vime_spmd.rollout.trajectory import Trajectory
from vime_spmd.rollout.turns import CustomGenerator
from vime_spmd.runtime.device import init_distributed, select_accelerator

TOOL_TOKENS = [40, 41, 42, 43, 44, 45, 46, 47]


def turns_fn(num_turns: int, tokens: int):
    async def fn(record, sampling, tokenizer, client) -> Trajectory:
        t = Trajectory([], [], [])
        for turn in range(num_turns):
            out = await client.generate(record.prompt_ids + t.response_ids,
                                        {"max_tokens": tokens, "ignore_eos": True})
            t.append(out.token_ids, out.logprobs)
            if turn < num_turns - 1:
                t.append(TOOL_TOKENS)
        return t

    return fn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8)
    args = p.parse_args()
    budget = args.turns * (args.tokens + len(TOOL_TOKENS))
    cfg = parse_config(["--hf-checkpoint", args.model, "--prompt-data", "-", "--device", "cpu",
                        "--n-samples-per-prompt", str(args.n), "--rollout-max-response-len", str(budget)])
    acc = select_accelerator("cpu")
    init_distributed(acc)
    layout = Layout(rank=0, world_size=1, tp_size=1, engine_size=1)
    engine = RolloutEngine(cfg.rollout, args.model, 7, acc, layout, training_sampling(cfg), budget)
    tokenizer = load_tokenizer(args.model)
    gen = CustomGenerator(engine, layout, Scorer("letter", 10.0), 7, turns_fn(args.turns, args.tokens), tokenizer,
                          torch.device("cpu"))
    prompts = [Prompt(tokenizer.encode(f"write the letter {c} five times"), "a", f"bench:{i}")
               for i, c in enumerate("abcdefghijklmnopqrstuvwxyz"[: args.prompts])]
    seeds = request_seeds(7, 0, range(len(prompts)))
    model_tokens = len(prompts) * args.n * args.turns * args.tokens

    gen.generate_share(prompts, seeds, None)  # warm-up
    rows = []
    start = time.perf_counter()
    gen.generate_share(prompts, seeds, None)
    rows.append(("batched turn by turn", len(gen.last_round_sizes), sum(gen.last_round_sizes),
                 time.perf_counter() - start))
    one = {**training_sampling(cfg), "n": 1}
    calls = requests = 0
    start = time.perf_counter()
    for prompt, seed in zip(prompts, seeds):
        for j in range(args.n):
            gen.generate_share([prompt], [seed + j], one)
            calls, requests = calls + len(gen.last_round_sizes), requests + sum(gen.last_round_sizes)
    rows.append(("one trajectory at a time", calls, requests, time.perf_counter() - start))
    plain = {**training_sampling(cfg), "max_tokens": args.turns * args.tokens, "ignore_eos": True}
    start = time.perf_counter()
    engine.generate([q.prompt_ids for q in prompts], [q.label for q in prompts], seeds, plain)
    rows.append(("plain rollout, one call (reference)", 1, len(prompts), time.perf_counter() - start))

    print(f"{len(prompts)} prompts x {args.n} trajectories x {args.turns} turns x {args.tokens} tokens "
          f"({model_tokens} model tokens)")
    print("| way | engine calls | requests per call | wall (s) | model tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, num_calls, num_requests, wall_s in rows:
        print(f"| {name} | {num_calls} | {num_requests / num_calls:.1f} | {wall_s:.2f} | {model_tokens / wall_s:.0f} |")
    engine.close()


if __name__ == "__main__":
    main()
