"""Colocated RL post-training: every rank trains its Megatron shard and generates with its in-process vLLM engine.

    torchrun --nproc_per_node 2 run.py --hf-checkpoint MODEL --prompt-data prompts.jsonl --rollout-batch-size 8 \
        --n-samples-per-prompt 4 --tensor-model-parallel-size 2 --rollout-num-gpus-per-engine 2
    python run.py ...          # the same loop as a world of one (debugging)

`python run.py --help` lists every flag; `make demo` runs a tiny model on CPU.
"""

import logging
import sys

from vime_spmd.config import parse_config
from vime_spmd.loop.observe import quiet_libraries
from vime_spmd.runtime import failures
from vime_spmd.runtime.watchdog import exit_with_launcher


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    exit_with_launcher()
    try:
        cfg = parse_config()
        quiet_libraries(cfg.log.verbose)  # before torch, vLLM and transformers are imported (below)
        from vime_spmd.loop.prepare import prepare
        from vime_spmd.loop.trainer import train

        dataset, eval_sets = prepare(cfg)
    except ValueError as e:  # a user mistake, found before any work: one line for the job, no traceback
        failures.report(str(e))
        return 2
    try:
        train(cfg, dataset, eval_sets)
    except failures.RunError as e:  # e.g. a full disk during a save: one line, the cause and what to do
        failures.report(str(e))
        return 1
    except BaseException:
        failures.mark_failed()  # so that ranks the launcher now stops exit at once instead of saving
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
