"""The policy (and reference model) as Megatron-core shards: logprobs and the policy-gradient step.

The actor knows nothing of vLLM; its weights leave through `MegatronExport` (export.py), and the loss it minimises
is `algorithms.actor_loss`. Loss normalisation: every term is a sum over this rank's tokens (or sequences) divided
by the count over the whole optimizer step on all data-parallel ranks; gradients are then summed over data parallel
(Megatron's `calculate_per_token_loss`), which yields the global mean exactly, whatever the split.

Pipeline parallelism: micro-batches go through Megatron's schedules (1F1B with stages, a plain loop without);
the loss runs on the last stage, and what the actor returns (logprobs, loss metrics) is broadcast from there to
the other stages of the pipeline, so that every rank returns the same values whatever the layout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from ...batch import Sample, TrainInputs, response_mask
from ...loop.checkpoint import model_checkpoint
from ...parallel import Layout
from ...runtime.device import Accelerator
from ...runtime.memory import preallocate_momentum
from ..micro_batches import plan_micro_batches
from ..spec import ActorSpec
from . import dist_checkpoint
from .families import family_for
from .model import build_from_hf, build_gpt_model, own_params
from .patches import apply_platform_patches
from .schedule import build_scheduler
from .vocab_parallel import response_logprobs

logger = logging.getLogger(__name__)


class MegatronActor:
    def __init__(self, spec: ActorSpec, acc: Accelerator, layout: Layout, hf_config, memory=None) -> None:
        """`layout`: this rank's place in the training layout (Megatron's groups are built to match it);
        `memory`: the MemoryManager whose regions hold this actor's device memory (None: plain allocation)."""
        self.spec, self.acc, self.layout = spec, acc, layout
        apply_platform_patches(acc)  # already applied through load_actor; refuses on NPU if not
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tp_size,
                                                 pipeline_model_parallel_size=layout.pp_size)
        megatron_coords = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_data_parallel_rank(),
                           parallel_state.get_pipeline_model_parallel_rank())
        assert megatron_coords == (layout.tp_rank, layout.dp_rank, layout.pp_rank), (megatron_coords, layout)
        model_parallel_cuda_manual_seed(spec.seed, inference_rng_tracker=acc.kind == "cpu")
        self.family = family_for(hf_config)
        self.shape = self.family.shape_from_hf(hf_config, layout.tp_size, spec.make_vocab_size_divisible_by)
        self.dtype = torch.float32 if acc.kind == "cpu" else torch.bfloat16
        self.dp_group = parallel_state.get_data_parallel_group()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        assert torch.distributed.get_process_group_ranks(self.pp_group) == layout.pipeline_ranks, layout

        region = memory.region if memory is not None else (lambda tag: nullcontext())
        self.region = region
        with region("params"):
            model = self._build(spec.hf_checkpoint)
        o = spec.optimizer
        # The DDP gradient buffer. A distributed optimizer moves the parameters into a buffer allocated with it: the
        # weights then live there, so it takes the backed-up "params" tag (the gradient buffer with it).
        with region("params" if o.use_distributed_optimizer else "grads"):
            self.model = DistributedDataParallel(
                config=model.config,
                ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                         use_distributed_optimizer=o.use_distributed_optimizer),
                module=model,
            )
        with region("optimizer"):  # the fp32 main params of a bf16 model
            self.optimizer = get_megatron_optimizer(
                MegatronOptimizerConfig(optimizer=o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                        sgd_momentum=o.sgd_momentum, adam_beta1=o.adam_beta1,
                                        adam_beta2=o.adam_beta2, clip_grad=o.clip_grad,
                                        bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
                                        use_distributed_optimizer=o.use_distributed_optimizer),
                [self.model],
            )
        for inner in getattr(self.optimizer, "chained_optimizers", None) or [self.optimizer]:
            if inner.init_state_fn is None and isinstance(inner.optimizer, torch.optim.SGD):
                # Megatron gives SGD no state initialiser, yet calls it when loading a checkpoint's optimizer state.
                inner.init_state_fn = preallocate_momentum
        self.scheduler = build_scheduler(self.optimizer, o, spec.lr_decay_iters)
        if memory is not None:
            # Adam allocates its moments lazily, at the first step(): outside every region, they could never be
            # paused. They are allocated now, in the optimizer region (MemoryManager.allocate_optimizer_state).
            memory.allocate_optimizer_state(self.optimizer)
        with region("ref"):
            self.ref_model = self._build(spec.reference) if spec.reference else None
        if self.ref_model is not None:
            self.ref_model.eval()
            self.ref_model.requires_grad_(False)

    def _build(self, hf_path: str) -> torch.nn.Module:
        """The model with the weights of `hf_path`: an HF folder, or (--ref-load) a torch_dist checkpoint."""
        options = self.spec.build
        dist_folder = model_checkpoint(hf_path, "--ref-load")
        if dist_folder is not None:
            model = build_gpt_model(self.shape, self.layout.tp_size, self.dtype, on_cpu=self.acc.kind == "cpu",
                                    pp=self.layout.pp_size, pre_process=self.layout.pp_rank == 0,
                                    post_process=self.layout.pp_rank == self.layout.pp_size - 1, options=options)
            model.to(self.acc.torch_device)
            dist_checkpoint.load(dist_folder, model)
            return model
        return build_from_hf(hf_path, self.family, self.shape, self.layout, self.dtype, self.acc.torch_device,
                             options)

    # ---- forward ---------------------------------------------------------------------------------------

    def _micro_batch(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """A right-padded, causal micro-batch, and where its response tokens are predicted. Padding is harmless:
        it comes after every real token, which causal attention never lets see it."""
        device = self.acc.torch_device
        lengths = [s.num_tokens for s in samples]
        seq_len = max(lengths)
        if self.spec.build.sequence_parallel:  # the sequence is split over tensor-parallel ranks
            seq_len = -(-seq_len // self.layout.tp_size) * self.layout.tp_size
        tokens = torch.zeros(len(samples), seq_len, dtype=torch.long)
        for i, s in enumerate(samples):
            tokens[i, : lengths[i]] = torch.tensor(s.prompt_ids + s.response_ids)
        tokens = tokens.to(device)
        # Token t+1 is predicted at position t: a response occupies positions [P-1, P-1+R).
        max_resp = max(len(s.response_ids) for s in samples)
        index = torch.zeros(len(samples), max_resp, dtype=torch.long, device=device)
        for i, s in enumerate(samples):
            start = len(s.prompt_ids) - 1
            index[i, : len(s.response_ids)] = torch.arange(start, start + len(s.response_ids))
        mask = None  # SDPA is causal by itself; Megatron's local attention needs the [s, s] mask (True: hidden)
        if self.spec.build.attention_backend == "local":
            mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]
        return {"tokens": tokens, "labels": torch.roll(tokens, shifts=-1, dims=1),
                "position_ids": torch.arange(seq_len, device=device).unsqueeze(0).expand_as(tokens),
                "attention_mask": mask, "index": index}

    def _response_logprobs(self, logits: torch.Tensor, batch: dict, with_entropy: bool, entropy_grad: bool = False):
        """Response-token logprobs (and entropy) [b, R] from the last stage's logits of a micro-batch."""
        return response_logprobs(logits, batch["labels"], batch["index"], self.spec.objective.temperature,
                                 with_entropy, entropy_grad, vocab_size=self.shape.vocab_size)

    def run_micro_batches(self, model: torch.nn.Module, batches: list[dict], loss_func: Callable,
                          forward_only: bool) -> list:
        """Megatron's schedule over `batches` (from `_micro_batch`): 1F1B through the pipeline stages, or a plain
        loop without stages. `loss_func(k, batch, logits) -> (loss, num_tokens, data)` runs on the last stage;
        returns the `data` of every micro-batch there ([] on other stages). The 3-tuple form with
        `calculate_per_token_loss` makes Megatron take the loss as is (no division by micro-batches or tokens),
        and the gradients are finalised by the caller (no `finalize_model_grads_func`): they stay exactly what
        one backward per micro-batch of the returned loss gives."""

        def forward_step(data_iterator, stage_model):
            k, batch = next(data_iterator)
            output = stage_model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
            return output, lambda logits: loss_func(k, batch, logits)

        # With stages, every micro-batch's (seq, batch, hidden) shape travels ahead of it (variable_seq_lengths):
        # these two only need to be given.
        seq_length = max(b["tokens"].size(1) for b in batches)
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(enumerate(batches)), model=[model],
            num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=batches[0]["tokens"].size(0),
            forward_only=forward_only)

    def _from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """`t` as the last pipeline stage computed it (the other stages pass a tensor of the same shape)."""
        if self.layout.pp_size == 1:
            return t
        t = t.to(self.acc.torch_device).contiguous()
        torch.distributed.broadcast(t, src=self.layout.pipeline_ranks[-1], group=self.pp_group)
        return t.cpu()

    def plan(self, samples: list[Sample], max_tokens: int | None) -> list[list[int]]:
        """Micro-batches of `samples` as lists of indices (micro_batches.py): `--micro-batch-size` samples each, or
        at most `max_tokens` padded tokens each when a budget is given (`MicroBatchSpec`). Every rank of a pipeline
        (and of a tensor-parallel group) holds the same samples, so they agree on the plan without a word;
        data-parallel ranks may differ in their micro-batch count: their gradients meet once per step, in
        finalize_model_grads."""
        pad_multiple = self.layout.tp_size if self.spec.build.sequence_parallel else 1
        return plan_micro_batches([s.num_tokens for s in samples], self.spec.micro_batches.micro_batch_size,
                                  max_tokens, pad_multiple)

    @torch.no_grad()
    def compute_logprobs(self, samples: list[Sample], reference: bool = False) -> torch.Tensor:
        """[N, R] logprobs of the response tokens under the current (or reference) weights, 0 on padding."""
        model = self.ref_model if reference else self.model
        model.eval()
        width = max(len(s.response_ids) for s in samples)
        groups = self.plan(samples, self.spec.micro_batches.logprob_max_tokens)

        def logprobs(k, batch, logits):
            logp, _ = self._response_logprobs(logits, batch, with_entropy=False)
            return logits.new_zeros(()), 0, logp

        batches = [self._micro_batch([samples[i] for i in group]) for group in groups]
        parts = self.run_micro_batches(model, batches, logprobs, forward_only=True)
        # Assembled on the device and read back once (not per micro-batch), in the samples' order.
        device = self.acc.torch_device
        out = torch.zeros(len(samples), width, device=device)
        for group, logp in zip(groups, parts):
            out[torch.tensor(group, device=device), : logp.size(1)] = logp.float()
        return self._from_last_stage(out).cpu() * response_mask(samples, width)

    # ---- training --------------------------------------------------------------------------------------

    def train_step(self, inputs: TrainInputs, denominator: float) -> dict[str, float]:
        """One optimizer step over this rank's share of the global batch, in micro-batches.

        `denominator`: tokens (or sequences) of the optimizer step over all data-parallel ranks.
        """
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        device = self.acc.torch_device
        micro = [inputs.rows(group) for group in self.plan(inputs.samples, self.spec.micro_batches.max_tokens)]
        batches = [self._micro_batch(mb.samples) for mb in micro]

        def loss_and_metrics(k, batch, logits):
            mb = micro[k]
            # Without an entropy bonus the entropy is only a metric: no gradient (0 x ... would add nothing).
            logp, entropy = self._response_logprobs(logits, batch, with_entropy=True,
                                                    entropy_grad=self.spec.objective.entropy_grad)
            columns = mb.columns(logp.size(1), device)
            loss, metrics = self.spec.objective.loss(logp, entropy, columns, denominator)
            return loss, columns.response_mask.sum().int(), metrics

        per_micro = self.run_micro_batches(self.model, batches, loss_and_metrics, forward_only=False)
        # Gradients summed over data parallel, and (tied embeddings, stages) over the embedding group.
        finalize_model_grads([self.model])
        lr = self.optimizer.param_groups[0]["lr"]  # this step's, set by the scheduler
        update_ok, grad_norm, _ = self.optimizer.step()
        if not update_ok:
            raise RuntimeError("the optimizer skipped its step (non-finite gradients)")
        self.scheduler.step(1)
        return self._step_metrics(per_micro, batches, micro) | {"grad_norm": float(grad_norm), "lr": lr}

    def _step_metrics(self, per_micro: list[dict], batches: list[dict], micro: list[TrainInputs]) -> dict[str, float]:
        """The step's loss metrics and padding ratio over all data-parallel ranks, from one stacked tensor: one
        broadcast from the last stage, one all-reduce, one read back. Each micro-batch's loss metrics are its share
        of the step's (see actor_loss), so their sum is the step's value; the padding ratio is padding tokens over all
        tokens of the step's training micro-batches."""
        device = self.acc.torch_device
        real = sum(s.num_tokens for mb in micro for s in mb.samples)
        total = sum(b["tokens"].numel() for b in batches)  # as padded, sequence-parallel rounding included
        keys = self.spec.objective.metric_keys
        sums = torch.zeros(len(keys), dtype=torch.float64, device=device)
        if per_micro:  # the last stage
            sums = torch.stack([torch.stack([m[key] for m in per_micro]).double().sum() for key in keys])
        values = torch.cat([self._from_last_stage(sums).to(device),
                            torch.tensor([total - real, total], dtype=torch.float64, device=device)])
        torch.distributed.all_reduce(values, group=self.dp_group)
        *losses, padding, total = values.tolist()
        return dict(zip(keys, losses)) | {"padding_ratio": padding / total}

    def sum_over_dp(self, values: dict[str, float], op=torch.distributed.ReduceOp.SUM) -> dict[str, float]:
        """All-reduce scalars over the data-parallel group (SUM by default, or the given op)."""
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.acc.torch_device)
        torch.distributed.all_reduce(t, op=op, group=self.dp_group)
        return dict(zip(keys, t.tolist()))

    def gather_over_dp(self, local: torch.Tensor) -> list[torch.Tensor]:
        """Every data-parallel rank's tensor of the same shape, in data-parallel rank order (on the CPU)."""
        local = local.to(self.acc.torch_device).contiguous()
        parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(self.dp_group))]
        torch.distributed.all_gather(parts, local, group=self.dp_group)
        return [p.cpu() for p in parts]

    @torch.no_grad()
    def param_norm(self) -> float:
        """L2 norm of all parameters, each counted once: TP shards once, each stage's own layers, tied
        embeddings once. Summed in float64, without a float64 copy of any tensor."""
        # On a CPU, float64 reductions over 64K-element pieces run 2-3x faster than over whole tensors (measured in
        # docs/benchmarks.md); an accelerator takes each tensor whole, one kernel each.
        piece = 1 << 16 if self.acc.kind == "cpu" else None
        pieces = [x for _, p, tp_split in own_params(self.model.module, self.shape, self.layout.tp_size)
                  if tp_split or self.layout.tp_rank == 0
                  for x in (p.detach().reshape(-1).split(piece) if piece else (p,))]
        sq = torch.stack([torch.linalg.vector_norm(x, dtype=torch.float64) for x in pieces]).square().sum()
        torch.distributed.all_reduce(sq, group=parallel_state.get_model_parallel_group())  # TP x PP
        return sq.sqrt().item()

    # ---- checkpoints -----------------------------------------------------------------------------------

    @property
    def distributed_optimizer(self) -> bool:
        """Whether the optimizer state is sharded over data parallel (its checkpoint keys differ)."""
        return self.spec.optimizer.use_distributed_optimizer

    def checkpoint_bytes(self, with_optimizer: bool) -> int:
        """About what this rank adds to a checkpoint: its share of the weights (data-parallel replicas are written
        once) and, with the optimizer, Adam's two fp32 moments (and fp32 main weights for a bf16 model)."""
        elements = sum(p.numel() for _, p, _ in own_params(self.model.module, self.shape, self.layout.tp_size))
        weight_bytes = elements * (2 if self.dtype == torch.bfloat16 else 4)
        optimizer_bytes = elements * 4 * (3 if self.dtype == torch.bfloat16 else 2) if with_optimizer else 0
        return (weight_bytes + optimizer_bytes) // self.layout.dp_size

    def save_checkpoint(self, folder: Path, step: int, with_optimizer: bool) -> None:
        """Every rank: write its pieces of the policy (and of its optimizer state and the learning-rate schedule's
        position) into `folder`, in a format that any training layout can load (`dist_checkpoint`)."""
        dist_checkpoint.save(folder, self.model.module, self.optimizer if with_optimizer else None, self.scheduler,
                             step)

    def load_checkpoint(self, folder: Path, with_optimizer: bool) -> None:
        """Every rank: load this layout's pieces of a checkpoint written by `save_checkpoint` in any layout."""
        with self.region("optimizer"):  # torch's load_state_dict allocates the state tensors afresh
            dist_checkpoint.load(folder, self.model.module, self.optimizer if with_optimizer else None, self.scheduler)

    def close(self) -> None:
        parallel_state.destroy_model_parallel()

