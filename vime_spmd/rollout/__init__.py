"""Rollout engines. Only `rollout/engine.py` imports vllm."""
