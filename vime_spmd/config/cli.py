"""The vime/slime-compatible command line: one flag per field, parsed into a resolved `Config`.

`parse_config` = parse the flags, then `resolve`: the one step where defaults that depend on other flags and
Megatron-LM's names are worked out. Bad flags that argparse can see (unknown names, wrong types, a value not among
a flag's choices) raise ValueError here; the rest is `check_config`'s (config.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from . import compat
from .config import Config, check_config
from .sections import ATTENTION_BACKEND_ALIASES


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class FlagParser(argparse.ArgumentParser):
    """Bad flags raise ValueError (one `error:` line from run.py); unknown ones all in one message, each with the
    closest flag that does something (never one of the ignored vime/slime flags)."""

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if not unknown:
            raise ValueError(f"{message} (python run.py --help lists every flag)")
        flags = [word for word in unknown.group(1).split() if word.startswith("--")] or unknown.group(1).split()
        ignored = {entry.flag for entry in compat.IGNORED}
        honoured = [flag for flag in self._option_string_actions if flag not in ignored]
        hints = []
        for flag in flags:
            close = difflib.get_close_matches(flag, honoured, n=1, cutoff=0.8)
            hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
        raise ValueError(f"unknown flag{'s' if len(flags) > 1 else ''}: {', '.join(hints)}; python run.py --help "
                         "lists every flag")


def _argument(kind: Any, f: dataclasses.Field) -> dict[str, Any]:
    """add_argument's keywords for the field `f` of type `kind`."""
    kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"], "default": f.default}
    if kind is bool:
        return kw | {"action": argparse.BooleanOptionalAction}
    if list in (get_origin(t) for t in (kind, *get_args(kind))):  # list[X] or list[X] | None
        item = next(get_args(t)[0] for t in (kind, *get_args(kind)) if get_origin(t) is list)
        return kw | {"nargs": "+", "type": item} | {k: f.metadata[k] for k in ("metavar",) if k in f.metadata}
    kw["type"] = next((t for t in (int, float, str) if t == kind or t | None == kind), str)
    return kw | {k: f.metadata[k] for k in ("required", "choices") if f.metadata.get(k)}


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="run.py", description="Colocated GRPO with Megatron-core and vLLM", allow_abbrev=False)
    for group_field in dataclasses.fields(Config):
        group_cls = group_field.default_factory  # type: ignore[misc]
        group = parser.add_argument_group(group_field.name)
        hints = get_type_hints(group_cls)
        for f in dataclasses.fields(group_cls):
            group.add_argument(_flag(f.name), **_argument(hints[f.name], f))
    compat.add_ignored_flags(parser)
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    """The flags (sys.argv without `argv`) as a resolved Config; warns once (rank 0) about ignored slime flags."""
    ns = vars(build_parser().parse_args(argv))
    ignored = compat.take_ignored(ns)
    if ignored and os.environ.get("RANK", "0") == "0":
        print(compat.warning_line(ignored), file=sys.stderr, flush=True)
    groups = {}
    for group_field in dataclasses.fields(Config):
        group_cls = group_field.default_factory  # type: ignore[misc]
        groups[group_field.name] = group_cls(**{f.name: ns[f.name] for f in dataclasses.fields(group_cls)})
    return resolve(Config(**groups))


def parse_and_check(argv: list[str] | None, world_size: int) -> Config:
    """`parse_config` then `check_config`: for callers that build a config from flags outside `loop.prepare`."""
    cfg = parse_config(argv)
    check_config(cfg, world_size)
    return cfg


def _derived(value: int | None) -> int | None:
    """A default derived from other flags; None when those are out of range (check_config names them, once)."""
    return value if value is not None and value >= 1 else None


def resolve(cfg: Config) -> Config:
    """The config every part reads: each default that depends on other flags worked out, Megatron-LM's names
    mapped onto ours. Values the user gave are kept, so that `check_config` still sees a contradiction."""
    d, t, o, g = cfg.data, cfg.train, cfg.optimizer, cfg.log
    rm_type = d.rm_type or ("custom" if d.custom_rm_path else "remote" if d.rm_url else "math")
    logprob_budget = t.log_probs_max_tokens_per_gpu
    if logprob_budget is None and t.use_dynamic_batch_size:
        logprob_budget = _derived(t.max_tokens_per_gpu)
    samples = cfg.num_samples_per_rollout
    gbs = t.global_batch_size if t.global_batch_size is not None else _derived(samples)
    decay = o.lr_decay_iters
    if decay is None and gbs is not None and gbs >= 1:
        decay = _derived(t.num_rollout * (samples // gbs))
    train = dataclasses.replace(t, global_batch_size=gbs, log_probs_max_tokens_per_gpu=logprob_budget,
                                attention_backend=ATTENTION_BACKEND_ALIASES.get(t.attention_backend,
                                                                                t.attention_backend))
    log_dir = g.log_dir if g.log_dir is not None else str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    return dataclasses.replace(cfg, data=dataclasses.replace(d, rm_type=rm_type), train=train,
                               optimizer=dataclasses.replace(o, lr_decay_iters=decay),
                               log=dataclasses.replace(g, log_dir=log_dir))
