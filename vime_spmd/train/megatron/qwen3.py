"""Qwen3 dense: HF names and layouts <-> Megatron names and tensor-parallel shards.

Megatron layouts (per layer):
- `linear_qkv`: rows grouped per query group g as [q heads of g | k_g | v_g]; TP splits whole groups.
- `linear_fc1`: each TP rank holds [gate_r; up_r], so the full tensor is not cat(gate, up).
- `linear_proj`, `linear_fc2`: split on the input dim (1). Embedding and output layer: split on vocab (0).
- Norm weights (including per-head q/k norms) are replicated.
Both directions are exact (pure reshapes and copies).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .model import ModelShape

_LAYER_SIMPLE = {  # Megatron suffix -> (HF suffix, TP split dim or None when replicated)
    "input_layernorm.weight": ("input_layernorm.weight", None),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight", None),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight", None),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", 1),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight", None),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight", 1),
}
_GLOBAL = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight", 0),
    "decoder.final_layernorm.weight": ("model.norm.weight", None),
    "output_layer.weight": ("lm_head.weight", 0),
}


def _chunk(t: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    return t if dim is None else t.chunk(size, dim=dim)[rank]


def _qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    groups, hd = shape.num_kv_heads, shape.head_dim
    q = q.view(groups, (shape.num_heads // groups) * hd, -1)
    return torch.cat([q, k.view(groups, hd, -1), v.view(groups, hd, -1)], dim=1).reshape(-1, q.shape[-1])


def _qkv_to_hf(qkv: torch.Tensor, shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, hd = shape.num_kv_heads, shape.head_dim
    q_rows = (shape.num_heads // groups) * hd
    grouped = qkv.view(groups, q_rows + 2 * hd, -1)
    q, k, v = grouped.split([q_rows, hd, hd], dim=1)
    return (q.reshape(-1, qkv.shape[-1]), k.reshape(-1, qkv.shape[-1]), v.reshape(-1, qkv.shape[-1]))


def to_megatron(hf: dict[str, torch.Tensor], shape: ModelShape, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """This TP rank's Megatron state dict from a full HF state dict."""
    out: dict[str, torch.Tensor] = {}
    for mname, (hname, dim) in _GLOBAL.items():
        if mname == "output_layer.weight" and shape.tie_word_embeddings:
            continue
        out[mname] = _chunk(hf[hname], dim, tp_rank, tp_size)
    for i in range(shape.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for msuf, (hsuf, dim) in _LAYER_SIMPLE.items():
            out[m + msuf] = _chunk(hf[h + hsuf], dim, tp_rank, tp_size)
        qkv = _qkv_to_megatron(hf[h + "self_attn.q_proj.weight"], hf[h + "self_attn.k_proj.weight"],
                               hf[h + "self_attn.v_proj.weight"], shape)
        out[m + "self_attention.linear_qkv.weight"] = qkv.chunk(tp_size, dim=0)[tp_rank]
        gate = hf[h + "mlp.gate_proj.weight"].chunk(tp_size, dim=0)[tp_rank]
        up = hf[h + "mlp.up_proj.weight"].chunk(tp_size, dim=0)[tp_rank]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
    return {k: v.contiguous() for k, v in out.items()}


def to_hf(mname: str, shards: list[torch.Tensor], shape: ModelShape) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF tensors from the TP shards (in TP-rank order) of one Megatron parameter."""
    if mname in _GLOBAL:
        hname, dim = _GLOBAL[mname]
        yield hname, shards[0] if dim is None else torch.cat(shards, dim=dim)
        return
    prefix, _, suffix = mname.partition(".layers.")
    layer, _, msuf = suffix.partition(".")
    h = f"model.layers.{layer}."
    if msuf in _LAYER_SIMPLE:
        hsuf, dim = _LAYER_SIMPLE[msuf]
        yield h + hsuf, shards[0] if dim is None else torch.cat(shards, dim=dim)
    elif msuf == "self_attention.linear_qkv.weight":
        q, k, v = _qkv_to_hf(torch.cat(shards, dim=0), shape)
        yield from ((h + "self_attn.q_proj.weight", q), (h + "self_attn.k_proj.weight", k),
                    (h + "self_attn.v_proj.weight", v))
    elif msuf == "mlp.linear_fc1.weight":
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        yield h + "mlp.gate_proj.weight", torch.cat(gates, dim=0)
        yield h + "mlp.up_proj.weight", torch.cat(ups, dim=0)
    else:
        raise KeyError(f"no HF name for Megatron parameter {mname!r} (Qwen3 conversion)")
