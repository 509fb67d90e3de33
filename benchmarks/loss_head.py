"""The loss head on random logits, CPU: our fused head against today's autograd head and Megatron's cross entropy, in
time per micro-batch (one thread) and in peak extra memory against tokens; and `param_norm`'s float64 reduction.

    .venv/bin/python benchmarks/loss_head.py --out runs/bench/loss_head.json
    .venv/bin/python benchmarks/loss_head.py --shape 4,58,32768 --memory-tokens 1024,2048 --tp 1   # a part

Time, per shape [batch, sequence, vocabulary]: the median CPU time over alternating repetitions of forward +
backward with the entropy in the loss (an entropy bonus), with the entropy a metric only (no gradient, as the actor
does when --entropy-coef is 0), Megatron's `vocab_parallel_cross_entropy`; and the forward-only passes (the old
logprobs). Every position is a response position here (Megatron's loss covers them all).

Memory, per TP size and token count at the vocabulary of --vocab (Qwen3's 151,936): logits [1, tokens, vocab/TP]
fp32 are allocated first, then the peak of the bytes allocated during forward + backward beyond them, from the
allocation events of torch's profiler (`profile_memory`: every tensor allocation and free of the process, exact;
at TP 2 on rank 0 of two gloo processes). The gradient of the logits counts as extra when it is a new tensor (today's
head); the fused head and Megatron's write it into the logits' storage. The logits come from an autograd Function
that stands for the model's last layer (a leaf's .grad would add a copy of the gradient).

param_norm: a float64 norm per whole tensor (the old `actor.param_norm`) against per 64K-element piece (the new one)
over random tensors of the 100m model's shapes (126M parameters), one thread.

Prints tables and writes them as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Logits(torch.autograd.Function):
    """A copy of the logits as a model's last layer hands them over: not a leaf, and their gradient goes no further
    (a leaf's .grad would add a copy of the gradient for the heads that return it in the logits' storage)."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None


def model_logits(logits: torch.Tensor) -> torch.Tensor:
    return _Logits.apply(torch.zeros((), requires_grad=True), logits)


def heads(labels: torch.Tensor, num_response: int | None = None, chunk_bytes: int | None = None) -> dict:
    """name -> (forward + backward with the entropy bonus, with the entropy a metric, forward only), each a function of
    its own leaf copy of the logits (None: not applicable)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from vime_spmd.train.megatron.vocab_parallel import logprobs_and_entropy, response_logprobs

    s = labels.size(1)
    index = torch.arange(s - (num_response or s), s).expand(labels.size(0), -1)  # the last positions of each row

    def fused(x, entropy_grad: bool):
        logp, entropy = response_logprobs(x, labels, index, 1.0, with_entropy=True, entropy_grad=entropy_grad,
                                          chunk_bytes=chunk_bytes)
        (logp.sum() + 0.01 * entropy.sum()).backward()

    def autograd(x, entropy_grad: bool):
        logp, entropy = logprobs_and_entropy(x, labels, 1.0, with_entropy=True)
        (logp.sum() + 0.01 * (entropy if entropy_grad else entropy.detach()).sum()).backward()

    def megatron(x):
        vocab_parallel_cross_entropy(x, labels).sum().backward()

    def forward(fn):
        return torch.no_grad()(fn)

    return {
        "fused": (lambda x: fused(x, True), lambda x: fused(x, False),
                  forward(lambda x: response_logprobs(x, labels, index, 1.0, with_entropy=False))),
        "autograd": (lambda x: autograd(x, True), lambda x: autograd(x, False),
                     forward(lambda x: logprobs_and_entropy(x, labels, 1.0, with_entropy=False))),
        # Megatron's cross entropy shifts its input in place: it also gets its own copy for the forward-only pass.
        "megatron": (None, megatron, forward(lambda x: vocab_parallel_cross_entropy(x, labels))),
    }


def time_shape(shape: str, repeats: int) -> dict:
    b, s, v, *r = (int(x) for x in shape.split(","))
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(b, s, v, generator=g), torch.randint(0, v, (b, s), generator=g)
    fns = {}
    for name, (bonus, metric, fwd) in heads(labels, *r).items():
        if r and name != "fused":  # the others compute every position
            continue
        for kind, fn in (("entropy bonus", bonus), ("entropy metric", metric), ("forward only", fwd)):
            if fn is not None:  # each call on its own copy of the logits: a leaf to differentiate (and to overwrite)
                fns[f"{name}, {kind}"] = lambda fn=fn, grad=kind != "forward only": fn(
                    model_logits(logits) if grad else logits.clone())
    fns["(a clone of the logits)"] = logits.clone
    times = {name: [] for name in fns}
    for i in range(repeats + 2):  # the first two warm up
        for name, fn in (fns.items() if i % 2 else reversed(fns.items())):
            start = time.process_time()
            fn()
            if i >= 2:
                times[name].append(time.process_time() - start)
    ms = {name: round(statistics.median(t) * 1e3, 2) for name, t in times.items()}
    print(f"logits [{b}, {s}, {v}]{f', {r[0]} response positions per row' if r else ''}, fp32, CPU ms per call "
          f"(median of {repeats}, one thread)")
    for name, t in ms.items():
        print(f"  {name:>28} {t:7.1f}")
    return ms


def peak_extra_bytes(fn, logits: torch.Tensor) -> int:
    """Peak bytes allocated while `fn(logits)` runs, beyond what was allocated before (the profiler's events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(logits)
    running = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            running += event.nbytes()
            peak = max(peak, running)
    return peak


def memory_rank(rank: int, tp: int, port: int, vocab: int, tokens: list[int], autograd_max: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
    from megatron.core import parallel_state

    from vime_spmd.train.megatron.vocab_parallel import CHUNK_BYTES

    parallel_state.initialize_model_parallel(tp)
    rows = []
    for n in tokens:
        g = torch.Generator().manual_seed(rank)
        labels = torch.randint(0, vocab, (1, n), generator=g)
        logits_bytes = n * (vocab // tp) * 4
        row = {"tokens": n, "logits_bytes": logits_bytes}
        cases = {f"{name}, {kind}": fn for name, (bonus, metric, _) in heads(labels).items()
                 for kind, fn in (("entropy bonus", bonus), ("entropy metric", metric))
                 if fn is not None and (name != "autograd" or n <= autograd_max)}
        cases["fused, entropy bonus, accelerator chunks"] = heads(labels, chunk_bytes=CHUNK_BYTES["accelerator"])[
            "fused"][0]
        for name, fn in cases.items():
            logits = model_logits(torch.randn(1, n, vocab // tp, generator=g))
            row[name] = peak_extra_bytes(fn, logits)
            del logits
        rows.append(row)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def memory(tp: int, vocab: int, tokens: list[int], autograd_max: int, scratch: Path) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = scratch / f"memory_tp{tp}.json"
    mp.spawn(memory_rank, args=(tp, port, vocab, tokens, autograd_max, str(out)), nprocs=tp)
    rows = json.loads(out.read_text())
    gib = 1 << 30
    print(f"peak extra memory beyond the logits, GiB: vocab {vocab}, TP {tp} (per rank), fp32, forward + backward")
    for row in rows:
        cells = "  ".join(f"{k}: {v / gib:.3f}" for k, v in row.items() if k != "tokens")
        print(f"  {row['tokens']:>6} tokens  {cells}")
    return rows


def param_norm(repeats: int) -> dict:
    """A float64 norm per whole tensor against per 64K-element piece, over the 100m model's parameter shapes."""
    hidden, ffn, vocab, layers = 768, 2048, 32768, 12
    shapes = [(vocab, hidden)] + [(3 * hidden, hidden), (hidden, hidden), (2 * ffn, hidden), (hidden, ffn),
                                  (hidden,), (hidden,)] * layers + [(hidden,)]
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(*s, generator=g) * 0.02 for s in shapes]
    exact = torch.sqrt(sum(p.double().square().sum() for p in params)).item()

    def whole():
        return torch.stack([torch.linalg.vector_norm(p, dtype=torch.float64) for p in params]).square().sum()

    def pieces():
        return torch.stack([torch.linalg.vector_norm(x, dtype=torch.float64) for p in params
                            for x in p.reshape(-1).split(1 << 16)]).square().sum()

    result = {"parameters": sum(p.numel() for p in params)}
    for name, fn in (("whole tensors", whole), ("64K pieces", pieces)):
        fn()
        times = []
        for _ in range(repeats):
            start = time.process_time()
            value = fn().sqrt().item()
            times.append(time.process_time() - start)
        result[name] = {"ms": round(statistics.median(times) * 1e3, 1), "relative_error": abs(value - exact) / exact}
    print(f"param_norm over {result['parameters'] / 1e6:.1f}M parameters, CPU ms (median of {repeats}, one thread):",
          {k: v for k, v in result.items() if k != "parameters"})
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", action="append",
                   help="batch,sequence,vocabulary[,response positions per row, the fused head only] (repeatable)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--memory-tokens", default="1024,2048,4096,8192")
    p.add_argument("--autograd-max-tokens", type=int, default=2048, help="today's head only up to here (its memory)")
    p.add_argument("--tp", action="append", type=int, help="TP sizes of the memory rows (repeatable; default 1 and 2)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    from vime_spmd.train.megatron.vocab_parallel import CHUNK_BYTES

    report = {"load_average_before": os.getloadavg(), "chunk_bytes": CHUNK_BYTES}
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1)
    torch.set_num_threads(1)
    shapes = args.shape or ["8,90,512", "4,58,32768", "4,58,32768,32"]
    report["time_ms"] = {shape: time_shape(shape, args.repeats) for shape in shapes}
    report["param_norm"] = param_norm(args.repeats)
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    tokens = [int(n) for n in args.memory_tokens.split(",") if n]
    scratch = (args.out.parent if args.out else Path("runs/bench"))
    scratch.mkdir(parents=True, exist_ok=True)
    report["memory_bytes"] = {tp: memory(tp, args.vocab, tokens, args.autograd_max_tokens, scratch)
                              for tp in args.tp or [1, 2]} if tokens else {}
    report["load_average_after"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
