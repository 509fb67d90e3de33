"""Under torchrun: the causal-SDPA attention against Megatron's local attention (with its [s, s] mask), for each
tensor-parallel size given. Builds the actor with each backend from the same HF model, runs the same right-padded
micro-batches (different lengths), gathers the logits over tensor parallel, and writes to REPORT_DIR/report.json
the max |logit difference| over real (non-padding) positions, per TP size.

    torchrun --nproc_per_node 2 check_attention.py REPORT_DIR MODEL_DIR TP [TP ...]
"""

import json
import sys
from pathlib import Path

import torch

from tests.integration.scripts.check_pipeline import synthetic_samples
from vime_spmd.config import parse_config
from vime_spmd.device import init_distributed, select_accelerator
from vime_spmd.train.megatron import MegatronActor

MICRO_BATCH = 3


def logits_of(acc, model_dir: str, tp: int, backend: str, samples) -> list[torch.Tensor]:
    """Full-vocabulary logits [b, s, V] of each micro-batch under `backend`."""
    from megatron.core import parallel_state
    from transformers import AutoConfig

    cfg = parse_config(["--hf-checkpoint", model_dir, "--prompt-data", "unused", "--device", "cpu",
                        "--tensor-model-parallel-size", str(tp), "--attention-backend", backend])
    actor = MegatronActor(cfg, acc, AutoConfig.from_pretrained(model_dir))
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


def main(out: str, model_dir: str, tps: list[str]) -> None:
    acc = select_accelerator("cpu")
    init_distributed(acc)
    samples = synthetic_samples(vocab=200, num=6, seed=5)  # lengths 5..17: every micro-batch is padded
    report = {}
    for tp in map(int, tps):
        local, sdpa = logits_of(acc, model_dir, tp, "local", samples), logits_of(acc, model_dir, tp, "sdpa", samples)
        diff = 0.0
        for k, (a, b) in enumerate(zip(local, sdpa)):
            for i, s in enumerate(samples[k * MICRO_BATCH : (k + 1) * MICRO_BATCH]):
                diff = max(diff, (a[i, : s.num_tokens] - b[i, : s.num_tokens]).abs().max().item())
        report[f"tp{tp}"] = {"max_logit_abs_diff": diff, "max_logit_abs": max(t.abs().max().item() for t in local)}
    if torch.distributed.get_rank() == 0:
        Path(out, "report.json").write_text(json.dumps(report, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
