"""Our loss head against Megatron's cross entropy, on random logits: CPU milliseconds per micro-batch (one thread).

    .venv/bin/python benchmarks/loss_head.py --shape 8,90,512 --shape 4,58,32768

The part of the training phase where our step does more than a bare Megatron-core loop (bare_vs_step.py): the
response tokens' logprobs and entropy (`vocab_parallel.logprobs_and_entropy`, autograd through log-softmax)
against `vocab_parallel_cross_entropy` (a hand-written backward). Per shape [batch, sequence, vocabulary], the
median CPU time over alternating repetitions of: forward + backward with the entropy in the loss (an entropy bonus),
with the entropy a metric only (detached, as the actor does when --entropy-coef is 0), Megatron's cross entropy;
and the forward-only passes (the old logprobs). Prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cases(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from vime_spmd.train.megatron.vocab_parallel import logprobs_and_entropy

    def ours(entropy_grad: bool):
        x = logits.clone().requires_grad_()
        logp, entropy = logprobs_and_entropy(x, labels, 1.0, with_entropy=True)
        entropy = entropy if entropy_grad else entropy.detach()
        (logp.sum() + 0.01 * entropy.sum()).backward()

    def bare():
        x = logits.clone().requires_grad_()
        vocab_parallel_cross_entropy(x, labels).sum().backward()

    @torch.no_grad()
    def ours_forward():
        logprobs_and_entropy(logits, labels, 1.0, with_entropy=False)

    scratch = logits.clone()  # Megatron's cross entropy shifts its input in place: its own copy, made once

    @torch.no_grad()
    def bare_forward():
        vocab_parallel_cross_entropy(scratch, labels)

    @torch.no_grad()
    def clone():
        logits.clone()

    # With a backward, each side first clones the logits (a leaf to differentiate): "a clone" is that share.
    return {"ours, entropy bonus": lambda: ours(True), "ours, entropy metric": lambda: ours(False),
            "megatron cross entropy": bare, "ours, forward only": ours_forward,
            "megatron, forward only": bare_forward, "(a clone of the logits)": clone}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", action="append", help="batch,sequence,vocabulary (repeatable)")
    p.add_argument("--repeats", type=int, default=12)
    args = p.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1)
    torch.set_num_threads(1)
    for shape in args.shape or ["8,90,512", "4,58,32768"]:
        b, s, v = (int(x) for x in shape.split(","))
        g = torch.Generator().manual_seed(0)
        fns = cases(torch.randn(b, s, v, generator=g), torch.randint(0, v, (b, s), generator=g))
        times = {name: [] for name in fns}
        for i in range(args.repeats + 2):  # the first two warm up
            for name, fn in (fns.items() if i % 2 else reversed(fns.items())):
                start = time.process_time()
                fn()
                if i >= 2:
                    times[name].append(time.process_time() - start)
        print(f"logits [{b}, {s}, {v}], fp32, CPU ms per call (median of {args.repeats}, one thread)")
        for name, t in times.items():
            print(f"  {name:>24} {statistics.median(t) * 1e3:7.1f}")
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
