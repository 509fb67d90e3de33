"""Qwen3 dense: per-head RMSNorm of q and k (`q_norm`/`k_norm` -> `q_layernorm`/`k_layernorm`), no biases.

Names and layouts are the shared dense ones (`dense.py`). Qwen3-MoE is another family (its experts and router
would be converted in their own module, the rest by `dense`).
"""

from __future__ import annotations

from . import dense
from .model import ModelShape

to_megatron = dense.to_megatron
to_hf = dense.to_hf
to_engine = dense.to_engine


def shape_from_hf(hf_config, tp_size: int = 1, make_vocab_size_divisible_by: int = 1) -> ModelShape:
    return dense.shape_from_hf(hf_config, tp_size, make_vocab_size_divisible_by, qk_layernorm=True,
                               add_qkv_bias=False)
