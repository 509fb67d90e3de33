"""Typed configuration, one frozen dataclass per component, and the vime/slime-compatible command line.

    cfg = parse_config(argv)          # cli.py: flags -> a resolved Config (defaults worked out once, then frozen)
    check_config(cfg, world_size)     # config.py: one ValueError listing every problem, each naming flag and fix

sections.py holds the sections, each with the checks of its own flags; config.py the whole Config and the rules
across sections; checks.py the checks that read files or import user code (run by `loop.prepare`); compat.py the
vime/slime flags accepted and ignored.
"""

from .cli import build_parser, parse_and_check, parse_config, resolve
from .config import Config, check_config, dump
from .sections import (
    ATTENTION_BACKEND_ALIASES,
    OBSERVE_EXTRA,
    RM_TYPES,
    AlgorithmConfig,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    ResilienceConfig,
    RolloutConfig,
    TrainConfig,
    eval_sets,
)

__all__ = [
    "ATTENTION_BACKEND_ALIASES", "OBSERVE_EXTRA", "RM_TYPES", "AlgorithmConfig", "CheckpointConfig", "Config",
    "DataConfig", "EvalConfig", "LogConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig", "ResilienceConfig",
    "RolloutConfig", "TrainConfig", "build_parser", "check_config", "dump", "eval_sets", "parse_and_check",
    "parse_config", "resolve",
]
