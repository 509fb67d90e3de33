"""Under torchrun: load an HF Qwen3 model into Megatron shards, compare logits with transformers, and export the
shards back to HF names. Writes a JSON report (rank 0)."""

import json
import sys

import torch

from vime_spmd.config import parse_config
from vime_spmd.device import init_distributed, select_accelerator
from vime_spmd.train.megatron import MegatronActor
from vime_spmd.train.megatron.actor import load_hf_state_dict


def main(model_dir: str, tp: int, out: str) -> None:
    cfg = parse_config(["--hf-checkpoint", model_dir, "--prompt-data", "unused", "--device", "cpu",
                        "--tensor-model-parallel-size", str(tp)])
    acc = select_accelerator("cpu")
    init_distributed(acc)
    from megatron.core import parallel_state
    from transformers import AutoConfig, AutoModelForCausalLM

    actor = MegatronActor(cfg, acc, AutoConfig.from_pretrained(model_dir))
    torch.manual_seed(0)
    tokens = torch.randint(0, actor.shape.vocab_size, (2, 24))
    seq = tokens.size(1)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).view(1, 1, seq, seq)
    with torch.no_grad():
        local = actor.model(tokens, torch.arange(seq).expand_as(tokens), causal)
        shards = [torch.empty_like(local) for _ in range(tp)]
        torch.distributed.all_gather(shards, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        megatron_logits = torch.cat(shards, dim=-1)
    exported = dict(actor.hf_weights())
    if torch.distributed.get_rank() == 0:
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            hf_logits = hf(tokens).logits
        original = load_hf_state_dict(model_dir)
        report = {
            "max_logit_abs_diff": (megatron_logits - hf_logits).abs().max().item(),
            "exported_names_equal": sorted(exported) == sorted(original),
            "mismatched_tensors": [k for k in original if k not in exported or not torch.equal(exported[k], original[k])],
        }
        with open(out, "w") as f:
            json.dump(report, f)
    actor.close()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
