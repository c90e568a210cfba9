# Shared settings of the fine-tuning experiment (sourced by the scripts/*.sh).
# The vanilla model and the memorizing model must have the same shape, so that
# --finetune-from-model loads every weight: 6 layers x 256 dims, 4 heads of 64.
BIN=${BIN:-.venv/bin}
SHAPE=(--decoder-layers 6 --decoder-embed-dim 256 --decoder-input-dim 256 --decoder-output-dim 256
       --decoder-ffn-embed-dim 1024 --decoder-attention-heads 4 --share-decoder-input-output-embed)
TOKENS_PER_SAMPLE=${TOKENS_PER_SAMPLE:-512}
BATCH_SIZE=${BATCH_SIZE:-4}
SEED=${SEED:-1}
CPU_FLAG=()
if ! "$BIN/python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    CPU_FLAG=(--cpu)
fi
