"""Building the Megatron model from a `ModelShape` and filling it from HF weights: the one place that constructs a
GPTModel, and the names its parameters go by outside this package.

megatron-core 0.19 deprecates GPTModel in favour of HybridModel; keeping construction here lets it follow.
A `ModelShape` comes from a family module (`families.family_for(hf_config).shape_from_hf(...)`), which reads the
HF config and refuses what the GPTModel below cannot reproduce exactly. Parameters are named globally
(`decoder.layers.{offset + i}`) wherever they leave this package.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from ...parallel import pipeline_split
from ..spec import BuildOptions
from .attention import SDPACausalAttention


@dataclass(frozen=True)
class ModelShape:
    """What the training backend needs from an HF config: sizes, and the GPTModel options of the family."""

    vocab_size: int  # the HF vocabulary (logits past it are padding)
    padded_vocab_size: int  # Megatron's: vocab_size rounded up to a multiple of make_vocab_size_divisible_by * TP
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_layernorm: bool  # per-head RMSNorm of q and k (Qwen3)
    add_qkv_bias: bool  # biases on q, k, v only (Qwen2)
    rope_scaling_factor: float | None = None  # Llama 3.1-style ("llama3") frequency scaling, None when off

    def check_tp(self, tp: int) -> None:
        for what, n in (("key/value heads", self.num_kv_heads), ("attention heads", self.num_heads),
                        ("MLP channels", self.ffn_hidden_size)):
            if n % tp:
                raise ValueError(f"--tensor-model-parallel-size {tp} does not divide the model's {n} {what}; "
                                 f"choose a tensor-parallel size that divides it")


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm (what the local spec builds), usable under sequence parallelism: Megatron's torch wrapper
    refuses it, because each tensor-parallel rank then normalises only its share of the tokens and the weight's
    gradient must be summed over tensor parallel; the `sequence_parallel` mark makes finalize_model_grads do that."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def decoder_spec(shape: ModelShape, config: TransformerConfig, attention_backend: str) -> TransformerBlockSubmodules:
    """Megatron's local layer spec with our norm and, for `sdpa`, the causal SDPA core attention; as many layers as
    this pipeline stage builds."""
    layer = get_gpt_layer_local_spec(qk_layernorm=shape.qk_layernorm, normalization="RMSNorm")
    attention = layer.submodules.self_attention
    parts = {"core_attention": SDPACausalAttention} if attention_backend == "sdpa" else {}
    if shape.qk_layernorm:
        parts |= {"q_layernorm": RMSNorm, "k_layernorm": RMSNorm}
    attention = replace(attention, submodules=replace(attention.submodules, **parts))
    layer = replace(layer, submodules=replace(layer.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm,
                                              self_attention=attention))
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=RMSNorm)


def padded_vocab_size(vocab_size: int, tp: int, make_vocab_size_divisible_by: int) -> int:
    """Megatron-LM's rule: round up to a multiple of divisible_by * TP (every TP rank gets an equal slice)."""
    if make_vocab_size_divisible_by < 1:
        raise ValueError(f"--make-vocab-size-divisible-by {make_vocab_size_divisible_by}: must be 1 or more")
    multiple = make_vocab_size_divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def build_gpt_model(shape: ModelShape, tp: int, dtype: torch.dtype, on_cpu: bool, pp: int = 1,
                    pre_process: bool = True, post_process: bool = True,
                    options: BuildOptions | None = None) -> GPTModel:
    """This rank's GPTModel: with `pp` stages, its share of the layers (`parallel.pipeline_split`), with the
    embedding when `pre_process` (first stage) and the final norm and output layer when `post_process` (last).
    `options`: the training flags that shape the model (default: SDPA attention, no recompute, even stages)."""
    options = options or BuildOptions()
    shape.check_tp(tp)
    split = pipeline_split(shape.num_layers, pp, options.first_stage_layers, options.last_stage_layers)
    uneven = len(set(split)) > 1
    assert shape.padded_vocab_size % tp == 0 and shape.padded_vocab_size >= shape.vocab_size, shape
    config = TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=shape.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.add_qkv_bias,
        qk_layernorm=shape.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # Micro-batches differ in length and (compute_logprobs' last one) in size: stages exchange shapes first.
        variable_seq_lengths=pp > 1,
        # Dense model, no dispatcher; but megatron-core refuses variable_seq_lengths with the default ("allgather").
        moe_token_dispatcher_type="alltoall",
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=on_cpu,
        # Fused kernels are CUDA-only; exact-match tests also want the plain maths.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # Loss normalisation is ours (token or sequence mean over the global batch): DP sums gradients.
        calculate_per_token_loss=True,
        num_layers_in_first_pipeline_stage=split[0] if uneven else None,
        num_layers_in_last_pipeline_stage=split[-1] if uneven else None,
        sequence_parallel=options.sequence_parallel,
        recompute_granularity=options.recompute_granularity,
        recompute_method=options.recompute_method,
        recompute_num_layers=options.recompute_num_layers,
    )
    theta = shape.rope_theta
    return GPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(shape, config, options.attention_backend),
        vocab_size=shape.padded_vocab_size,
        max_sequence_length=shape.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        position_embedding_type="rope",
        # Typed int in Megatron; a non-integral base still computes the same frequencies as transformers.
        rotary_base=int(theta) if float(theta).is_integer() else theta,
        rope_scaling=shape.rope_scaling_factor is not None,
        rope_scaling_factor=shape.rope_scaling_factor or 8.0,
    )


# ---- filling a stage's model from an HF checkpoint -----------------------------------------------------------

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


def build_from_hf(hf_path: str, family, shape: ModelShape, layout, dtype: torch.dtype,
                  device: torch.device, options: BuildOptions | None = None) -> GPTModel:
    """This rank's GPTModel (its TP shard of its pipeline stage, per `layout`), its weights read from `hf_path` and
    converted by `family`. Raises ValueError when the checkpoint lacks a weight or holds one the model does not use
    (over all stages)."""
    pp = layout.pp_size
    model = build_gpt_model(shape, layout.tp_size, dtype, on_cpu=device.type == "cpu", pp=pp,
                            pre_process=layout.pp_rank == 0, post_process=layout.pp_rank == pp - 1, options=options)
    model.to(device)
    state = family.to_megatron(load_hf_state_dict(hf_path), shape, layout.tp_rank, layout.tp_size)
    used: set[str] = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # The last stage's copy of tied embeddings starts as the embedding (Megatron all-reduces it from the
            # first stage at construction; these weights replace what it copied).
            source = EMBEDDING if is_tied_copy(name, shape) else global_name(model, name)
            if source not in state:
                raise ValueError(f"{hf_path}: no weights for Megatron parameter {source}; is it a {family.name} model?")
            param.copy_(state[source])
            used.add(source)
    if pp > 1:  # the other stages use the rest
        stages: list = [None] * pp
        torch.distributed.all_gather_object(stages, used, group=parallel_state.get_pipeline_model_parallel_group())
        used = set().union(*stages)
    if set(state) - used:
        raise ValueError(f"{hf_path}: weights the model does not use: {sorted(set(state) - used)[:5]}")
    return model


# ---- parameter names -------------------------------------------------------------------------------------------

EMBEDDING = "embedding.word_embeddings.weight"
_LAYERS = "decoder.layers."


def global_name(model: torch.nn.Module, name: str) -> str:
    """A stage's GPTModel numbers its layers `decoder.layers.{i}` from 0; conversion uses the global index, which
    Megatron keeps as each layer's (1-based) `layer_number`."""
    if not name.startswith(_LAYERS):
        return name
    local, _, rest = name[len(_LAYERS):].partition(".")
    return f"{_LAYERS}{model.decoder.layers[int(local)].layer_number - 1}.{rest}"


def is_tied_copy(name: str, shape: ModelShape) -> bool:
    """The output layer's weight when it is tied to the embedding: only a last stage without the embedding holds
    it as a parameter (a copy kept equal by all-reducing its gradient with the first stage's)."""
    return name == "output_layer.weight" and shape.tie_word_embeddings


def own_params(model: torch.nn.Module, shape: ModelShape, tp_size: int) -> list[tuple[str, torch.nn.Parameter, bool]]:
    """(global Megatron name, parameter, whether TP ranks hold different pieces) of this stage's parameters, without
    the last stage's copy of tied embeddings (the first stage's embedding is the one)."""
    return [(global_name(model, name), param, tp_size > 1 and getattr(param, "tensor_model_parallel", False))
            for name, param in model.named_parameters() if not is_tied_copy(name, shape)]
