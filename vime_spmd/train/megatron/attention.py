"""Causal core attention through `torch.nn.functional.scaled_dot_product_attention`, for the local layer spec.

Why: Megatron's local `DotProductAttention` computes [b, heads, s, s] scores with baddbmm and keeps the softmax
probabilities for backward, and needs an [s, s] mask; at 8k tokens that is gigabytes per layer. SDPA with
`is_causal=True` takes no mask and dispatches to fused kernels that never hold the scores (flash or
memory-efficient attention on CUDA, the flash-attention CPU kernel on CPU). Padding needs no mask either: samples are
right-padded, and causal attention never lets a real token see a later (padding) position.

The module has the core-attention interface of megatron-core 0.16 (`CoreAttention` in transformer/attention.py):
built with (config, layer_number, attn_mask_type, attention_type, ...), called with query/key/value of shape
[s, b, heads, head_dim] and returning [s, b, heads * head_dim].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPACausalAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None) -> None:
        super().__init__(config=config)
        # What this module does not reproduce from DotProductAttention; model.py never asks for any of it.
        assert attn_mask_type == AttnMaskType.causal, attn_mask_type
        assert config.context_parallel_size == 1 and config.window_size is None, "unsupported attention layout"
        assert getattr(config, "softmax_type", "vanilla") == "vanilla" and not config.apply_query_key_layer_scaling
        assert (attention_dropout if attention_dropout is not None else config.attention_dropout) == 0.0
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        assert attention_mask is None, "causal SDPA takes no mask: pass attention_mask=None"
        assert attention_bias is None and packed_seq_params is None
        seq_len, batch = query.shape[:2]
        # [s, b, heads, d] -> [b, heads, s, d]; key/value keep their (fewer) query-group heads: enable_gqa shares
        # each among its queries without materialising the repeat.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             enable_gqa=q.size(1) != k.size(1))
        return out.permute(2, 0, 1, 3).reshape(seq_len, batch, -1)
