"""Flags that vime/slime launch scripts pass and that mean nothing here: accepted, and named in one warning line.

A slime script carries Ray placement, Megatron's model shape (MODEL_ARGS), dropout and kernel switches. Here
torchrun places the ranks, the shape comes from --hf-checkpoint's config.json, and the rest is chosen by the
backends. Rejecting these would make every script fail; ignoring them silently would hide that they do nothing.
A few are accepted only with the value that matches what we do (e.g. --context-parallel-size 1).
Any other unknown flag is an error (config.FlagParser) that suggests the closest known flag.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

PLACEMENT = "no Ray: torchrun starts one rank per device, and training and rollout share them"
SHAPE = "the model's shape is read from --hf-checkpoint's config.json"
DROPOUT = "dropout is always off: the trainer's logprobs must match the engine's"
KERNELS = "kernels and precision are chosen by vime-spmd for the device"
ENGINE = "the engine is vLLM, in process; its settings have their own --vllm-* flags"


@dataclass(frozen=True)
class Ignored:
    flag: str
    takes_value: bool
    reason: str
    only: str | None = None  # the one value accepted (others are refused: we cannot do what they ask)


IGNORED = (
    *(Ignored(f, True, PLACEMENT) for f in ("--actor-num-nodes", "--actor-num-gpus-per-node", "--rollout-num-gpus",
                                            "--num-gpus-per-node", "--critic-num-nodes",
                                            "--critic-num-gpus-per-node")),
    *(Ignored(f, True, SHAPE) for f in ("--num-layers", "--hidden-size", "--ffn-hidden-size",
                                        "--num-attention-heads", "--num-query-groups", "--kv-channels",
                                        "--vocab-size", "--norm-epsilon", "--rotary-base", "--normalization",
                                        "--max-position-embeddings", "--position-embedding-type",
                                        "--rotary-percent", "--seq-length")),
    *(Ignored(f, False, SHAPE) for f in ("--swiglu", "--group-query-attention", "--use-rotary-position-embeddings",
                                         "--disable-bias-linear", "--add-qkv-bias", "--qk-layernorm",
                                         "--untie-embeddings-and-output-weights")),
    *(Ignored(f, True, DROPOUT) for f in ("--attention-dropout", "--hidden-dropout")),
    *(Ignored(f, False, KERNELS) for f in ("--accumulate-allreduce-grads-in-fp32", "--attention-softmax-in-fp32",
                                           "--bf16", "--no-gradient-accumulation-fusion",
                                           "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion")),
    Ignored("--vllm-enforce-eager", False, "the engine's eager mode is chosen by vime-spmd (always on CPU and NPU)"),
    Ignored("--sglang-mem-fraction-static", True, ENGINE + " (--vllm-gpu-memory-utilization)"),
    Ignored("--megatron-to-hf-mode", True, "weights convert in process, from Megatron's shards to the engine"),
    Ignored("--rollout-shuffle", False, "prompts are always shuffled, per epoch, from --seed"),
    Ignored("--balance-data", False, "each data-parallel rank trains on an equal share of the samples"),
    *(Ignored(f, True, "not supported: dense models without context parallelism", only="1")
      for f in ("--context-parallel-size", "--expert-model-parallel-size", "--expert-tensor-parallel-size")),
)


def add_ignored_flags(parser: argparse.ArgumentParser) -> None:
    """Register the ignored flags (unless the product has since gained a real flag of that name)."""
    group = parser.add_argument_group("accepted from vime/slime scripts and ignored (one warning names them)")
    for entry in IGNORED:
        if entry.flag in parser._option_string_actions:
            continue
        kw = {"metavar": "X", "nargs": None} if entry.takes_value else {"action": "store_true"}
        group.add_argument(entry.flag, dest=_dest(entry.flag), default=None, help=f"ignored: {entry.reason}", **kw)


def _dest(flag: str) -> str:
    return "ignored__" + flag.lstrip("-").replace("-", "_")


def take_ignored(namespace: dict) -> list[Ignored]:
    """Remove the ignored flags from the parsed namespace; those the user gave, in table order. Raises ValueError
    for a value we cannot honour."""
    given = []
    for entry in IGNORED:
        value = namespace.pop(_dest(entry.flag), None)
        if value in (None, False):
            continue
        if entry.only is not None and str(value).lower() != entry.only:
            raise ValueError(f"{entry.flag} {value}: {entry.reason}; drop the flag or pass {entry.flag} {entry.only}")
        given.append(entry)
    return given


def warning_line(given: list[Ignored]) -> str:
    """One line: the flags grouped by reason."""
    reasons: dict[str, list[str]] = {}
    for entry in given:
        reasons.setdefault(entry.reason, []).append(entry.flag)
    parts = [f"{' '.join(flags)} ({reason})" for reason, flags in reasons.items()]
    return "warning: ignoring flags that do not apply here: " + "; ".join(parts)
