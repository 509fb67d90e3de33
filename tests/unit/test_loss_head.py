"""The fused loss head (`vocab_parallel.response_logprobs`) against today's autograd head (`logprobs_and_entropy`,
then a gather of the response positions), at TP 1 (in this process) and TP 2 (two spawned gloo ranks, each with its
half of the vocabulary).

Values: the fused forward performs the same operations per element and per row, so logprobs and entropy are
bit-identical (`torch.equal`). Gradients: the closed form (p = exp(z - log Z), onehot - p, -p (z - E_p[z])) rounds
differently from autograd's chain through log, exp and the sums; the bound tested is
|fused - autograd| <= 8 float32 epsilons (~1e-6) x the largest |gradient| of the case, elementwise.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port


@dataclass(frozen=True)
class Case:
    name: str
    temperature: float = 1.0
    # "none"; "metric" (entropy_grad=False); "detached" (differentiable, detached by the caller); "bonus" (in the loss)
    entropy: str = "none"
    offset: float = 0.0  # added to every logit (the shift's job)
    vocab_size: int | None = None  # the true vocabulary when the logits' 96 columns are padded
    lengths: tuple[tuple[int, int], ...] = ((3, 5), (4, 9), (1, 6))  # (prompt, response) tokens per sample
    chunk_bytes: int = 96 * 4 * 3  # a few positions per chunk at TP 1: many chunks


CASES = [
    Case("logprobs"),
    Case("entropy-metric", entropy="metric"),
    Case("entropy-detached", entropy="detached"),
    Case("entropy-bonus", entropy="bonus"),
    Case("large-logits-entropy-bonus", temperature=0.7, entropy="bonus", offset=40.0),
    Case("large-logits", offset=40.0),
    Case("temperature-0.7-entropy-bonus", temperature=0.7, entropy="bonus"),
    Case("temperature-1.3-logprobs", temperature=1.3),
    Case("padded-vocabulary-entropy-bonus", temperature=0.7, entropy="bonus", vocab_size=90),
    Case("an-empty-response", entropy="bonus", lengths=((3, 5), (6, 0), (2, 9))),
    Case("all-responses-empty", entropy="bonus", lengths=((3, 0), (6, 0))),
    Case("one-chunk", entropy="bonus", chunk_bytes=1 << 30),
]
VOCAB = 96


def inputs(case: Case, tp_rank: int, tp_size: int, seed: int = 0) -> dict:
    """A micro-batch as the actor lays it out: right-padded sequences, response positions `index` (padding slots
    point at position 0, a real position of a sample whose prompt is one token), loss weights 0 on padding."""
    g = torch.Generator().manual_seed(seed)
    b, s = len(case.lengths), max(p + r for p, r in case.lengths)
    width = max(r for _, r in case.lengths)
    full = torch.randn(b, s, VOCAB, generator=g) * 3 + case.offset
    labels = torch.randint(0, case.vocab_size or VOCAB, (b, s), generator=g)
    index = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width)
    for i, (prompt, response) in enumerate(case.lengths):
        index[i, :response] = torch.arange(prompt - 1, prompt - 1 + response)
        mask[i, :response] = 1.0
    local = VOCAB // tp_size
    return {"full": full, "logits": full[..., tp_rank * local:(tp_rank + 1) * local].contiguous(), "labels": labels,
            "index": index, "weight_logp": torch.randn(b, width, generator=g) * mask,
            "weight_entropy": torch.randn(b, width, generator=g) * mask}


def loss_of(logp, entropy, x: dict, case: Case) -> torch.Tensor:
    loss = (logp * x["weight_logp"]).sum()
    if case.entropy == "bonus":
        loss = loss + (entropy * x["weight_entropy"]).sum()
    return loss


def fused(case: Case, x: dict) -> tuple:
    from vime_spmd.train.megatron.vocab_parallel import response_logprobs

    leaf = x["logits"].clone().requires_grad_()
    logits = leaf.clone()  # the head uses the storage of the logits it was given: not the leaf's
    logp, entropy = response_logprobs(logits, x["labels"], x["index"], case.temperature, case.entropy != "none",
                                      entropy_grad=case.entropy == "bonus", vocab_size=case.vocab_size,
                                      chunk_bytes=case.chunk_bytes)
    if case.entropy == "metric":
        assert not entropy.requires_grad
    if case.entropy == "detached":
        entropy = entropy.detach()
    loss_of(logp, entropy, x, case).backward()
    return logp.detach(), None if entropy is None else entropy.detach(), leaf.grad


def autograd(case: Case, x: dict) -> tuple:
    from vime_spmd.train.megatron.vocab_parallel import logprobs_and_entropy

    leaf = x["logits"].clone().requires_grad_()
    logp, entropy = logprobs_and_entropy(leaf, x["labels"], case.temperature, case.entropy != "none",
                                         vocab_size=case.vocab_size)
    logp = logp.gather(1, x["index"])
    entropy = None if entropy is None else entropy.gather(1, x["index"])
    if entropy is not None and case.entropy in ("metric", "detached"):
        entropy = entropy.detach()
    loss_of(logp, entropy, x, case).backward()
    return logp.detach(), None if entropy is None else entropy.detach(), leaf.grad


def check(case: Case, tp_rank: int, tp_size: int) -> None:
    """Every collective of the case runs before its first assertion (a rank that fails must not hang the other)."""
    from vime_spmd.train.megatron.vocab_parallel import response_logprobs

    x = inputs(case, tp_rank, tp_size)
    logp, entropy, grad = fused(case, x)
    ref_logp, ref_entropy, ref_grad = autograd(case, x)
    with torch.no_grad():  # the old-policy pass: same values, and the logits untouched
        logits = x["logits"].clone()
        no_graph, _ = response_logprobs(logits, x["labels"], x["index"], case.temperature, False,
                                        vocab_size=case.vocab_size, chunk_bytes=case.chunk_bytes)
    metric_only = None
    if case.entropy == "metric":  # an entropy without a gradient adds nothing to the backward
        metric_only = fused(replace(case, entropy="none"), x)[2]

    assert torch.equal(logp, ref_logp)
    assert torch.equal(no_graph, ref_logp)
    assert torch.equal(logits, x["logits"])
    if case.entropy == "none":
        assert entropy is None
    else:
        assert torch.equal(entropy, ref_entropy)
    bound = 8 * torch.finfo(torch.float32).eps * ref_grad.abs().max().item()
    torch.testing.assert_close(grad, ref_grad, rtol=0.0, atol=bound)
    if metric_only is not None:
        assert torch.equal(grad, metric_only)
    # Exactly 0 off the response positions and on padded columns.
    response = torch.zeros(grad.shape[:2], dtype=torch.bool)
    for i, (prompt, length) in enumerate(case.lengths):
        response[i, prompt - 1:prompt - 1 + length] = True
    assert torch.count_nonzero(grad[~response]) == 0
    if case.vocab_size is not None:
        columns = torch.arange(tp_rank * grad.size(-1), (tp_rank + 1) * grad.size(-1))
        assert torch.count_nonzero(grad[..., columns >= case.vocab_size]) == 0
    if all(length == 0 for _, length in case.lengths):
        assert logp.shape == (len(case.lengths), 0) and torch.count_nonzero(grad) == 0


def _init(rank: int, world_size: int, port: int) -> None:
    from megatron.core import parallel_state

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)


def _close() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _rank(rank: int, world_size: int, port: int, report: str) -> None:
    torch.set_num_threads(1)
    _init(rank, world_size, port)
    results = {}
    for case in CASES:
        try:
            check(case, rank, world_size)
            results[case.name] = "ok"
        except Exception:  # noqa: BLE001 - reported per case by the test
            results[case.name] = traceback.format_exc()
    with open(f"{report}.{rank}", "w") as f:
        json.dump(results, f)
    _close()


@pytest.fixture(scope="module")
def tp1():
    _init(0, 1, free_port())
    yield
    _close()


@pytest.fixture(scope="module")
def tp2_report(tmp_path_factory) -> list[dict]:
    report = str(tmp_path_factory.mktemp("tp2") / "report")
    mp.spawn(_rank, args=(2, free_port(), report), nprocs=2)
    return [json.loads(open(f"{report}.{rank}").read()) for rank in range(2)]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tp1(tp1, case):
    check(case, 0, 1)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tp2(tp2_report, case):
    for rank, results in enumerate(tp2_report):
        assert results[case.name] == "ok", f"rank {rank}:\n{results[case.name]}"
