#!/usr/bin/env bash
# Fine-tune a vanilla transformer_lm checkpoint to use a kNN memory, reading
# documents in order (--task document_lm). MEMORY_SIZE=0 gives the control: the
# same updates, data and stream order from the same checkpoint, without memory.
# Resumable: rerunning continues from SAVE_DIR/checkpoint_last.pt.
#
#   scripts/finetune_memory.sh DATA_BIN VANILLA_CKPT SAVE_DIR [extra fairseq-train args]
#   env: MEMORY_SIZE (65536), MAX_UPDATE (400), KNN_K (32), LR (5e-5, decaying to 0), DROPOUT (0),
#        MEMORY_LAYERS (--memory-layers), GATE_INIT (--memory-gate-init),
#        MEMORY_PARAM_GAIN (--memory-param-gain, common.sh); unset: the model's defaults
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
finetune --finetune-from-model --arch memorizing_transformer_lm "${SHAPE[@]}" \
    --memory-size "${MEMORY_SIZE:-65536}" --knn-k "${KNN_K:-32}" ${MEMORY_LAYERS:+--memory-layers "$MEMORY_LAYERS"} \
    ${GATE_INIT:+--memory-gate-init "$GATE_INIT"} -- "$@"
