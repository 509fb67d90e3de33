"""The dense decoder layout that Qwen3, Qwen2 and Llama share: HF names <-> Megatron names and TP shards.

The family modules (`qwen3`, `qwen2`, `llama`) say which optional tensors a family has (q/k norms, q/k/v biases)
through the `ModelShape` they build; this module does the names and layouts. A mixture-of-experts family would
convert its experts itself and hand every other parameter to these functions.

Megatron layouts (per layer):
- `linear_qkv` (weight and bias): rows grouped per query group g as [q heads of g | k_g | v_g]; TP splits whole
  groups.
- `linear_fc1`: each TP rank holds [gate_r; up_r], so the full tensor is not cat(gate, up).
- `linear_proj`, `linear_fc2`: split on the input dim (1). Embedding and output layer: split on vocab (0), after
  padding the vocabulary with zero rows to `shape.padded_vocab_size`.
- Norm weights (including per-head q/k norms) are replicated.
Both directions are exact (pure reshapes, copies, zero padding and its removal).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch

from ...sync.weights import EngineTensor, Write
from .model import ModelShape, padded_vocab_size

_LAYER_SIMPLE = {  # Megatron suffix -> (HF suffix, TP split dim or None when replicated)
    "input_layernorm.weight": ("input_layernorm.weight", None),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight", None),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight", None),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", 1),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight", None),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight", 1),
}
_QK_NORMS = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")
_VOCAB = {"embedding.word_embeddings.weight": "model.embed_tokens.weight", "output_layer.weight": "lm_head.weight"}
_FINAL_NORM = ("decoder.final_layernorm.weight", "model.norm.weight")
# Megatron hard-codes these three in its "llama3" RoPE scaling (RotaryEmbedding._apply_scaling); only the factor
# is a GPTModel argument.
_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.0}


# ---- HF config -> ModelShape ---------------------------------------------------------------------------------

def shape_from_hf(hf_config, tp_size: int, make_vocab_size_divisible_by: int, *, qk_layernorm: bool,
                  add_qkv_bias: bool) -> ModelShape:
    """The shape of a dense decoder, after refusing what the local-spec GPTModel cannot reproduce exactly."""
    _refuse_unsupported(hf_config)
    theta, rope_scaling_factor = rope_from_hf(hf_config)
    vocab = hf_config.vocab_size
    return ModelShape(
        vocab_size=vocab,
        padded_vocab_size=padded_vocab_size(vocab, tp_size, make_vocab_size_divisible_by),
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=theta,
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        qk_layernorm=qk_layernorm,
        add_qkv_bias=add_qkv_bias,
        rope_scaling_factor=rope_scaling_factor,
    )


def _refuse_unsupported(hf_config) -> None:
    name = getattr(hf_config, "model_type", "model")
    what = None
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        what = f"hidden_act={hf_config.hidden_act!r} (only 'silu')"
    elif getattr(hf_config, "attention_bias", False):
        what = "attention_bias=True (biases on q/k/v and o_proj)"
    elif getattr(hf_config, "mlp_bias", False):
        what = "mlp_bias=True"
    elif getattr(hf_config, "use_sliding_window", False) or "sliding_attention" in (
            getattr(hf_config, "layer_types", None) or ()):
        what = "sliding-window attention"
    if what:
        raise ValueError(f"--hf-checkpoint: this {name} config uses {what}, which the Megatron model here does not "
                         f"support; use a checkpoint without it")


def rope_from_hf(hf_config) -> tuple[float, float | None]:
    """(rope_theta, llama3 scaling factor or None); other RoPE variants raise ValueError."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"--hf-checkpoint: partial rotary embeddings (partial_rotary_factor="
                         f"{rope['partial_rotary_factor']}) are not supported")
    if kind == "default":
        return theta, None
    if kind == "llama3":
        given = {k: float(rope.get(k, math.nan)) for k in _LLAMA3_ROPE_FIXED}
        if given != _LLAMA3_ROPE_FIXED:
            raise ValueError(f"--hf-checkpoint: llama3 RoPE scaling with {given} is not supported: megatron-core "
                             f"fixes {_LLAMA3_ROPE_FIXED} (the Llama 3.1/3.2/3.3 values); only 'factor' may vary")
        return theta, float(rope["factor"])
    raise ValueError(f"--hf-checkpoint: RoPE type {kind!r} is not supported (only 'default' and 'llama3')")


# ---- HF state dict -> this rank's Megatron shards ------------------------------------------------------------

def _chunk(t: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    return t if dim is None else t.chunk(size, dim=dim)[rank]


def _pad_vocab(t: torch.Tensor, name: str, shape: ModelShape) -> torch.Tensor:
    if t.size(0) != shape.vocab_size:
        raise ValueError(f"--hf-checkpoint: {name} has {t.size(0)} rows but the config's vocab_size is "
                         f"{shape.vocab_size}")
    pad = shape.padded_vocab_size - shape.vocab_size
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t


def _qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """Weights [rows, hidden] or biases [rows]: per query group, its q heads then its k and v head."""
    groups = shape.num_kv_heads
    return torch.cat([t.unflatten(0, (groups, -1)) for t in (q, k, v)], dim=1).flatten(0, 1)


def _qkv_to_hf(pieces: list[torch.Tensor], shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v from the TP pieces of `linear_qkv` (each holds whole query groups): one dense copy each, made by
    concatenating the pieces' group views directly (the engine's loader copies strided sources several times
    slower, and concatenating the pieces first would copy twice)."""
    hd = shape.head_dim
    q_rows = (shape.num_heads // shape.num_kv_heads) * hd
    split = [p.unflatten(0, (-1, q_rows + 2 * hd)).split([q_rows, hd, hd], dim=1) for p in pieces]
    return tuple(torch.cat([s[i] for s in split], dim=0).flatten(0, 1) for i in range(3))


def to_megatron(hf: Mapping[str, torch.Tensor], shape: ModelShape, tp_rank: int,
                tp_size: int) -> dict[str, torch.Tensor]:
    """This TP rank's Megatron state dict from a full HF state dict; HF tensors it does not use raise ValueError."""
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise ValueError(f"--hf-checkpoint: no tensor {name!r} (a {shape.num_layers}-layer "
                             f"{'tied' if shape.tie_word_embeddings else 'untied'} model was expected)")
        used.add(name)
        return hf[name]

    out: dict[str, torch.Tensor] = {}
    for mname, hname in _VOCAB.items():
        if mname == "output_layer.weight" and shape.tie_word_embeddings:
            continue
        out[mname] = _pad_vocab(get(hname), hname, shape).chunk(tp_size, dim=0)[tp_rank]
    out[_FINAL_NORM[0]] = get(_FINAL_NORM[1])
    for i in range(shape.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for msuf, (hsuf, dim) in _LAYER_SIMPLE.items():
            if msuf in _QK_NORMS and not shape.qk_layernorm:
                continue
            out[m + msuf] = _chunk(get(h + hsuf), dim, tp_rank, tp_size)
        for kind in ("weight", "bias") if shape.add_qkv_bias else ("weight",):
            qkv = _qkv_to_megatron(*(get(f"{h}self_attn.{p}_proj.{kind}") for p in "qkv"), shape)
            out[f"{m}self_attention.linear_qkv.{kind}"] = qkv.chunk(tp_size, dim=0)[tp_rank]
        gate = get(h + "mlp.gate_proj.weight").chunk(tp_size, dim=0)[tp_rank]
        up = get(h + "mlp.up_proj.weight").chunk(tp_size, dim=0)[tp_rank]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
    # A tied checkpoint may still carry lm_head (a copy of the embedding); anything else would be silently dropped.
    unused = sorted(set(hf) - used - ({"lm_head.weight"} if shape.tie_word_embeddings else set()))
    if unused:
        raise ValueError(f"--hf-checkpoint: tensors this model family does not use: {unused[:5]}")
    # Clones: a chunk is a view that would keep the whole HF tensor alive; a rank keeps only its shards.
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}


# ---- Megatron shards -> full HF tensors ----------------------------------------------------------------------

def _cat(shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenate TP pieces; a single piece is returned as is (no copy: the engine's loader copies anyway)."""
    return shards[0] if len(shards) == 1 else torch.cat(shards, dim=dim)


def to_hf(mname: str, shards: list[torch.Tensor], shape: ModelShape) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF tensors from the TP shards (in TP-rank order) of one Megatron parameter. Results may be views
    of the shards: consume them before the shards change."""
    if mname in _VOCAB:
        yield _VOCAB[mname], _cat(shards, dim=0)[: shape.vocab_size]
        return
    if mname == _FINAL_NORM[0]:
        yield _FINAL_NORM[1], shards[0]
        return
    _, _, suffix = mname.partition(".layers.")
    layer, _, msuf = suffix.partition(".")
    h = f"model.layers.{layer}."
    if msuf in _LAYER_SIMPLE:
        hsuf, dim = _LAYER_SIMPLE[msuf]
        yield h + hsuf, shards[0] if dim is None else _cat(shards, dim=dim)
    elif msuf in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = msuf.rpartition(".")[2]
        q, k, v = _qkv_to_hf(shards, shape)
        yield from ((f"{h}self_attn.q_proj.{kind}", q), (f"{h}self_attn.k_proj.{kind}", k),
                    (f"{h}self_attn.v_proj.{kind}", v))
    elif msuf == "mlp.linear_fc1.weight":
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        yield h + "mlp.gate_proj.weight", _cat(list(gates), dim=0)
        yield h + "mlp.up_proj.weight", _cat(list(ups), dim=0)
    else:
        raise KeyError(f"no HF name for Megatron parameter {mname!r} (dense decoder conversion)")


# ---- Megatron shards -> one engine rank's own tensors (the direct sync) --------------------------------------
#
# The engine (vLLM) keeps per tensor-parallel rank e of E: `qkv_proj` = [its q heads | its kv heads (k) | (v)],
# kv heads replicated when E exceeds their number; `gate_up_proj` = [gate_e; up_e]; `o_proj`, `down_proj` split
# on the input dim; the vocabulary split into the row ranges the engine reports (`EngineTensor.vocab_rows`),
# rows past the real vocabulary zero. Each `Write` below copies one view of a training piece into its place, so
# an engine rank reads exactly its share, once, without building a full tensor.

_ENGINE_FUSED = {"self_attention.linear_qkv": "self_attn.qkv_proj", "mlp.linear_fc1": "mlp.gate_up_proj"}


def _ranges(size: int, num_parts: int) -> list[tuple[int, int]]:
    per = size // num_parts
    return [(i * per, (i + 1) * per) for i in range(num_parts)]


def _overlaps(pieces: list[torch.Tensor], size: int, want: tuple[int, int]) -> Iterator[tuple[int, int, int, int]]:
    """(piece index, offset in the piece, offset in `want`, length) of each piece's part of the index range
    `want` of a dimension of `size` split evenly over the pieces."""
    for t, (lo, hi) in enumerate(_ranges(size, len(pieces))):
        a, b = max(lo, want[0]), min(hi, want[1])
        if a < b:
            yield t, a - lo, a - want[0], b - a


def _qkv_writes(name: str, pieces: list[torch.Tensor], shape: ModelShape, rank: int, size: int) -> list[Write]:
    hd, groups = shape.head_dim, shape.num_kv_heads
    per_group = shape.num_heads // groups
    heads = shape.num_heads // size  # q heads of this engine rank
    first_head = rank * heads
    g_lo, g_hi = first_head // per_group, -(-(first_head + heads) // per_group)  # its query (and kv) groups
    w_lo = first_head - g_lo * per_group if g_hi - g_lo == 1 else 0  # its heads inside a group, when a part
    w_hi = w_lo + min(heads, per_group)
    k_start, v_start = heads * hd, (heads + g_hi - g_lo) * hd
    writes = []
    for t, in_piece, in_want, n in _overlaps(pieces, groups, (g_lo, g_hi)):
        grouped = pieces[t].unflatten(0, (-1, per_group + 2, hd))[in_piece: in_piece + n]
        writes += [Write(name, 0, in_want * (w_hi - w_lo) * hd, grouped[:, w_lo:w_hi]),
                   Write(name, 0, k_start + in_want * hd, grouped[:, per_group]),
                   Write(name, 0, v_start + in_want * hd, grouped[:, per_group + 1])]
    return writes


def to_engine(mname: str, pieces: list[torch.Tensor], shape: ModelShape, rank: int, size: int,
              engine: Mapping[str, EngineTensor]) -> list[Write]:
    """The writes that put engine rank `rank` (of `size`) of the Megatron parameter `mname` (its TP pieces in
    rank order, one piece when replicated) into the engine's tensors (`engine`: name -> EngineTensor)."""
    if mname in _VOCAB:
        name = _VOCAB[mname]
        lo, hi = engine[name].vocab_rows
        real = max(hi - lo, 0)  # a rank past the end of a small vocabulary holds padding only
        writes = [Write(name, 0, at, pieces[t].narrow(0, off, n))
                  for t, off, at, n in _overlaps(pieces, shape.padded_vocab_size, (lo, lo + real))]
        rows = engine[name].shape[0]
        return writes + ([Write(name, 0, real, None, rows - real)] if rows > real else [])
    if mname == _FINAL_NORM[0]:
        return [Write(_FINAL_NORM[1], 0, 0, pieces[0])]
    _, _, suffix = mname.partition(".layers.")
    layer, _, msuf = suffix.partition(".")
    h = f"model.layers.{layer}."
    if msuf in _LAYER_SIMPLE:
        hsuf, dim = _LAYER_SIMPLE[msuf]
        if dim is None:
            return [Write(h + hsuf, 0, 0, pieces[0])]
        cols = pieces[0].shape[1] * len(pieces)
        want = _ranges(cols, size)[rank]
        return [Write(h + hsuf, 1, at, pieces[t].narrow(1, off, n)) for t, off, at, n in _overlaps(pieces, cols, want)]
    module, _, kind = msuf.rpartition(".")
    if module == "self_attention.linear_qkv":
        return _qkv_writes(h + _ENGINE_FUSED[module] + "." + kind, pieces, shape, rank, size)
    if module == "mlp.linear_fc1":
        ffn = shape.ffn_hidden_size
        name, want = h + _ENGINE_FUSED[module] + "." + kind, _ranges(ffn, size)[rank]
        halves = [p.chunk(2, dim=0) for p in pieces]  # [gate_t; up_t]
        return [Write(name, 0, part * (ffn // size) + at, halves[t][part].narrow(0, off, n))
                for part in (0, 1) for t, off, at, n in _overlaps([h_[part] for h_ in halves], ffn, want)]
    raise KeyError(f"no engine tensor for Megatron parameter {mname!r} (dense decoder conversion)")
