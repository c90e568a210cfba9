#!/usr/bin/env bash
# Train the "vanilla checkpoint": a plain fairseq transformer_lm (6 x 256, the shape of
# the fine-tunes) that copies from its context, in two phases (docs/vanilla.md):
#
#   1. copy phase -> SAVE_DIR/copy-phase: short blocks of COPY_TOKENS_PER_SAMPLE (128)
#      tokens, batch BATCH_SIZE (4), a fraction REPEAT_PROB (0.5) of them given a repeated
#      span (--task repeat_lm), lr 1e-3 (inverse_sqrt, 500 warm-up), COPY_UPDATES (30000)
#      updates. Induction heads appear after ~5e5 * sqrt(B * C) tokens, so a short context
#      and a small batch bring them within reach of two CPU cores.
#   2. context phase -> SAVE_DIR: TOKENS_PER_SAMPLE (512) blocks, from phase 1's weights
#      with a fresh optimizer, lr LR (3e-4) decaying linearly to 0 over MAX_UPDATE (3500)
#      updates; a fraction CONTEXT_REPEAT_PROB (0.5) of the blocks still get a repeated span
#      (8-128 tokens), without which plain language modelling trains the copying away.
#
# Both phases keep a checkpoint every SAVE_EVERY (1000 / 500) updates, for
# scripts/copy_curve.py. Resumable: rerunning continues either phase where it stopped, and
# a finished phase (or vanilla) is a no-op. COPY_UPDATES=0 skips phase 1 (one plain phase
# from scratch). VANILLA_FROM=FILE installs an exported vanilla (make_demo_model.py
# --export-vanilla, e.g. the committed demo/assets/books/vanilla.pt, with its spm.model and
# dict.txt beside it) as SAVE_DIR/checkpoint_last.pt instead of training, when SAVE_DIR has none.
# INIT_FROM=FILE starts from a vanilla that copies, trained on another vocabulary (its dict.txt
# beside it): scripts/transplant_vanilla.py keeps its layers, rebuilds its embeddings for DATA_BIN's
# dictionary into SAVE_DIR/transplanted.pt, and the context phase trains from there (no copy phase).
#
#   scripts/train_vanilla.sh DATA_BIN SAVE_DIR [extra fairseq-train args, both phases]
#   env: COPY_UPDATES, COPY_TOKENS_PER_SAMPLE, REPEAT_PROB, COPY_LR (1e-3), MAX_UPDATE, LR,
#        CONTEXT_REPEAT_PROB (0: plain language_modeling in phase 2), DROPOUT (0), TOKENS_PER_SAMPLE, BATCH_SIZE, SEED,
#        VANILLA_FROM, INIT_FROM
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
DATA=${1:?usage: train_vanilla.sh DATA_BIN SAVE_DIR [fairseq args]}
SAVE=${2:?usage: train_vanilla.sh DATA_BIN SAVE_DIR [fairseq args]}
shift 2
COPY_UPDATES=${COPY_UPDATES:-30000}
MAX=${MAX_UPDATE:-3500}
COPY_DIR=$SAVE/copy-phase
same_vocabulary "$SAVE" "$DATA"  # refused before the lock creates SAVE_DIR
if [ -n "${INIT_FROM:-}" ] && [ -n "${VANILLA_FROM:-}" ]; then
    echo "train_vanilla.sh: set INIT_FROM (train from a transplanted vanilla) or VANILLA_FROM (install one), not both" >&2
    exit 2
fi
if [ -n "${VANILLA_FROM:-}" ] && [ ! -f "$SAVE/checkpoint_last.pt" ]; then
    require_checkpoint VANILLA_FROM "$VANILLA_FROM"
    for name in dict.txt spm.model; do
        if [ ! -f "$(dirname "$VANILLA_FROM")/$name" ]; then
            echo "train_vanilla.sh: no $name beside VANILLA_FROM=$VANILLA_FROM; export it with" \
                 "scripts/make_demo_model.py --export-vanilla, which writes both" >&2
            exit 2
        fi
    done
    same_vocabulary "$(dirname "$VANILLA_FROM")" "$DATA"
fi
if [ -n "${INIT_FROM:-}" ]; then
    require_checkpoint INIT_FROM "$INIT_FROM"
    COPY_UPDATES=0  # the transplanted vanilla copies already
fi
lock_save_dir "$SAVE"
keep_vocabulary "$SAVE" "$DATA"
if [ -n "${VANILLA_FROM:-}" ] && [ ! -f "$SAVE/checkpoint_last.pt" ]; then
    cp "$VANILLA_FROM" "$SAVE/checkpoint_last.pt.part"
    mv "$SAVE/checkpoint_last.pt.part" "$SAVE/checkpoint_last.pt"
    echo "train_vanilla.sh: $SAVE/checkpoint_last.pt is $VANILLA_FROM (exported weights, not trained here)"
fi
if [ -n "${VANILLA_FROM:-}" ] && cmp -s "$VANILLA_FROM" "$SAVE/checkpoint_last.pt" && ! is_trained "$SAVE" "$MAX"; then
    echo "train_vanilla.sh: $VANILLA_FROM holds fewer than MAX_UPDATE=$MAX updates and an export keeps no" \
         "optimizer state to continue from; set MAX_UPDATE to at most its updates, or train without VANILLA_FROM" >&2
    exit 2
fi
stop_if_trained "$SAVE" "$MAX"  # a finished vanilla needs neither phase
if [ -n "${INIT_FROM:-}" ] && [ ! -f "$SAVE/transplanted.pt" ]; then
    "$BIN/python" scripts/transplant_vanilla.py --from "$INIT_FROM" --dict "$DATA/dict.txt" \
        --out "$SAVE/transplanted.pt" 2> >(grep -v -e tensorboardX -e faiss >&2)
fi

# One fairseq-train run of the vanilla shape: train_phase SAVE_DIR [args]. The plugin is
# loaded in every phase, also for the stock language_modeling task: its changes to fairseq
# (atomic checkpoint_last.pt, a clean exit; fairseq_memtrm/fairseq_patches.py) apply.
train_phase() {
    local dir=$1
    shift
    "$BIN/fairseq-train" "$DATA" --user-dir fairseq_memtrm --sample-break-mode none \
        --arch transformer_lm "${SHAPE[@]}" --dropout "$DROPOUT" --batch-size "$BATCH_SIZE" \
        --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 1.0 \
        --seed "$SEED" --save-dir "$dir" --no-epoch-checkpoints --keep-interval-updates -1 \
        --disable-validation --log-format simple --log-interval 100 "${LOADER_OPTIONS[@]}" \
        "${CPU_FLAG[@]}" "$@"
}

if [ "$COPY_UPDATES" -gt 0 ]; then
    if [ "${REPEAT_PROB:-0.5}" = 0 ]; then
        COPY_TASK=(--task language_modeling)
    else
        COPY_TASK=(--task repeat_lm --repeat-prob "${REPEAT_PROB:-0.5}" --repeat-min-len 8 --repeat-max-len 48)
    fi
    if is_trained "$COPY_DIR" "$COPY_UPDATES"; then
        echo "train_vanilla.sh: copy phase already has $COPY_UPDATES updates"
    else
        echo "train_vanilla.sh: copy phase, $COPY_UPDATES updates -> $COPY_DIR"
        train_phase "$COPY_DIR" "${COPY_TASK[@]}" --tokens-per-sample "${COPY_TOKENS_PER_SAMPLE:-128}" \
            --lr "${COPY_LR:-1e-3}" --lr-scheduler inverse_sqrt --warmup-updates "${COPY_WARMUP:-500}" \
            --max-update "$COPY_UPDATES" --save-interval-updates "${SAVE_EVERY:-1000}" "$@"
    fi
    FROM=(--finetune-from-model "$COPY_DIR/checkpoint_last.pt")
elif [ -n "${INIT_FROM:-}" ]; then
    FROM=(--finetune-from-model "$SAVE/transplanted.pt")
else
    FROM=()
fi

if [ "${CONTEXT_REPEAT_PROB:-0.5}" = 0 ]; then
    CONTEXT_TASK=(--task language_modeling)
else
    CONTEXT_TASK=(--task repeat_lm --repeat-prob "${CONTEXT_REPEAT_PROB:-0.5}" --repeat-min-len 8 --repeat-max-len 128)
fi
echo "train_vanilla.sh: context phase, $MAX updates -> $SAVE"
train_phase "$SAVE" "${CONTEXT_TASK[@]}" --tokens-per-sample "$TOKENS_PER_SAMPLE" "${FROM[@]}" \
    --lr "${LR:-3e-4}" --lr-scheduler polynomial_decay --total-num-update "$MAX" --end-learning-rate 0 \
    --warmup-updates "${WARMUP:-200}" --max-update "$MAX" --save-interval-updates "${SAVE_EVERY:-500}" "$@"
