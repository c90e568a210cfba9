#!/usr/bin/env bash
# Train the "vanilla checkpoint": a plain fairseq transformer_lm (no plugin),
# 6 x 256, on a data-bin from scripts/prepare_data.py. Resumable: rerunning
# continues from SAVE_DIR/checkpoint_last.pt (fairseq's own resume).
#
#   scripts/train_vanilla.sh DATA_BIN SAVE_DIR [extra fairseq-train args]
#   env: MAX_UPDATE (default 1500 updates of 4 x 512 tokens), LR (5e-4),
#        REPEAT_PROB (0 = plain --task language_modeling): the fraction of training
#        blocks given a repeated span (--task repeat_lm, fairseq_memtrm/tasks/repeat_lm.py),
#        a curriculum for copying from the context (the code run used it; README, Results)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
DATA=${1:?usage: train_vanilla.sh DATA_BIN SAVE_DIR [fairseq args]}
SAVE=${2:?usage: train_vanilla.sh DATA_BIN SAVE_DIR [fairseq args]}
shift 2
if [ "${REPEAT_PROB:-0}" = 0 ]; then
    TASK=(--task language_modeling)
else
    TASK=(--user-dir fairseq_memtrm --task repeat_lm --repeat-prob "$REPEAT_PROB")
fi
MAX=${MAX_UPDATE:-1500}
keep_vocabulary "$SAVE" "$DATA"
stop_if_trained "$SAVE" "$MAX"
exec "$BIN/fairseq-train" "$DATA" "${TASK[@]}" --sample-break-mode none \
    --arch transformer_lm "${SHAPE[@]}" --dropout 0.1 \
    --tokens-per-sample "$TOKENS_PER_SAMPLE" --batch-size "$BATCH_SIZE" \
    --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 1.0 --lr "${LR:-5e-4}" \
    --lr-scheduler inverse_sqrt --warmup-updates 200 --max-update "$MAX" \
    --seed "$SEED" --save-dir "$SAVE" --no-epoch-checkpoints --save-interval-updates 250 \
    --keep-interval-updates 1 --disable-validation --log-format simple --log-interval 50 \
    "${CPU_FLAG[@]}" "$@"
