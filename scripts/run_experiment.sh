#!/usr/bin/env bash
# The whole comparison on one corpus, each step resumable/idempotent:
#   1. vanilla transformer_lm (scripts/train_vanilla.sh)   -> CKPT/NAME/vanilla
#   2. memorizing fine-tune, the paper's options (65K)     -> CKPT/NAME/memory
#   3. control: same updates, memory 0                     -> CKPT/NAME/control
#   4. memorizing fine-tune, copying options (65K)         -> CKPT/NAME/copying-memory
#   4b. memorizing fine-tune, the paper's options trained with distant repeats
#       (document_lm --distant-repeat-prob DISTANT_REPEAT_PROB, 0.5, copies from at most
#       TRAIN_MEMORY tokens back; not in the default STEPS)
#                                                           -> CKPT/NAME/repeat-memory
#   5. LongMem SideNet over the frozen vanilla (65K), its side layers' residual and its
#      memory gated from sigmoid(GATE_INIT), so that it starts at the vanilla -> CKPT/NAME/longmem
#   6. GPTm: a differentiable memory matrix (GPTM_SLOTS)   -> CKPT/NAME/gptm
#   7. sweep of evaluation memory sizes    -> RESULTS/NAME/memory_sweep.{json,md,png}
#      (runs vanilla, control, paper-memory, copying-memory, repeat-memory, longmem, gptm; a killed sweep
#      resumes from RESULTS/NAME/cache)
# Each step's wall time is appended to RESULTS/NAME/timings.tsv. STEPS picks a subset
# (e.g. STEPS="vanilla memory control sweep").
#
#   scripts/run_experiment.sh NAME TRAIN_DATA_BIN EVAL_DATA_BIN
#   env: as train_vanilla.sh (VANILLA_FROM=demo/assets/books/vanilla.pt installs the committed
#        books vanilla instead of training it) / finetune_memory.sh / finetune_gptm.sh, plus FINETUNE_UPDATES (400),
#        TRAIN_MEMORY (65536), SWEEP_SIZES, SWEEP_SUBSET (test), EVAL_BATCH_SIZE (4), STEPS,
#        CKPT (checkpoints), RESULTS (results), VANILLA_CKPT (the vanilla the fine-tunes start from
#        and the sweep scores; default CKPT/NAME/vanilla/checkpoint_last.pt, step 1's),
#        MEMORY_LAYERS (default: the vanilla's induction layer, below), GATE_INIT (-3: the memory
#        fine-tunes start with memory gates sigmoid(-3) = 0.05, so close to the vanilla),
#        MEMORY_PARAM_GAIN (500: every memory model's gates move 500 times faster than the
#        other weights; at the models' default, 50, a gate could travel at most ~0.5 in logit
#        over the 400 updates: docs/results.md)
# The kNN memory extends one layer's attention, so it can copy only through a layer
# whose heads copy: unless MEMORY_LAYERS is given, the memory fine-tunes put it at the
# vanilla's induction layer (the layer of its strongest induction head, measured by
# copy_score.py --induction on TRAIN_DATA_BIN's valid split; docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
experiment_paths run_experiment.sh "$@"

STEPS=" ${STEPS:-vanilla memory control copying-memory longmem gptm sweep} "
step() { [[ "$STEPS" == *" $1 "* ]]; }
VANILLA=${VANILLA_CKPT:-$CKPT/vanilla/checkpoint_last.pt}
FINETUNE=(env MAX_UPDATE="${FINETUNE_UPDATES:-400}" MEMORY_SIZE="${TRAIN_MEMORY:-65536}")

step vanilla && timed vanilla scripts/train_vanilla.sh "$DATA" "$CKPT/vanilla"
if [[ "${STEPS// vanilla / }" =~ [^\ ] ]]; then  # every other step starts from the vanilla or scores it
    if [ -n "${VANILLA_CKPT:-}" ]; then named=VANILLA_CKPT; else named="the vanilla (STEPS=vanilla trains it)"; fi
    require_checkpoint "$named" "$VANILLA"
fi
induction_layer() {
    "$BIN/python" scripts/copy_score.py "$VANILLA" "$DATA" --induction 2>/dev/null |
        "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["induction_layer"])'
}
if [ -z "${MEMORY_LAYERS:-}" ] && { step memory || step copying-memory || step repeat-memory; }; then
    MEMORY_LAYERS=$(induction_layer)
    echo "run_experiment.sh: memory at layer $MEMORY_LAYERS, the vanilla's induction layer (set MEMORY_LAYERS to override)"
fi
export MEMORY_LAYERS GATE_INIT=${GATE_INIT:--3} MEMORY_PARAM_GAIN=${MEMORY_PARAM_GAIN:-500}
step memory && timed memory "${FINETUNE[@]}" scripts/finetune_memory.sh "$DATA" "$VANILLA" "$CKPT/memory"
step control && timed control "${FINETUNE[@]}" MEMORY_SIZE=0 scripts/finetune_memory.sh "$DATA" "$VANILLA" "$CKPT/control"
step copying-memory && timed copying-memory "${FINETUNE[@]}" scripts/finetune_memory.sh "$DATA" "$VANILLA" \
    "$CKPT/copying-memory" --memory-query key --memory-shift-keys
step repeat-memory && timed repeat-memory "${FINETUNE[@]}" scripts/finetune_memory.sh "$DATA" "$VANILLA" \
    "$CKPT/repeat-memory" --distant-repeat-prob "${DISTANT_REPEAT_PROB:-0.5}" \
    --distant-repeat-max-distance "${TRAIN_MEMORY:-65536}"
step longmem && timed longmem "${FINETUNE[@]}" scripts/finetune_longmem.sh "$DATA" "$VANILLA" "$CKPT/longmem" \
    --side-residual-gate-init "$GATE_INIT" --memory-gate-init "$GATE_INIT"
step gptm && timed gptm "${FINETUNE[@]}" scripts/finetune_gptm.sh "$DATA" "$VANILLA" "$CKPT/gptm"
if step sweep; then
    SWEEP_RUNS=()
    for run in control copying-memory repeat-memory longmem gptm; do
        [ -f "$CKPT/$run/checkpoint_last.pt" ] && SWEEP_RUNS+=("--$run-checkpoint" "$CKPT/$run/checkpoint_last.pt")
    done
    timed sweep "$BIN/python" scripts/eval_memory_sweep.py "$EVAL" \
        --memory-checkpoint "$CKPT/memory/checkpoint_last.pt" --vanilla-checkpoint "$VANILLA" "${SWEEP_RUNS[@]}" \
        --memory-sizes "${SWEEP_SIZES:-0,1536,8192,32768,65536,262144}" --subset "${SWEEP_SUBSET:-test}" \
        --tokens-per-sample "$TOKENS_PER_SAMPLE" --batch-size "${EVAL_BATCH_SIZE:-4}" \
        --title "$NAME: perplexity vs evaluation memory size" --out "$OUT" --log-format simple "${CPU_FLAG[@]}"
fi
