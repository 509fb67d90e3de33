"""Under torchrun on 2 ranks, without an engine: the training options change how the model computes, not what.

1. Attention: the actor built with `--attention-backend local` (Megatron's unfused attention and its [s, s] mask)
   and with `sdpa` runs the same right-padded micro-batches; the max |logit difference| over real positions, per
   tensor-parallel size given.
2. Options: for each case (a name, TP, extra flags), one training step on fixed synthetic inputs
   (check_pipeline.train_one_step), with counts of what ran: decoder-layer and core-attention forward calls during
   the step, the sequence length a layer saw, and the optimizer's parameter elements on this rank.

Rank 0 writes REPORT_DIR/report.json: {"attention": {tpN: ...}, "cases": {name: ...}}.

    torchrun --nproc_per_node 2 check_training_options.py REPORT_DIR MODEL_DIR TP,TP CASE=TP[:FLAG,FLAG,...] [...]

e.g. `sp=2:--sequence-parallel,--recompute-granularity,full` (the flags comma-separated).
"""

import json
import sys
from pathlib import Path

import torch

from tests.integration.scripts.check_pipeline import LR, OPTIMIZER, checked_config, synthetic_samples, train_one_step
from vime_spmd.parallel import Layout
from vime_spmd.runtime.device import init_distributed, select_accelerator
from vime_spmd.train.megatron import MegatronActor
from vime_spmd.train.spec import ActorSpec

MICRO_BATCH = 3
ADAM_LR = 1e-4  # a case that names --optimizer adam (the distributed optimizer shards Adam only)


def build(acc, model_dir: str, tp: int, flags: list[str]) -> MegatronActor:
    from transformers import AutoConfig

    # Plain SGD unless the case names its optimizer: why in check_pipeline.OPTIMIZER.
    optimizer = ["--lr", str(ADAM_LR)] if "--optimizer" in flags else [*OPTIMIZER, "--lr", str(LR)]
    cfg = checked_config(["--hf-checkpoint", model_dir, "--prompt-data", "unused", "--device", "cpu",
                          "--tensor-model-parallel-size", str(tp), *optimizer, "--use-kl-loss", "--kl-loss-coef",
                          "0.1", "--entropy-coef", "0.01", "--seed", "3", *flags], MICRO_BATCH)
    return MegatronActor(ActorSpec.of(cfg), acc, Layout.of_world(cfg.parallel), AutoConfig.from_pretrained(model_dir))


def logits_of(acc, model_dir: str, tp: int, backend: str, samples) -> list[torch.Tensor]:
    """Full-vocabulary logits [b, s, V] of each micro-batch under `backend`."""
    from megatron.core import parallel_state

    actor = build(acc, model_dir, tp, ["--attention-backend", backend])
    tp_group = parallel_state.get_tensor_model_parallel_group()

    def gathered(k, batch, logits):
        shards = [torch.empty_like(logits) for _ in range(tp)]
        torch.distributed.all_gather(shards, logits.contiguous(), group=tp_group)
        return logits.new_zeros(()), 0, torch.cat(shards, dim=-1)[..., : actor.shape.vocab_size]

    chunks = [samples[i : i + MICRO_BATCH] for i in range(0, len(samples), MICRO_BATCH)]
    batches = [actor._micro_batch(c) for c in chunks]
    assert (batches[0]["attention_mask"] is None) == (backend == "sdpa")
    with torch.no_grad():
        actor.model.eval()
        out = actor.run_micro_batches(actor.model, batches, gathered, forward_only=True)
    actor.close()
    return out


def compare_attention(acc, model_dir: str, tp: int, samples) -> dict:
    local, sdpa = logits_of(acc, model_dir, tp, "local", samples), logits_of(acc, model_dir, tp, "sdpa", samples)
    diff = 0.0
    for k, (a, b) in enumerate(zip(local, sdpa)):
        for i, s in enumerate(samples[k * MICRO_BATCH : (k + 1) * MICRO_BATCH]):
            diff = max(diff, (a[i, : s.num_tokens] - b[i, : s.num_tokens]).abs().max().item())
    return {"max_logit_abs_diff": diff, "max_logit_abs": max(t.abs().max().item() for t in local)}


def train_case(acc, model_dir: str, tp: int, flags: list[str], samples) -> dict:
    actor = build(acc, model_dir, tp, flags)
    counts = {"layer_calls": 0, "core_attention_calls": 0, "layer_seq_lens": set()}
    counting = False

    def on_layer(module, args, kwargs):
        if counting:
            counts["layer_calls"] += 1
            hidden = args[0] if args else kwargs["hidden_states"]
            counts["layer_seq_lens"].add(hidden.size(0))

    def on_attention(module, args):
        if counting:
            counts["core_attention_calls"] += 1

    for layer in actor.model.module.decoder.layers:
        layer.register_forward_pre_hook(on_layer, with_kwargs=True)
        layer.self_attention.core_attention.register_forward_pre_hook(on_attention)
    step = actor.train_step

    def counted_step(*args, **kwargs):
        nonlocal counting
        counting = True
        try:
            return step(*args, **kwargs)
        finally:
            counting = False

    actor.train_step = counted_step
    world = torch.distributed.get_world_size()
    layout = Layout(rank=torch.distributed.get_rank(), world_size=world, tp_size=tp, engine_size=1)
    report = train_one_step(actor, layout, samples)
    report |= {"layer_calls": counts["layer_calls"], "core_attention_calls": counts["core_attention_calls"],
               "layer_seq_lens": sorted(counts["layer_seq_lens"]),
               "num_layers": len(actor.model.module.decoder.layers),
               "micro_batches": -(-len(layout.train_rows(len(samples), len(samples))) // MICRO_BATCH),
               "optimizer_numel": sum(p.numel() for g in actor.optimizer.param_groups for p in g["params"]),
               "model_numel": sum(p.numel() for p in actor.model.module.parameters()),
               "logprobs_after": actor.compute_logprobs(samples).tolist()}
    report.pop("train_step_s")
    actor.close()
    return report


def main(out: str, model_dir: str, attention_tps: str, cases: list[str]) -> None:
    acc = select_accelerator("cpu")
    init_distributed(acc)
    samples = synthetic_samples(vocab=200, num=6, seed=5)  # lengths 5..17: every micro-batch is padded
    report: dict = {"attention": {}, "cases": {}}
    for tp in map(int, attention_tps.split(",")):
        report["attention"][f"tp{tp}"] = compare_attention(acc, model_dir, tp, samples)
    for spec in cases:
        name, _, rest = spec.partition("=")
        tp, _, flags = rest.partition(":")
        report["cases"][name] = train_case(acc, model_dir, int(tp), flags.split(",") if flags else [], samples)
    if torch.distributed.get_rank() == 0:
        Path(out, "report.json").write_text(json.dumps(report, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
