#!/usr/bin/env bash
# The whole fine-tuning experiment on one corpus, each step resumable/idempotent:
#   1. vanilla transformer_lm              -> checkpoints/NAME/vanilla
#   2. memorizing fine-tune (65K memory)   -> checkpoints/NAME/memory
#   3. control: same updates, memory 0     -> checkpoints/NAME/control
#   4. sweep of evaluation memory sizes    -> results/NAME/memory_sweep.{json,md,png}
# Each step's wall time is appended to results/NAME/timings.tsv.
#
#   scripts/run_experiment.sh NAME TRAIN_DATA_BIN EVAL_DATA_BIN
#   env: as train_vanilla.sh / finetune_memory.sh, plus VANILLA_UPDATES (1500),
#        FINETUNE_UPDATES (400), TRAIN_MEMORY (65536), SWEEP_SIZES, EVAL_BATCH_SIZE (4)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
NAME=${1:?usage: run_experiment.sh NAME TRAIN_DATA_BIN EVAL_DATA_BIN}
DATA=${2:?usage: run_experiment.sh NAME TRAIN_DATA_BIN EVAL_DATA_BIN}
EVAL=${3:?usage: run_experiment.sh NAME TRAIN_DATA_BIN EVAL_DATA_BIN}
CKPT=checkpoints/$NAME
OUT=results/$NAME
mkdir -p "$CKPT" "$OUT"

timed() {  # timed STEP command...: run, append "STEP seconds updates" to timings.tsv
    local step=$1 start; shift
    start=$(date +%s)
    "$@"
    printf '%s\t%s\n' "$step" "$(( $(date +%s) - start ))" >> "$OUT/timings.tsv"
}

timed vanilla env MAX_UPDATE="${VANILLA_UPDATES:-1500}" scripts/train_vanilla.sh "$DATA" "$CKPT/vanilla"
timed memory env MAX_UPDATE="${FINETUNE_UPDATES:-400}" MEMORY_SIZE="${TRAIN_MEMORY:-65536}" \
    scripts/finetune_memory.sh "$DATA" "$CKPT/vanilla/checkpoint_last.pt" "$CKPT/memory"
timed control env MAX_UPDATE="${FINETUNE_UPDATES:-400}" MEMORY_SIZE=0 \
    scripts/finetune_memory.sh "$DATA" "$CKPT/vanilla/checkpoint_last.pt" "$CKPT/control"
timed sweep "$BIN/python" scripts/eval_memory_sweep.py "$EVAL" \
    --memory-checkpoint "$CKPT/memory/checkpoint_last.pt" \
    --control-checkpoint "$CKPT/control/checkpoint_last.pt" \
    --vanilla-checkpoint "$CKPT/vanilla/checkpoint_last.pt" \
    --memory-sizes "${SWEEP_SIZES:-0,1536,8192,32768,65536,262144}" \
    --tokens-per-sample "$TOKENS_PER_SAMPLE" --batch-size "${EVAL_BATCH_SIZE:-4}" \
    --title "$NAME: perplexity vs evaluation memory size" --out "$OUT" --log-format simple "${CPU_FLAG[@]}"
