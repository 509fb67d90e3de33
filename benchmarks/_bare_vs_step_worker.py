"""One model size of benchmarks/bare_vs_step.py, run under torchrun: our step's phases against the bare engines.

    torchrun --nproc_per_node 1 benchmarks/_bare_vs_step_worker.py OUT.json REPEATS PROFILE -- RUN_PY_FLAGS...

Builds what a run builds (`prepare`, `build_colocated`, `RLStep`), then runs REPEATS + 1 rounds (the first
warms up) in one process, each holding:

    our step       `RLStep.run`: its record gives the rollout, training and step times
    bare rollout   `LLM.generate` on our engine's own `vllm.LLM`, with the prompt ids, SamplingParams and seeds of
                   the step's rollout (`BareRollout`)
    bare training  Megatron-core's schedule on the same model object, optimizer, samples and micro-batches
                   (`BareTraining`)

Odd rounds run the bare side first, even rounds ours. For that, the weights must not move: the driver passes
`--lr 1e-30`, under which Adam does all its work and changes no fp32 weight (an update of ~1e-30 is far below the
spacing of floats near any weight), so either side generates the same tokens from the same prompts and seeds
(checked every round: `same_tokens`). With PROFILE=1, one more round runs each phase under cProfile.
"""

import contextlib
import cProfile
import io
import json
import os
import pstats
import sys
import time
from functools import partial

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch.nn.utils.rnn import pad_sequence

from vime_spmd.batch import Sample
from vime_spmd.config import parse_config
from vime_spmd.loop.build import build_colocated
from vime_spmd.loop.metrics import StepTimer
from vime_spmd.loop.prepare import prepare
from vime_spmd.loop.step import RLStep
from vime_spmd.parallel import Layout
from vime_spmd.rollout.generate import RolloutGenerator, Scorer
from vime_spmd.rollout.sampling import TRAIN_STREAM, request_seeds, rollout_seed
from vime_spmd.runtime.device import init_distributed, select_accelerator

PROFILE_TOP = 20  # entries per profile, by self time


class TimerWithCpu(StepTimer):
    """The step's timer, also summing this process's CPU seconds per key: on a machine shared with other jobs,
    CPU time is the work done, whatever the wall clock lost to them."""

    def __init__(self, acc) -> None:
        super().__init__(acc)
        self.cpu_times: dict[str, float] = {}

    @contextlib.contextmanager
    def span(self, key: str):
        start = time.process_time()
        try:
            with super().span(key):
                yield
        finally:
            self.cpu_times[key] = self.cpu_times.get(key, 0.0) + time.process_time() - start


class Clock:
    """Wall and CPU seconds of one call."""

    def __init__(self) -> None:
        self.wall_s = self.cpu_s = 0.0

    @contextlib.contextmanager
    def __call__(self):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall_s, self.cpu_s = time.perf_counter() - wall, time.process_time() - cpu


class BareRollout:
    """`LLM.generate` on the engine's own `vllm.LLM`, with the step's prompt ids, SamplingParams and seeds."""

    def __init__(self, step: RLStep) -> None:
        self.step, self.llm, self.sampling = step, step.generator.engine.llm, step.generator.engine.training_sampling

    def next_requests(self) -> tuple[list[list[int]], list[int]]:
        """The prompt ids and seeds of the step's next rollout (one engine: all of them), leaving the data
        position where it was, so that the step then takes the same prompts."""
        dataset = self.step.dataset
        first = dataset.position
        prompts = dataset.next_batch(self.step.cfg.rollout.rollout_batch_size)
        dataset.position = first
        return [p.prompt_ids for p in prompts], request_seeds(self.step.generator.seed, TRAIN_STREAM,
                                                              range(first, first + len(prompts)))

    def generate(self, prompts: list[list[int]], seeds: list[int]) -> list[list[int]]:
        from vllm import SamplingParams

        params = [SamplingParams(**self.sampling, seed=seed) for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(c.token_ids) for out in outputs for c in out.outputs]


class BareTraining:
    """An RL training phase on bare Megatron-core, on our actor's model object and optimizer: a forward-only pass
    for the old logprobs (an RL loop needs them), then one optimizer step of a plain loss (masked mean cross
    entropy of the response tokens) over the same micro-batches as ours, `finalize_model_grads` scaling the
    summed gradients by the step's token count, and `optimizer.step()`."""

    def __init__(self, actor) -> None:
        self.actor, self.model, self.optimizer = actor, actor.model, actor.optimizer
        self.device = actor.acc.torch_device
        self.local_attention = actor.spec.build.attention_backend == "local"

    def batch(self, samples: list[Sample]) -> dict:
        tokens = pad_sequence([torch.tensor(s.prompt_ids + s.response_ids) for s in samples], batch_first=True)
        loss_mask = torch.zeros(tokens.shape)
        for i, s in enumerate(samples):  # position t predicts token t + 1
            loss_mask[i, len(s.prompt_ids) - 1 : s.num_tokens - 1] = 1.0
        seq_len = tokens.size(1)
        mask = None  # sdpa is causal by itself; Megatron's local attention takes the [s, s] mask
        if self.local_attention:
            mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)[None, None]
        tokens = tokens.to(self.device)
        return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": loss_mask.to(self.device),
                "position_ids": torch.arange(seq_len, device=self.device).expand_as(tokens),
                "attention_mask": None if mask is None else mask.to(self.device)}

    def run_schedule(self, batches: list[dict], loss_func, forward_only: bool) -> list:
        def forward_step(data_iterator, model):
            b = next(data_iterator)
            return model(b["tokens"], b["position_ids"], b["attention_mask"]), partial(loss_func, b)

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[self.model],
            num_microbatches=len(batches), seq_length=max(b["tokens"].size(1) for b in batches),
            micro_batch_size=batches[0]["tokens"].size(0), forward_only=forward_only)

    def train(self, samples: list[Sample]) -> float:
        t = self.actor.spec.micro_batches
        micro = lambda max_tokens: [self.batch([samples[i] for i in g])  # noqa: E731
                                    for g in self.actor.plan(samples, max_tokens)]

        def logprobs(b, logits):
            logp = -vocab_parallel_cross_entropy(logits.float(), b["labels"]) * b["loss_mask"]
            return logits.new_zeros(()), {"logprobs": logp}

        def loss(b, logits):
            per_token = vocab_parallel_cross_entropy(logits.float(), b["labels"])
            num_tokens = b["loss_mask"].sum().int()
            return (per_token * b["loss_mask"]).sum(), num_tokens, {"loss": per_token.detach()}

        self.model.eval()
        with torch.no_grad():  # kept, as a loop that used them would keep them
            self.old_logprobs = self.run_schedule(micro(t.logprob_max_tokens), logprobs, forward_only=True)
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = micro(t.max_tokens)
        self.run_schedule(batches, loss, forward_only=False)
        num_tokens = sum(b["loss_mask"].sum() for b in batches).int()
        finalize_model_grads([self.model], num_tokens=num_tokens)  # sums over DP, then scales by 1/num_tokens
        update_ok, grad_norm, _ = self.optimizer.step()
        assert update_ok, "bare training: non-finite gradients"
        return float(grad_norm)


def profile_top(fn) -> tuple[object, dict]:
    """fn()'s result, and the PROFILE_TOP functions with the most self time in it; also our own functions
    (vime_spmd's) with the most cumulative time, which show where our phase adds to the engine's work."""
    profiler = cProfile.Profile()
    start = time.perf_counter()
    result = profiler.runcall(fn)
    wall_s = time.perf_counter() - start
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = [{"function": f"{path.rsplit('site-packages/', 1)[-1].split('/vime_spmd/', 1)[-1]}:{line}({name})",
             "path": path, "calls": calls, "self_s": round(self_s, 4), "cumulative_s": round(cum_s, 4)}
            for (path, line, name), (_, calls, self_s, cum_s, _) in stats.stats.items()]
    ours = [r for r in rows if "/vime_spmd/" in r["path"]]
    for r in rows:
        del r["path"]
    return result, {"wall_s_profiled": round(wall_s, 4),
                    "by_self_time": sorted(rows, key=lambda r: -r["self_s"])[:PROFILE_TOP],
                    "ours_by_cumulative_time": sorted(ours, key=lambda r: -r["cumulative_s"])[:PROFILE_TOP]}


def measure_round(index: int, step: RLStep, timers: list[TimerWithCpu], bare_rollout: BareRollout,
                  bare_training: BareTraining) -> dict:
    """Our step and the bare rollout and training on the same prompts, seeds and samples, in alternating order:
    odd rounds run the bare side first, even rounds ours (so that neither side always runs on caches the other
    left). The weights do not move (see the module's docstring), so both sides generate the same tokens either
    way."""
    n = step.cfg.rollout.n_samples_per_prompt
    load_avg = os.getloadavg()[0]
    rollout_clock, train_clock, bare_grad_norms = Clock(), Clock(), []
    prompts, seeds = bare_rollout.next_requests()

    def bare_side(samples: list[Sample] | None) -> list[list[int]]:
        torch.distributed.barrier()
        with rollout_clock():
            tokens = bare_rollout.generate(prompts, seeds)
        samples = samples or [Sample(prompts[i // n], t, []) for i, t in enumerate(tokens)]
        torch.distributed.barrier()
        with train_clock():
            bare_grad_norms.append(bare_training.train(samples))
        return tokens

    bare_first = index % 2 == 1
    bare_tokens = bare_side(None) if bare_first else None
    record = step.run(index)
    samples = step.last_batch.samples
    if not bare_first:
        bare_tokens = bare_side(samples)
    return {"round": index, "warmup": index == 0, "bare_first": bare_first, "load_avg_1min": load_avg,
            "record": {k: v for k, v in record.items() if isinstance(v, (int, float))},
            "our_cpu_s": timers[-1].cpu_times,
            "generated_tokens": sum(len(s.response_ids) for s in samples),
            "same_tokens": [s.response_ids for s in samples] == bare_tokens,
            "train_tokens": sum(s.num_tokens for s in samples),
            "bare_rollout_s": rollout_clock.wall_s, "bare_rollout_cpu_s": rollout_clock.cpu_s,
            "bare_train_s": train_clock.wall_s, "bare_train_cpu_s": train_clock.cpu_s,
            "bare_grad_norm": bare_grad_norms[0]}


def profile_round(step: RLStep, bare_rollout: BareRollout, bare_training: BareTraining) -> dict:
    """One more round, each phase under cProfile: ours as the step calls its phases, bare as measured."""
    profiles = {}
    prompts, seeds = bare_rollout.next_requests()
    _, profiles["bare_rollout"] = profile_top(lambda: bare_rollout.generate(prompts, seeds))
    batch, profiles["our_rollout"] = profile_top(step.rollout)
    inputs, step_slices = step.train_inputs(batch)
    samples = list(inputs.samples)
    _, profiles["our_train"] = profile_top(lambda: step.train(batch, inputs, step_slices))
    _, profiles["bare_train"] = profile_top(lambda: bare_training.train(samples))
    return profiles


def main(out: str, repeats: int, profile: bool, run_flags: list[str]) -> None:
    cfg = parse_config(run_flags)
    assert cfg.global_batch_size == cfg.num_samples_per_rollout, "one optimizer step per step: the bare loop takes one"
    dataset, _ = prepare(cfg)
    acc = select_accelerator(cfg.parallel.device)
    init_distributed(acc)
    layout = Layout.of_world(cfg.parallel)
    assert layout.num_engines == 1 and layout.dp_size == 1, "every rank generates and trains on every sample"
    parts = build_colocated(cfg, acc, layout, dataset)
    timers: list[TimerWithCpu] = []

    def new_timer() -> TimerWithCpu:
        timers.append(TimerWithCpu(acc))
        return timers[-1]

    generator = RolloutGenerator(parts.engine, layout, Scorer.of(cfg.data), rollout_seed(cfg))
    step = RLStep(cfg, layout, dataset, parts.actor, parts.memory, parts.sync, new_timer, generator=generator)
    bare_rollout, bare_training = BareRollout(step), BareTraining(parts.actor)
    rounds = [measure_round(i, step, timers, bare_rollout, bare_training) for i in range(repeats + 1)]  # 0: warm-up
    result = {"world_size": layout.world_size, "torch_threads": torch.get_num_threads(),
              "num_params_per_rank": sum(p.numel() for p in parts.actor.model.parameters()), "rounds": rounds,
              "profiles": profile_round(step, bare_rollout, bare_training) if profile else None}
    if layout.rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    parts.close()  # the engine's close destroys the default group
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sep = sys.argv.index("--")
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[sep + 1:])
