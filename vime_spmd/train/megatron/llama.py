"""Llama 3 (3.0 to 3.3): no biases, no q/k norms; RoPE either plain or with "llama3" frequency scaling.

Names and layouts are the shared dense ones (`dense.py`). megatron-core reproduces "llama3" scaling exactly
only with low_freq_factor 1, high_freq_factor 4 and original_max_position_embeddings 8192 (what every released
Llama 3.x uses); other values are refused in `dense.rope_from_hf`.
"""

from __future__ import annotations

from . import dense
from .model import ModelShape

to_megatron = dense.to_megatron
to_hf = dense.to_hf
to_engine = dense.to_engine


def shape_from_hf(hf_config, tp_size: int = 1, make_vocab_size_divisible_by: int = 1) -> ModelShape:
    return dense.shape_from_hf(hf_config, tp_size, make_vocab_size_divisible_by, qk_layernorm=False,
                               add_qkv_bias=False)
