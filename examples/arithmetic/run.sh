#!/usr/bin/env bash
# The arithmetic example, end to end on CPU: a tiny random Qwen3, a supervised warm start, then GRPO with the math
# reward, evaluated on held-out problems throughout. `make arithmetic` runs this after setting up .venv.
#
#   bash examples/arithmetic/run.sh [OUT]        (default OUT: runs/arithmetic; NPROC=2 ranks)
#
# OUT/model: the random model; OUT/data: the task; OUT/sft: the SFT run (metrics.jsonl, eval_samples.jsonl);
# OUT/sft_hf/iter_*: its last weights as an HF folder; OUT/grpo: the GRPO run; OUT/report.json and OUT/curves.png: the figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/arithmetic}
NPROC=${NPROC:-2}
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
SFT_STEPS=${SFT_STEPS:-200}
GRPO_STEPS=${GRPO_STEPS:-60}
SFT_WARMUP=${SFT_WARMUP:-20}    # optimizer steps of learning-rate warmup (shorter than the phase)
GRPO_WARMUP=${GRPO_WARMUP:-5}
rm -rf "$OUT/sft" "$OUT/sft_hf" "$OUT/grpo"

# One token per digit, as in Qwen's tokenizers; 4 layers of width 256 (3.4M parameters).
$PY -m vime_spmd.tools.make_tiny_model "$OUT/model" --split-digits --hidden-size 256 --num-layers 4 \
    --num-heads 4 --num-kv-heads 2 --head-dim 64 --intermediate-size 768 --seed 0
$PY examples/arithmetic/make_data.py "$OUT/data"

# Both phases evaluate the same held-out sets: 4 samples per problem at temperature 1 (accuracy = pass@1).
EVAL=(--eval-prompt-data heldout "$OUT/data/heldout.jsonl" hard "$OUT/data/hard.jsonl"
      --n-samples-per-eval-prompt 4 --rm-type math)
COMMON=(--prompt-data "$OUT/data/train.jsonl" --apply-chat-template --rollout-max-prompt-len 64
        --rollout-max-response-len 48 --tensor-model-parallel-size 1 --rollout-num-gpus-per-engine 1)

# 1. Supervised warm start on written-out solutions (the prompt masked), through the same Megatron backend.
$TORCHRUN --nproc_per_node "$NPROC" run.py --hf-checkpoint "$OUT/model" "${COMMON[@]}" "${EVAL[@]}" \
    --loss-type sft --response-key response --rollout-batch-size 64 --micro-batch-size 32 \
    --lr 2e-3 --lr-warmup-iters "$SFT_WARMUP" --lr-decay-style cosine --min-lr 1e-4 --num-rollout "$SFT_STEPS" \
    --eval-interval 50 --save-hf "$OUT/sft_hf" --log-dir "$OUT/sft"

# 2. GRPO from the SFT weights, rewarded by the math rule (the boxed answer): 64 problems x 8 samples per step,
#    one optimizer step over all 512 (smaller batches at this learning rate gained little: noise won).
SFT_MODEL=$OUT/sft_hf/iter_$(printf %07d "$SFT_STEPS")
$TORCHRUN --nproc_per_node "$NPROC" run.py --hf-checkpoint "$SFT_MODEL" "${COMMON[@]}" "${EVAL[@]}" \
    --advantage-estimator grpo --rollout-batch-size 64 --n-samples-per-prompt 8 --global-batch-size 512 \
    --micro-batch-size 64 --lr 1e-4 --lr-warmup-iters "$GRPO_WARMUP" --num-rollout "$GRPO_STEPS" --eval-interval 10 \
    --log-dir "$OUT/grpo"

$PY examples/arithmetic/report.py "$OUT"
