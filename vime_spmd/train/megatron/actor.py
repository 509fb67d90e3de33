"""The policy (and reference model) as Megatron-core shards: logprobs, the policy-gradient step, weight export.

The actor knows nothing of vLLM. It hands out full HF-named tensors for weight sync and takes `TrainInputs`.
Loss normalisation: every term is a sum over this rank's tokens (or sequences) divided by the count over the
whole optimizer step on all data-parallel ranks; gradients are then summed over data parallel (Megatron's
`calculate_per_token_loss`), which yields the global mean exactly, whatever the split.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from ...algorithms import aggregate, kl_penalty, policy_loss
from ...batch import Sample, TrainInputs
from ...config import Config
from ...device import Accelerator
from .cpu_patches import apply_cpu_patches
from .families import family_for
from .model import build_gpt_model
from .vocab_parallel import logprobs_and_entropy

logger = logging.getLogger(__name__)


def load_hf_state_dict(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"--hf-checkpoint {path}: no *.safetensors weights found; point it at an HF model folder")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


class MegatronActor:
    def __init__(self, cfg: Config, acc: Accelerator, hf_config) -> None:
        self.cfg, self.acc = cfg, acc
        tp = cfg.parallel.tensor_model_parallel_size
        if acc.kind == "cpu":
            apply_cpu_patches()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
        model_parallel_cuda_manual_seed(cfg.train.seed, inference_rng_tracker=acc.kind == "cpu")
        self.family = family_for(hf_config)
        self.shape = self.family.shape_from_hf(hf_config, tp, cfg.parallel.make_vocab_size_divisible_by)
        self.dtype = torch.float32 if acc.kind == "cpu" else torch.bfloat16
        self.tp_rank, self.tp_size = parallel_state.get_tensor_model_parallel_rank(), tp
        self.dp_group = parallel_state.get_data_parallel_group()

        model = self._build(cfg.model.hf_checkpoint)
        self.model = DistributedDataParallel(
            config=model.config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                     use_distributed_optimizer=False),
            module=model,
        )
        o = cfg.optimizer
        self.optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.lr, weight_decay=o.weight_decay,
                                    adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, clip_grad=o.clip_grad,
                                    bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
                                    use_distributed_optimizer=False),
            [self.model],
        )
        needs_ref = cfg.algorithm.use_kl_loss or cfg.algorithm.kl_coef > 0
        self.ref_model = self._build(cfg.model.ref_load or cfg.model.hf_checkpoint) if needs_ref else None
        if self.ref_model is not None:
            self.ref_model.eval()
            self.ref_model.requires_grad_(False)

    def _build(self, hf_path: str) -> torch.nn.Module:
        model = build_gpt_model(self.shape, self.tp_size, self.dtype, on_cpu=self.acc.kind == "cpu")
        model.to(self.acc.torch_device)
        state = self.family.to_megatron(load_hf_state_dict(hf_path), self.shape, self.tp_rank, self.tp_size)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name not in state:
                    raise ValueError(f"{hf_path}: no weights for Megatron parameter {name}; "
                                     f"is it a {self.family.name} model?")
                param.copy_(state.pop(name))
        if state:
            raise ValueError(f"{hf_path}: weights the model does not use: {sorted(state)[:5]}")
        return model

    # ---- forward ---------------------------------------------------------------------------------------

    def _forward(self, model: torch.nn.Module, samples: list[Sample], with_entropy: bool):
        """Response-token logprobs (and entropy) [b, R] of a micro-batch; right-padded, causal."""
        device = self.acc.torch_device
        lengths = [s.num_tokens for s in samples]
        seq_len = max(lengths)
        tokens = torch.zeros(len(samples), seq_len, dtype=torch.long)
        for i, s in enumerate(samples):
            tokens[i, : lengths[i]] = torch.tensor(s.prompt_ids + s.response_ids)
        tokens = tokens.to(device)
        labels = torch.roll(tokens, shifts=-1, dims=1)
        position_ids = torch.arange(seq_len, device=device).unsqueeze(0).expand_as(tokens)
        causal = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)
        logits = model(tokens, position_ids, causal.view(1, 1, seq_len, seq_len))
        logp, entropy = logprobs_and_entropy(logits, labels, self.cfg.rollout.rollout_temperature, with_entropy,
                                             vocab_size=self.shape.vocab_size)
        # Token t+1 is predicted at position t: a response occupies positions [P-1, P-1+R).
        max_resp = max(len(s.response_ids) for s in samples)
        index = torch.zeros(len(samples), max_resp, dtype=torch.long, device=device)
        for i, s in enumerate(samples):
            start = len(s.prompt_ids) - 1
            index[i, : len(s.response_ids)] = torch.arange(start, start + len(s.response_ids))
        pick = lambda t: None if t is None else t.gather(1, index)  # noqa: E731
        return pick(logp), pick(entropy)

    @torch.no_grad()
    def compute_logprobs(self, samples: list[Sample], reference: bool = False) -> torch.Tensor:
        """[N, R] logprobs of the response tokens under the current (or reference) weights, 0 on padding."""
        model = self.ref_model if reference else self.model
        model.eval()
        width = max(len(s.response_ids) for s in samples)
        out = torch.zeros(len(samples), width)
        mbs = self.cfg.train.micro_batch_size
        for start in range(0, len(samples), mbs):
            chunk = samples[start : start + mbs]
            logp, _ = self._forward(model, chunk, with_entropy=False)
            out[start : start + len(chunk), : logp.size(1)] = logp.float().cpu()
        return out * _mask(samples, width)

    # ---- training --------------------------------------------------------------------------------------

    def train_step(self, inputs: TrainInputs, denominator: float) -> dict[str, float]:
        """One optimizer step over this rank's share of the global batch, in micro-batches.

        `denominator`: tokens (or sequences) of the optimizer step over all data-parallel ranks.
        """
        a, cfg_mbs = self.cfg.algorithm, self.cfg.train.micro_batch_size
        per_token = a.calculate_per_token_loss
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        sums = {"pg_loss": 0.0, "kl_loss": 0.0, "entropy_loss": 0.0, "pg_clipfrac": 0.0, "ppo_kl": 0.0}
        device = self.acc.torch_device
        for start in range(0, len(inputs.samples), cfg_mbs):
            mb = inputs.rows(slice(start, start + cfg_mbs))
            logp, entropy = self._forward(self.model, mb.samples, with_entropy=True)
            width = logp.size(1)
            cut = lambda t: t[:, :width].to(device)  # noqa: E731
            mask = cut(mb.response_mask)
            tis = dict(rollout_logprobs=cut(mb.rollout_logprobs), tis_clip=a.tis_clip,
                       tis_clip_low=a.tis_clip_low) if a.use_tis else {}
            pg, pg_metrics = policy_loss(logp, cut(mb.old_logprobs), cut(mb.advantages), mask,
                                         eps_clip=a.eps_clip, eps_clip_high=a.eps_clip_high, eps_clip_c=a.eps_clip_c,
                                         sequence_level_ratio=a.advantage_estimator == "gspo", **tis)
            pg_loss = aggregate(pg, mask, per_token, denominator)
            entropy_loss = aggregate(entropy, mask, per_token, denominator)
            loss = pg_loss - a.entropy_coef * entropy_loss
            if a.use_kl_loss:
                kl_loss = aggregate(kl_penalty(logp, cut(mb.ref_logprobs), a.kl_loss_type), mask, per_token,
                                    denominator)
                loss = loss + a.kl_loss_coef * kl_loss
                sums["kl_loss"] += kl_loss.item()
            loss.backward()
            sums["pg_loss"] += pg_loss.item()
            sums["entropy_loss"] += entropy_loss.item()
            # Per-micro-batch means, weighted by this micro-batch's share of the step.
            share = (mask.sum() if per_token else torch.tensor(float(len(mb.samples)))).item() / denominator
            sums["pg_clipfrac"] += pg_metrics["clipfrac"].item() * share
            sums["ppo_kl"] += pg_metrics["ppo_kl"].item() * share
        finalize_model_grads([self.model])
        update_ok, grad_norm, _ = self.optimizer.step()
        if not update_ok:
            raise RuntimeError("the optimizer skipped its step (non-finite gradients)")
        metrics = self.sum_over_dp(sums)
        metrics["grad_norm"] = float(grad_norm)
        return metrics

    def sum_over_dp(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.acc.torch_device)
        torch.distributed.all_reduce(t, group=self.dp_group)
        return dict(zip(keys, t.tolist()))

    def gather_over_dp(self, local: torch.Tensor) -> list[torch.Tensor]:
        """Every data-parallel rank's tensor of the same shape, in data-parallel rank order (on the CPU)."""
        local = local.to(self.acc.torch_device).contiguous()
        parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(self.dp_group))]
        torch.distributed.all_gather(parts, local, group=self.dp_group)
        return [p.cpu() for p in parts]

    @torch.no_grad()
    def param_norm(self) -> float:
        """L2 norm of all parameters (TP shards counted once)."""
        sq = torch.zeros((), dtype=torch.float64, device=self.acc.torch_device)
        for p in self.model.module.parameters():
            local = p.double().pow(2).sum()
            sq += local if getattr(p, "tensor_model_parallel", False) or self.tp_rank == 0 else 0.0
        torch.distributed.all_reduce(sq, group=parallel_state.get_tensor_model_parallel_group())
        return sq.sqrt().item()

    # ---- weight export ---------------------------------------------------------------------------------

    @torch.no_grad()
    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named tensors, one parameter at a time; TP shards are all-gathered over the TP group."""
        group = parallel_state.get_tensor_model_parallel_group()
        for name, param in self.model.module.named_parameters():
            if self.tp_size > 1 and getattr(param, "tensor_model_parallel", False):
                shards = [torch.empty_like(param) for _ in range(self.tp_size)]
                torch.distributed.all_gather(shards, param.detach().contiguous(), group=group)
            else:
                shards = [param.detach()]
            yield from self.family.to_hf(name, shards, self.shape)

    def close(self) -> None:
        parallel_state.destroy_model_parallel()


def _mask(samples: list[Sample], width: int) -> torch.Tensor:
    mask = torch.zeros(len(samples), width)
    for i, s in enumerate(samples):
        mask[i, : len(s.response_ids)] = 1.0
    return mask
