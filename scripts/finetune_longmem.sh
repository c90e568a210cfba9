#!/usr/bin/env bash
# Train a LongMem SideNet over a frozen vanilla transformer_lm checkpoint (the
# backbone), reading documents in order (--task document_lm). Same data, stream
# order, optimizer and update budget as finetune_memory.sh, so the two compare at
# equal trainable-update budgets. Only the SideNet is saved; the checkpoint
# records the backbone's absolute path. Resumable: rerunning continues from
# SAVE_DIR/checkpoint_last.pt.
#
#   scripts/finetune_longmem.sh DATA_BIN BACKBONE_CKPT SAVE_DIR [extra fairseq-train args]
#   env: MEMORY_SIZE (65536), MAX_UPDATE (400), KNN_K (32), CHUNK_SIZE (1; LongMem uses 4),
#        SIDE_LAYERS (0 = half the backbone's), LR (5e-5, decaying to 0)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
finetune --backbone-checkpoint --arch longmem_sidenet_lm --side-layers "${SIDE_LAYERS:-0}" \
    --memory-size "${MEMORY_SIZE:-65536}" --knn-k "${KNN_K:-32}" --memory-chunk-size "${CHUNK_SIZE:-1}" -- "$@"
