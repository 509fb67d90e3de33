"""One measurement of the training-memory benchmark, run as its own process (a world of one) by
benchmarks/train_memory.py, so that no earlier configuration's freed-but-kept heap hides this one's peak.

Peak memory: the kernel's high-water mark of this process's resident set (VmHWM in /proc/self/status), reset just
before the measured call by writing 5 to /proc/self/clear_refs (Linux >= 4.0); the figure is VmHWM after the call
minus VmRSS before it: what the call added at its peak (activations, gradients of activations, temporaries), on
top of the weights, gradient buffer and Adam state that are already resident (a warm-up step allocates Adam's).

    python benchmarks/_train_memory_worker.py MODEL_DIR BACKEND OUT.json memory RESPONSE_LEN
    python benchmarks/_train_memory_worker.py MODEL_DIR BACKEND OUT.json throughput fixed|dynamic
"""

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from vime_spmd.batch import Sample, TrainInputs, response_mask
from vime_spmd.config import parse_and_check
from vime_spmd.parallel import Layout
from vime_spmd.runtime.device import init_distributed, select_accelerator
from vime_spmd.train.megatron import load_actor

PROMPT_LEN = 64
# Throughput: a rollout of mostly short responses and a few long ones, in a fixed shuffled order.
NUM_SHORT, SHORT_LEN, NUM_LONG, LONG_LEN = 12, 128, 4, 1024
MICRO_BATCH = 4  # fixed micro-batches; the token budget is the same memory: 4 of the longest samples
TOKEN_BUDGET = MICRO_BATCH * (PROMPT_LEN + LONG_LEN)
THROUGHPUT_REPEATS = 5


def status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_added_mib(fn):
    """(fn(), MiB that fn added to the resident set at its peak, seconds)."""
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, (status_kib("VmHWM") - before) / 1024, seconds


def synthetic(vocab: int, response_lens: list[int], seed: int) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    return [Sample(prompt_ids=torch.randint(0, vocab, (PROMPT_LEN,), generator=g).tolist(),
                   response_ids=torch.randint(0, vocab, (n,), generator=g).tolist(), rollout_logprobs=[0.0] * n)
            for n in response_lens]


def inputs_for(actor, samples: list[Sample]) -> tuple[TrainInputs, float]:
    width = max(len(s.response_ids) for s in samples)
    mask = response_mask(samples, width)
    inputs = TrainInputs(samples=samples, batch_rows=list(range(len(samples))), response_mask=mask,
                         rollout_logprobs=torch.zeros_like(mask))
    inputs.old_logprobs = actor.compute_logprobs(samples)
    inputs.rollout_logprobs = inputs.old_logprobs
    inputs.advantages = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)) * mask
    return inputs, mask.sum().item()


def main(model_dir: str, backend: str, out: str, mode: str, arg: str) -> None:
    from transformers import AutoConfig

    # One thread, as each rank of a 2-rank torchrun on a 2-core machine (torchrun sets OMP_NUM_THREADS=1); and with
    # one thread a step's CPU time is its work, without OpenMP threads spinning while the machine is busy.
    torch.set_num_threads(1)
    dynamic = mode == "throughput" and arg == "dynamic"
    cfg = parse_and_check(["--hf-checkpoint", model_dir, "--prompt-data", "unused", "--device", "cpu",
                           "--attention-backend", backend,
                           "--micro-batch-size", str(MICRO_BATCH if mode == "throughput" else 1),
                           "--lr", "1e-5", "--seed", "3",
                           *(["--use-dynamic-batch-size", "--max-tokens-per-gpu", str(TOKEN_BUDGET)] if dynamic
                             else [])], world_size=1)
    acc = select_accelerator("cpu")
    init_distributed(acc)
    actor = load_actor(acc)(cfg, acc, Layout.of_world(cfg.parallel), AutoConfig.from_pretrained(model_dir))
    vocab = actor.shape.vocab_size
    actor.train_step(*inputs_for(actor, synthetic(vocab, [8, 8], seed=0)))  # warm-up: Adam allocates its state
    result = {"backend": backend, "mode": mode, "torch_threads": torch.get_num_threads(),
              "load_avg_1min": os.getloadavg()[0]}
    if mode == "memory":
        samples = synthetic(vocab, [int(arg)], seed=1)
        (inputs, denominator), logprobs_mib, _ = peak_added_mib(lambda: inputs_for(actor, samples))
        metrics, train_mib, train_s = peak_added_mib(lambda: actor.train_step(inputs, denominator))
        result |= {"response_len": int(arg), "tokens": samples[0].num_tokens, "logprobs_peak_added_mib": logprobs_mib,
                   "train_peak_added_mib": train_mib, "train_step_s": train_s}
    else:
        lens = [SHORT_LEN] * NUM_SHORT + [LONG_LEN] * NUM_LONG
        random.Random(0).shuffle(lens)
        samples = synthetic(vocab, lens, seed=2)
        inputs, denominator = inputs_for(actor, samples)
        step_s, cpu_s = [], []

        def steps():  # the machine is shared: several steps, wall and CPU time
            for _ in range(THROUGHPUT_REPEATS):
                start, start_cpu = time.perf_counter(), time.process_time()
                metrics = actor.train_step(inputs, denominator)
                step_s.append(time.perf_counter() - start)
                cpu_s.append(time.process_time() - start_cpu)
            return metrics

        metrics, train_mib, _ = peak_added_mib(steps)
        tokens = sum(s.num_tokens for s in samples)
        result |= {"batching": arg, "num_samples": len(samples), "tokens": tokens,
                   "num_micro_batches": len(actor.plan(samples, cfg.train.max_tokens_per_gpu)),
                   "padding_ratio": metrics["padding_ratio"], "train_step_s": min(step_s),
                   "train_step_s_all": step_s, "tokens_per_s": tokens / min(step_s),
                   "train_step_cpu_s": statistics.median(cpu_s), "tokens_per_cpu_s": tokens / statistics.median(cpu_s),
                   "train_peak_added_mib": train_mib}
    Path(out).write_text(json.dumps(result))
    actor.close()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
