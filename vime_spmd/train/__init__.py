"""Training backends. Only `train/megatron/` imports megatron."""
