"""The policy (and reference model) as Megatron-core shards: logprobs, the policy-gradient step, weight export.

The actor knows nothing of vLLM. It hands out full HF-named tensors for weight sync and takes `TrainInputs`.
Loss normalisation: every term is a sum over this rank's tokens (or sequences) divided by the count over the
whole optimizer step on all data-parallel ranks; gradients are then summed over data parallel (Megatron's
`calculate_per_token_loss`), which yields the global mean exactly, whatever the split.

Pipeline parallelism: micro-batches go through Megatron's schedules (1F1B with stages, a plain loop without);
the loss runs on the last stage, and what the actor returns (logprobs, loss metrics) is broadcast from there to
the other stages of the pipeline, so that every rank returns the same values whatever the layout. Parameters are
named globally (`decoder.layers.{offset + i}`) wherever they leave this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from ...algorithms import aggregate, kl_penalty, policy_loss
from ...batch import Sample, TrainInputs, response_mask
from ...checkpoint import model_checkpoint
from ...config import Config
from ...device import Accelerator
from . import dist_checkpoint
from .cpu_patches import apply_cpu_patches
from .families import family_for
from .model import build_gpt_model
from .vocab_parallel import logprobs_and_entropy

logger = logging.getLogger(__name__)


class LazyHFState(Mapping):
    """An HF checkpoint's tensors by name, each read from its safetensors file only when asked for, so that a rank
    holds its own shards rather than the whole model while converting."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise ValueError(f"--hf-checkpoint {path}: no *.safetensors weights found; point it at an HF model folder")
        self._files = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self._where = {name: handle for handle in self._files for name in handle.keys()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_hf_state_dict(path: str) -> Mapping[str, torch.Tensor]:
    return LazyHFState(path)


class MegatronActor:
    def __init__(self, cfg: Config, acc: Accelerator, hf_config, memory=None) -> None:
        """`memory`: the MemoryManager whose regions hold this actor's device memory (None: plain allocation)."""
        self.cfg, self.acc = cfg, acc
        tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
        if acc.kind == "cpu":
            apply_cpu_patches()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        model_parallel_cuda_manual_seed(cfg.train.seed, inference_rng_tracker=acc.kind == "cpu")
        self.family = family_for(hf_config)
        self.shape = self.family.shape_from_hf(hf_config, tp, cfg.parallel.make_vocab_size_divisible_by)
        self.dtype = torch.float32 if acc.kind == "cpu" else torch.bfloat16
        self.tp_rank, self.tp_size = parallel_state.get_tensor_model_parallel_rank(), tp
        self.dp_group = parallel_state.get_data_parallel_group()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        self.pp_ranks = torch.distributed.get_process_group_ranks(self.pp_group)  # global rank of each stage
        self.first_stage = parallel_state.is_pipeline_first_stage()
        self.last_stage = parallel_state.is_pipeline_last_stage()

        region = memory.region if memory is not None else (lambda tag: nullcontext())
        self.region = region
        with region("params"):
            model = self._build(cfg.model.hf_checkpoint)
        # The DDP gradient buffer. (A distributed optimizer would move the parameters into this buffer too; they
        # would then need the backed-up "params" tag.)
        with region("grads"):
            self.model = DistributedDataParallel(
                config=model.config,
                ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                         use_distributed_optimizer=False),
                module=model,
            )
        o = cfg.optimizer
        with region("optimizer"):  # the fp32 main params of a bf16 model
            self.optimizer = get_megatron_optimizer(
                MegatronOptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.lr, weight_decay=o.weight_decay,
                                        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, clip_grad=o.clip_grad,
                                        bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
                                        use_distributed_optimizer=False),
                [self.model],
            )
        if memory is not None:
            # Adam allocates its moments lazily, at the first step(): outside every region, they could never be
            # paused. They are allocated now, in the optimizer region (MemoryManager.allocate_optimizer_state).
            memory.allocate_optimizer_state(self.optimizer)
        needs_ref = cfg.algorithm.use_kl_loss or cfg.algorithm.kl_coef > 0
        with region("ref"):
            self.ref_model = self._build(cfg.model.ref_load or cfg.model.hf_checkpoint) if needs_ref else None
        if self.ref_model is not None:
            self.ref_model.eval()
            self.ref_model.requires_grad_(False)
        self.export_plan = self._exchange_export_plan()

    def _build(self, hf_path: str) -> torch.nn.Module:
        """The model with the weights of `hf_path`: an HF folder, or (--ref-load) a torch_dist checkpoint."""
        model = build_gpt_model(self.shape, self.tp_size, self.dtype, on_cpu=self.acc.kind == "cpu",
                                pp=self.pp_size, pre_process=self.first_stage, post_process=self.last_stage)
        model.to(self.acc.torch_device)
        dist_folder = model_checkpoint(hf_path, "--ref-load")
        if dist_folder is not None:
            dist_checkpoint.load(dist_folder, model)
            return model
        state = self.family.to_megatron(load_hf_state_dict(hf_path), self.shape, self.tp_rank, self.tp_size)
        used: set[str] = set()
        with torch.no_grad():
            for name, param in model.named_parameters():
                # The last stage's copy of tied embeddings starts as the embedding (Megatron all-reduces it
                # from the first stage at construction; these weights replace what it copied).
                source = _EMBEDDING if self._is_tied_copy(name) else global_name(model, name)
                if source not in state:
                    raise ValueError(f"{hf_path}: no weights for Megatron parameter {source}; "
                                     f"is it a {self.family.name} model?")
                param.copy_(state[source])
                used.add(source)
        if self.pp_size > 1:  # the other stages use the rest
            stages: list = [None] * self.pp_size
            torch.distributed.all_gather_object(stages, used, group=self.pp_group)
            used = set().union(*stages)
        if set(state) - used:
            raise ValueError(f"{hf_path}: weights the model does not use: {sorted(set(state) - used)[:5]}")
        return model

    def _is_tied_copy(self, name: str) -> bool:
        """The output layer's weight when it is tied to the embedding: only a last stage without the embedding
        holds it as a parameter (a copy kept equal by all-reducing its gradient with the first stage's)."""
        return name == "output_layer.weight" and self.shape.tie_word_embeddings

    # ---- forward ---------------------------------------------------------------------------------------

    def _micro_batch(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """A right-padded, causal micro-batch, and where its response tokens are predicted."""
        device = self.acc.torch_device
        lengths = [s.num_tokens for s in samples]
        seq_len = max(lengths)
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
        causal = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)
        return {"tokens": tokens, "labels": torch.roll(tokens, shifts=-1, dims=1),
                "position_ids": torch.arange(seq_len, device=device).unsqueeze(0).expand_as(tokens),
                "attention_mask": causal.view(1, 1, seq_len, seq_len), "index": index}

    def _response_logprobs(self, logits: torch.Tensor, batch: dict, with_entropy: bool):
        """Response-token logprobs (and entropy) [b, R] from the last stage's logits of a micro-batch."""
        logp, entropy = logprobs_and_entropy(logits, batch["labels"], self.cfg.rollout.rollout_temperature,
                                             with_entropy, vocab_size=self.shape.vocab_size)
        pick = lambda t: None if t is None else t.gather(1, batch["index"])  # noqa: E731
        return pick(logp), pick(entropy)

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
        if self.pp_size == 1:
            return t
        t = t.to(self.acc.torch_device).contiguous()
        torch.distributed.broadcast(t, src=self.pp_ranks[-1], group=self.pp_group)
        return t.cpu()

    @torch.no_grad()
    def compute_logprobs(self, samples: list[Sample], reference: bool = False) -> torch.Tensor:
        """[N, R] logprobs of the response tokens under the current (or reference) weights, 0 on padding."""
        model = self.ref_model if reference else self.model
        model.eval()
        width = max(len(s.response_ids) for s in samples)
        mbs = self.cfg.train.micro_batch_size
        chunks = [samples[start : start + mbs] for start in range(0, len(samples), mbs)]

        def logprobs(k, batch, logits):
            logp, _ = self._response_logprobs(logits, batch, with_entropy=False)
            return logits.new_zeros(()), 0, logp

        parts = self.run_micro_batches(model, [self._micro_batch(c) for c in chunks], logprobs, forward_only=True)
        out = torch.zeros(len(samples), width)
        for start, logp in zip(range(0, len(samples), mbs), parts):
            out[start : start + logp.size(0), : logp.size(1)] = logp.float().cpu()
        return self._from_last_stage(out) * response_mask(samples, width)

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
        keys = ("entropy_loss", "kl_loss", "pg_clipfrac", "pg_loss", "ppo_kl")
        device = self.acc.torch_device
        micro = [inputs.rows(slice(start, start + cfg_mbs)) for start in range(0, len(inputs.samples), cfg_mbs)]

        def loss_and_metrics(k, batch, logits):
            mb = micro[k]
            logp, entropy = self._response_logprobs(logits, batch, with_entropy=True)
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
            values = {"pg_loss": pg_loss.item(), "entropy_loss": entropy_loss.item(), "kl_loss": 0.0}
            if a.use_kl_loss:
                kl_loss = aggregate(kl_penalty(logp, cut(mb.ref_logprobs), a.kl_loss_type), mask, per_token,
                                    denominator)
                loss = loss + a.kl_loss_coef * kl_loss
                values["kl_loss"] = kl_loss.item()
            # Per-micro-batch means, weighted by this micro-batch's share of the step.
            share = (mask.sum() if per_token else torch.tensor(float(len(mb.samples)))).item() / denominator
            values["pg_clipfrac"] = pg_metrics["clipfrac"].item() * share
            values["ppo_kl"] = pg_metrics["ppo_kl"].item() * share
            return loss, int(mask.sum().item()), values

        per_micro = self.run_micro_batches(self.model, [self._micro_batch(mb.samples) for mb in micro],
                                           loss_and_metrics, forward_only=False)
        # Gradients summed over data parallel, and (tied embeddings, stages) over the embedding group.
        finalize_model_grads([self.model])
        update_ok, grad_norm, _ = self.optimizer.step()
        if not update_ok:
            raise RuntimeError("the optimizer skipped its step (non-finite gradients)")
        sums = torch.tensor([sum(v[key] for v in per_micro) for key in keys], dtype=torch.float64)
        metrics = self.sum_over_dp(dict(zip(keys, self._from_last_stage(sums).tolist())))
        metrics["grad_norm"] = float(grad_norm)
        return metrics

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
        embeddings once."""
        sq = torch.zeros((), dtype=torch.float64, device=self.acc.torch_device)
        for _, p, tp_split in self.own_params():
            local = p.double().pow(2).sum()
            sq += local if tp_split or self.tp_rank == 0 else 0.0
        torch.distributed.all_reduce(sq, group=parallel_state.get_model_parallel_group())  # TP x PP
        return sq.sqrt().item()

    # ---- checkpoints -----------------------------------------------------------------------------------

    def save_checkpoint(self, folder: Path, step: int, with_optimizer: bool) -> None:
        """Every rank: write its pieces of the policy (and of its optimizer state) into `folder`, in a format that
        any training layout can load (`dist_checkpoint`)."""
        dist_checkpoint.save(folder, self.model.module, self.optimizer if with_optimizer else None, step)

    def load_checkpoint(self, folder: Path, with_optimizer: bool) -> None:
        """Every rank: load this layout's pieces of a checkpoint written by `save_checkpoint` in any layout."""
        with self.region("optimizer"):  # torch's load_state_dict allocates the state tensors afresh
            dist_checkpoint.load(folder, self.model.module, self.optimizer if with_optimizer else None)

    # ---- weight export ---------------------------------------------------------------------------------

    def coords(self):
        from ...sync import Coords

        return Coords(dp_rank=parallel_state.get_data_parallel_rank(),
                      tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                      pp_rank=parallel_state.get_pipeline_model_parallel_rank())

    @property
    def pp_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size()

    def own_params(self) -> list[tuple[str, torch.nn.Parameter, bool]]:
        """(global Megatron name, parameter, whether TP ranks hold different pieces) of this stage's parameters,
        without the last stage's copy of tied embeddings (the first stage's embedding is the one)."""
        module = self.model.module
        return [(global_name(module, name), param, self.tp_size > 1 and getattr(param, "tensor_model_parallel", False))
                for name, param in module.named_parameters() if not self._is_tied_copy(name)]

    def shards(self) -> list:
        """This rank's piece of every parameter, by global Megatron name (the weight-sync transports' input)."""
        from ...sync import Shard

        return [Shard(name, param.detach(), tp_split) for name, param, tp_split in self.own_params()]

    def to_hf(self, name: str, pieces: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF tensors from the TP pieces (in TP-rank order) of one Megatron parameter."""
        return self.family.to_hf(name, pieces, self.shape)

    def _exchange_export_plan(self) -> list[list[tuple[str, torch.Size, torch.dtype, bool]]]:
        """Per pipeline stage, (global name, shape, dtype, TP-split) of its parameters, in its order: what every
        rank of the pipeline iterates, identically, to export the whole model."""
        mine = [(name, p.shape, p.dtype, tp_split) for name, p, tp_split in self.own_params()]
        if self.pp_size == 1:
            return [mine]
        plan: list = [None] * self.pp_size
        torch.distributed.all_gather_object(plan, mine, group=self.pp_group)
        return plan

    def to_engine(self, name: str, pieces: list[torch.Tensor], engine_rank: int, engine_size: int,
                  engine_tensors: dict) -> list:
        """The writes of engine rank `engine_rank`'s share of one Megatron parameter (see `dense.to_engine`)."""
        return self.family.to_engine(name, pieces, self.shape, engine_rank, engine_size, engine_tensors)

    @torch.no_grad()
    def gathered_pieces(self, local_only: frozenset[str] = frozenset()) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """(global Megatron name, TP pieces in rank order) of every parameter of the whole model on every rank, one
        parameter at a time: TP shards are all-gathered over the TP group; with stages, each parameter's pieces are
        then broadcast from its stage over the pipeline group, stage after stage (never more than one parameter
        held). For names in `local_only` (every rank of the replica needs only the piece of its own TP rank) nothing
        is gathered: the other pieces are meta-device placeholders, and stages broadcast only that one piece."""
        tp_group = parallel_state.get_tensor_model_parallel_group()
        params = {name: p for name, p, _ in self.own_params()}
        for stage, entries in enumerate(self.export_plan):
            for name, shape, dtype, tp_split in entries:
                local = tp_split and name in local_only
                gather = tp_split and not local
                if stage == self.pp_rank:
                    param = params[name].detach()
                    pieces = [param]
                    if gather:
                        pieces = [torch.empty_like(param) for _ in range(self.tp_size)]
                        torch.distributed.all_gather(pieces, param.contiguous(), group=tp_group)
                if self.pp_size > 1:
                    num_pieces = self.tp_size if gather else 1
                    stacked = (torch.stack(pieces) if stage == self.pp_rank else
                               torch.empty((num_pieces, *shape), dtype=dtype, device=self.acc.torch_device))
                    torch.distributed.broadcast(stacked, src=self.pp_ranks[stage], group=self.pp_group)
                    pieces = list(stacked.unbind(0))
                if local:
                    pieces = [pieces[0] if t == self.tp_rank else torch.empty(shape, dtype=dtype, device="meta")
                              for t in range(self.tp_size)]
                yield name, pieces

    def parameter_plan(self) -> list[tuple[str, torch.Size, torch.dtype, bool]]:
        """(global name, shape, dtype, TP-split) of every parameter of the whole model, stage after stage."""
        return [entry for entries in self.export_plan for entry in entries]

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named tensors of the whole model on every rank, one parameter at a time."""
        for name, pieces in self.gathered_pieces():
            yield from self.family.to_hf(name, pieces, self.shape)

    def close(self) -> None:
        parallel_state.destroy_model_parallel()


_EMBEDDING = "embedding.word_embeddings.weight"
_LAYERS = "decoder.layers."


def global_name(model: torch.nn.Module, name: str) -> str:
    """A stage's GPTModel numbers its layers `decoder.layers.{i}` from 0; conversion uses the global index, which
    Megatron keeps as each layer's (1-based) `layer_number`."""
    if not name.startswith(_LAYERS):
        return name
    local, _, rest = name[len(_LAYERS):].partition(".")
    return f"{_LAYERS}{model.decoder.layers[int(local)].layer_number - 1}.{rest}"

