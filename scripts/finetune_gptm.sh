#!/usr/bin/env bash
# Fine-tune a vanilla transformer_lm checkpoint into gptm_lm, a differentiable memory
# matrix carried from segment to segment (docs/gptm.md), reading documents in order
# (--task document_lm). Same data, stream order, optimizer and update budget as
# finetune_memory.sh, so the memories compare at equal updates. Resumable: rerunning
# continues from SAVE_DIR/checkpoint_last.pt.
#
#   scripts/finetune_gptm.sh DATA_BIN VANILLA_CKPT SAVE_DIR [extra fairseq-train args]
#   env: GPTM_SLOTS (4096), SKETCH_SIZE (64), BPTT_SEGMENTS (1), MAX_UPDATE (400), LR (5e-5, decaying to 0), DROPOUT (0)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
finetune --finetune-from-model --arch gptm_lm "${SHAPE[@]}" \
    --gptm-slots "${GPTM_SLOTS:-4096}" --gptm-sketch-size "${SKETCH_SIZE:-64}" \
    --gptm-bptt-segments "${BPTT_SEGMENTS:-1}" -- "$@"
