#!/usr/bin/env bash
# One node: set the platform's environment (python -m vime_spmd.runtime.launch_env prints each variable with its reason),
# then start one rank per device with torchrun.
#
#   launch/torchrun.sh --hf-checkpoint /models/Qwen3-4B --prompt-data prompts.jsonl ...   # run.py flags
#
# DEVICE=auto|cpu|cuda|npu (default auto), NPROC_PER_NODE (default: every device of that kind; 1 on CPU),
# PYTHON (default: the repository's .venv, else python3), STOP_TIMEOUT_S (default 900).
#
# `kill -TERM` or `kill -USR1` of this process (torchrun) stops the run after the current step, with a checkpoint
# when --save is set: torchrun forwards both to the ranks (SIGUSR1 only because it is listed below) and SIGKILLs
# them if they are not done within STOP_TIMEOUT_S, which must exceed one step plus a save.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
DEVICE="${DEVICE:-auto}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# An assignment, so that a failure (say, no preload library on Ascend) stops here instead of running without it.
ENV_LINES="$("$PYTHON" -m vime_spmd.runtime.launch_env --device "$DEVICE")"
echo "$ENV_LINES" >&2
eval "$ENV_LINES"
NPROC="${NPROC_PER_NODE:-$("$PYTHON" -m vime_spmd.runtime.launch_env --device "$DEVICE" --count)}"

exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${STOP_TIMEOUT_S:-900}" \
    "$ROOT/run.py" --device "$DEVICE" "$@"
