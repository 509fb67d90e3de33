"""Qwen2 and Qwen2.5: biases on q, k and v (not on o_proj or the MLP), no q/k norms.

Names and layouts are the shared dense ones (`dense.py`); the q/k/v biases follow the same per-query-group
interleaving as the q/k/v weights.
"""

from __future__ import annotations

from . import dense
from .model import ModelShape

to_megatron = dense.to_megatron
to_hf = dense.to_hf
to_engine = dense.to_engine


def shape_from_hf(hf_config, tp_size: int = 1, make_vocab_size_divisible_by: int = 1) -> ModelShape:
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim and head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        # transformers honours a head_dim attribute, vLLM's Qwen2 derives it: the two would disagree.
        raise ValueError(f"--hf-checkpoint: Qwen2 head_dim {head_dim} x {hf_config.num_attention_heads} heads != "
                         f"hidden_size {hf_config.hidden_size}; Qwen2 requires head_dim = hidden_size / heads")
    return dense.shape_from_hf(hf_config, tp_size, make_vocab_size_divisible_by, qk_layernorm=False,
                               add_qkv_bias=True)
