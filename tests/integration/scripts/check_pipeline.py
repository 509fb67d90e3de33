"""Under torchrun, for each case given (a name, an HF model, a training layout TP,PP; the rest of the world is data
parallel): build the actor, compare its logits and logprobs with transformers, export it back to HF, run one
training step on fixed synthetic inputs, and export the updated weights. Rank 0 writes REPORT_DIR/report.json
(per case) and REPORT_DIR/{CASE}.pt (the updated HF tensors), for the test to compare layouts.

    torchrun --nproc_per_node W check_pipeline.py REPORT_DIR CASE=MODEL_DIR:TP,PP[:FLAG,FLAG,...] [...]

e.g. `dyn=/m:1,2:--use-dynamic-batch-size,--max-tokens-per-gpu,28` (extra flags comma-separated).
"""

import json
import sys
import time
from pathlib import Path

import torch

from vime_spmd.batch import Sample, TrainInputs
from vime_spmd.config import parse_and_check
from vime_spmd.parallel import Layout
from vime_spmd.runtime.device import init_distributed, select_accelerator
from vime_spmd.train.megatron import MegatronActor, MegatronExport
from vime_spmd.train.megatron.model import load_hf_state_dict
from vime_spmd.train.spec import ActorSpec

NUM_SAMPLES = 8  # one optimizer step over all of them
MICRO_BATCH = 2
# Plain SGD (no momentum) so that the step compares across layouts: each weight moves by -LR x clip x gradient,
# linear in the gradient, so layouts that sum the gradient in another order move it by LR x (that difference). Adam's
# first step moves each weight by ~LR x g / (|g| + eps): near g = 0 it multiplies a gradient's summation noise by up
# to LR / eps (1e4 at LR 1e-4), which is why a 1e-6 bound through Adam held on one CPU's kernels and not another's.
OPTIMIZER = ("--optimizer", "sgd", "--sgd-momentum", "0")
LR = 0.1


def checked_config(flags: list[str], micro_batch: int):
    """The config of these flags, checked as a run's on this world (parse_and_check). The actor reads no rollout
    size; the one given is one that every layout of the world splits: a multiple of the engines (one per rank) and
    of the data-parallel ranks x `micro_batch`."""
    world_size = torch.distributed.get_world_size()
    return parse_and_check(["--rollout-batch-size", str(world_size * micro_batch), "--micro-batch-size",
                            str(micro_batch), *flags], world_size)


def synthetic_samples(vocab: int, num: int, seed: int) -> list[Sample]:
    """Prompts and responses of different lengths (so micro-batches differ in length)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(num):
        p, r = 3 + (5 * i) % 7, 2 + (3 * i) % 9
        ids = torch.randint(0, vocab, (p + r,), generator=g).tolist()
        samples.append(Sample(prompt_ids=ids[:p], response_ids=ids[p:], rollout_logprobs=[0.0] * r))
    return samples


def compare_with_transformers(actor, model_dir: str, samples: list[Sample]) -> dict:
    """Logits (every position) and response logprobs against transformers, as max abs differences."""
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM

    tp_group = parallel_state.get_tensor_model_parallel_group()

    def gathered_logits(k, batch, logits):
        shards = [torch.empty_like(logits) for _ in range(actor.layout.tp_size)]
        torch.distributed.all_gather(shards, logits.contiguous(), group=tp_group)
        return logits.new_zeros(()), 0, torch.cat(shards, dim=-1)[..., : actor.shape.vocab_size]

    chunks = [samples[i : i + MICRO_BATCH] for i in range(0, len(samples), MICRO_BATCH)]
    with torch.no_grad():
        actor.model.eval()
        per_chunk = actor.run_micro_batches(actor.model, [actor._micro_batch(c) for c in chunks], gathered_logits,
                                            forward_only=True)
    logp = actor.compute_logprobs(samples)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    logit_diff, logp_diff = 0.0, 0.0
    with torch.no_grad():
        for i, s in enumerate(samples):
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            ref = hf(ids).logits[0]
            if per_chunk:  # the last stage
                mine = per_chunk[i // MICRO_BATCH][i % MICRO_BATCH, : ids.size(1)]
                logit_diff = max(logit_diff, (mine - ref).abs().max().item())
            ref_logp = ref.log_softmax(-1)[len(s.prompt_ids) - 1 : -1].gather(
                -1, torch.tensor(s.response_ids).unsqueeze(-1)).squeeze(-1)
            logp_diff = max(logp_diff, (logp[i, : len(s.response_ids)] - ref_logp).abs().max().item())
    # The logits live on the last stage: its verdict for every rank.
    logit_diff = actor._from_last_stage(torch.tensor([logit_diff], dtype=torch.float64)).item()
    # Every rank must return the same logprobs, whatever its stage.
    everyone = [torch.empty_like(logp) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(everyone, logp.contiguous())
    return {"max_logit_abs_diff": logit_diff, "max_logprob_abs_diff": logp_diff,
            "logprobs_equal_on_all_ranks": all(torch.equal(e, everyone[0]) for e in everyone)}


def train_one_step(actor, layout: Layout, samples: list[Sample]) -> dict:
    """One optimizer step over `samples` (this rank's data-parallel share), with fixed advantages and old
    logprobs perturbed from the current ones (so ratios move and some clip)."""
    rows = layout.train_rows(len(samples), len(samples))
    width = max(len(s.response_ids) for s in samples)
    mask = torch.zeros(len(samples), width)
    for i, s in enumerate(samples):
        mask[i, : len(s.response_ids)] = 1.0
    g = torch.Generator().manual_seed(7)
    advantages = torch.randn(len(samples), width, generator=g) * mask
    noise = 0.3 * torch.randn(len(samples), width, generator=g) * mask
    index = torch.tensor(rows)
    mine = [samples[i] for i in rows]
    inputs = TrainInputs(samples=mine, batch_rows=rows, response_mask=mask[index], rollout_logprobs=noise[index])
    current = actor.compute_logprobs(mine)
    inputs.old_logprobs = torch.nn.functional.pad(current, (0, width - current.size(1))) + noise[index]
    inputs.rollout_logprobs = inputs.old_logprobs
    ref = actor.compute_logprobs(mine, reference=True)
    inputs.ref_logprobs = torch.nn.functional.pad(ref, (0, width - ref.size(1)))
    inputs.advantages = advantages[index]
    start = time.perf_counter()
    metrics = actor.train_step(inputs, denominator=mask.sum().item())
    metrics["train_step_s"] = time.perf_counter() - start
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, {k: v for k, v in metrics.items() if k != "train_step_s"})
    metrics["metrics_equal_on_all_ranks"] = all(e == everyone[0] for e in everyone)
    return metrics


def check(acc, out: Path, case: str, model_dir: str, tp: int, pp: int, flags: list[str]) -> dict:
    from transformers import AutoConfig

    cfg = checked_config(["--hf-checkpoint", model_dir, "--prompt-data", "unused", "--device", "cpu",
                          "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                          *OPTIMIZER, "--lr", str(LR), "--use-kl-loss", "--kl-loss-coef", "0.1", "--entropy-coef",
                          "0.01", "--seed", "3", *flags], MICRO_BATCH)
    layout = Layout.of_world(cfg.parallel)  # the actor checks that Megatron's groups agree with it
    start = time.perf_counter()
    actor = MegatronActor(ActorSpec.of(cfg), acc, layout, AutoConfig.from_pretrained(model_dir))
    export = MegatronExport.of(actor)
    build_s = time.perf_counter() - start
    samples = synthetic_samples(actor.shape.vocab_size, NUM_SAMPLES, seed=11)
    report = {"layout": f"tp{tp}-pp{pp}-dp{layout.dp_size}", "build_s": build_s}
    report |= compare_with_transformers(actor, model_dir, samples[:5])  # 5: the last micro-batch is short
    exported = dict(export.hf_weights())
    original = load_hf_state_dict(model_dir)
    report["exported_names_equal"] = sorted(exported) == sorted(original)
    report["mismatched_tensors"] = [k for k in original
                                    if k not in exported or not torch.equal(exported[k], original[k])]
    report["param_norm_before"] = actor.param_norm()
    report |= train_one_step(actor, layout, samples)
    report["param_norm_after"] = actor.param_norm()
    # After the step: the last stage's copy of tied embeddings must have moved with the first stage's.
    report["logprobs_after"] = actor.compute_logprobs(samples).tolist()
    updated = dict(export.hf_weights())
    report["max_update"] = max((updated[k] - original[k]).abs().max().item() for k in original)
    if torch.distributed.get_rank() == 0:
        torch.save(updated, out / f"{case}.pt")
    actor.close()
    return report


def main(out: str, cases: list[str]) -> None:
    acc = select_accelerator("cpu")
    init_distributed(acc)
    out_dir = Path(out)
    reports = {}
    for spec in cases:
        case, _, rest = spec.partition("=")
        model_dir, layout, *flags = rest.split(":")
        tp, pp = (int(x) for x in layout.split(","))
        start = time.perf_counter()
        reports[case] = check(acc, out_dir, case, model_dir, tp, pp, flags[0].split(",") if flags else [])
        reports[case]["case_s"] = time.perf_counter() - start
    if torch.distributed.get_rank() == 0:
        (out_dir / "report.json").write_text(json.dumps(reports, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
