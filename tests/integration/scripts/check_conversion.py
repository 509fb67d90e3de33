"""Under torchrun, for each HF model given: load it into Megatron shards, compare logits, logprobs and entropy with
transformers, and export the shards back to HF names. Writes one JSON report (rank 0), keyed by model directory.

    torchrun --nproc_per_node TP check_conversion.py TP REPORT MODEL_DIR[:VOCAB_DIVISIBLE_BY] ...
"""

import json
import sys

import torch

from vime_spmd.config import parse_config
from vime_spmd.parallel import Layout
from vime_spmd.runtime.device import init_distributed, select_accelerator
from vime_spmd.train.megatron import MegatronActor, MegatronExport
from vime_spmd.train.megatron.model import load_hf_state_dict
from vime_spmd.train.megatron.vocab_parallel import logprobs_and_entropy
from vime_spmd.train.spec import ActorSpec


def check(acc, model_dir: str, tp: int, divisible_by: int) -> dict | None:
    from megatron.core import parallel_state
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = parse_config(["--hf-checkpoint", model_dir, "--prompt-data", "unused", "--device", "cpu",
                        "--tensor-model-parallel-size", str(tp), "--make-vocab-size-divisible-by", str(divisible_by)])
    actor = MegatronActor(ActorSpec.of(cfg), acc, Layout.of_world(cfg.parallel), AutoConfig.from_pretrained(model_dir))
    vocab = actor.shape.vocab_size
    torch.manual_seed(0)
    tokens = torch.randint(0, vocab, (2, 24))
    labels = torch.roll(tokens, shifts=-1, dims=1)
    seq = tokens.size(1)
    with torch.no_grad():  # no mask: the attention (causal SDPA) is causal by itself
        local = actor.model(tokens, torch.arange(seq).expand_as(tokens), None)
        shards = [torch.empty_like(local) for _ in range(tp)]
        torch.distributed.all_gather(shards, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        megatron_logits = torch.cat(shards, dim=-1)
        logp, entropy = logprobs_and_entropy(local, labels, 1.0, True, vocab_size=vocab)
        unmasked_logp, _ = logprobs_and_entropy(local, labels, 1.0, False)
    exported = dict(MegatronExport.of(actor).hf_weights())
    report = None
    if torch.distributed.get_rank() == 0:
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            hf_logits = hf(tokens).logits
        hf_logp_all = hf_logits.log_softmax(-1)
        hf_logp = hf_logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        hf_entropy = -(hf_logp_all.exp() * hf_logp_all).sum(-1)
        original = load_hf_state_dict(model_dir)
        report = {
            "family": actor.family.name,
            "tied": actor.shape.tie_word_embeddings,
            "vocab_size": vocab,
            "padded_vocab_size": actor.shape.padded_vocab_size,
            "megatron_logits_width": megatron_logits.size(-1),
            "max_logit_abs_diff": (megatron_logits[..., :vocab] - hf_logits).abs().max().item(),
            "max_logprob_abs_diff": (logp - hf_logp).abs().max().item(),
            "max_entropy_abs_diff": (entropy - hf_entropy).abs().max().item(),
            # What the padded columns would do to logprobs without the mask (0 when there is no padding).
            "unmasked_logprob_abs_diff": (unmasked_logp - hf_logp).abs().max().item(),
            # RoPE frequencies (llama3 scaling included) of the GPTModel actually built, bit for bit.
            "rope_inv_freq_equal": torch.equal(actor.model.module.rotary_pos_emb.inv_freq.cpu(),
                                               hf.model.rotary_emb.inv_freq.cpu()),
            "exported_names_equal": sorted(exported) == sorted(original),
            "mismatched_tensors": [k for k in original
                                   if k not in exported or not torch.equal(exported[k], original[k])],
        }
    actor.close()
    return report


def main(tp: int, out: str, models: list[str]) -> None:
    acc = select_accelerator("cpu")
    init_distributed(acc)
    reports = {}
    for spec in models:
        model_dir, _, divisible_by = spec.partition(":")
        reports[spec] = check(acc, model_dir, tp, int(divisible_by or 1))
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(reports, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
