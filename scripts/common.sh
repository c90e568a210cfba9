# Shared settings of the fine-tuning experiment (sourced by the scripts/*.sh).
# The vanilla model and the memorizing model must have the same shape, so that
# --finetune-from-model loads every weight: 6 layers x 256 dims, 4 heads of 64.
BIN=${BIN:-.venv/bin}
SHAPE=(--decoder-layers 6 --decoder-embed-dim 256 --decoder-input-dim 256 --decoder-output-dim 256
       --decoder-ffn-embed-dim 1024 --decoder-attention-heads 4 --share-decoder-input-output-embed)
# Dropout of every phase, the fine-tunes' included: 0, since the books runs read each token
# about once, and a fine-tune keeps the dropout its vanilla was trained with.
DROPOUT=${DROPOUT:-0.0}
TOKENS_PER_SAMPLE=${TOKENS_PER_SAMPLE:-512}
BATCH_SIZE=${BATCH_SIZE:-4}
SEED=${SEED:-1}
# fairseq's default loader (--data-buffer-size 10) fills its queue from a daemon thread, which
# may still be inside a torch op when the interpreter exits after training: std::terminate,
# "terminate called without an active exception", exit 134 (pytorch issue 38228). Every run
# here reads its batches on the main thread instead; a 4 x 512 batch costs microseconds.
LOADER_OPTIONS=(--data-buffer-size 0)
CPU_FLAG=()
if ! "$BIN/python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    CPU_FLAG=(--cpu)
fi

# The fine-tuning budget shared by every fine-tuning script, so that the memory
# models and the control compare at equal updates by construction: segments,
# optimizer, schedule, checkpoints and logging. Fills the array FINETUNE_OPTIONS
# and sets FINETUNE_MAX_UPDATE (its --max-update).
# A fresh Adam starts with steps of ~lr on every weight at once, hence the warm-up;
# the rate then decays linearly to 0. The streams read whole documents (4 books at
# a time on books), so a high constant rate adapts the model to those few books:
# docs/results.md measures both.
#   finetune_options SAVE_DIR      env: LR (5e-5), WARMUP (100), MAX_UPDATE (400)
finetune_options() {
    FINETUNE_MAX_UPDATE=${MAX_UPDATE:-400}
    FINETUNE_OPTIONS=(--tokens-per-sample "$TOKENS_PER_SAMPLE" --batch-size "$BATCH_SIZE"
        --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 1.0 --lr "${LR:-5e-5}"
        --lr-scheduler polynomial_decay --total-num-update "$FINETUNE_MAX_UPDATE" --end-learning-rate 0
        --warmup-updates "${WARMUP:-100}" --max-update "$FINETUNE_MAX_UPDATE"
        --seed "$SEED" --save-dir "$1" --no-epoch-checkpoints --save-interval-updates 100
        --keep-interval-updates 1 --disable-validation --log-format simple --log-interval 25
        "${LOADER_OPTIONS[@]}" "${CPU_FLAG[@]}")
}

# One training run per save dir: two runs writing into one folder would both exit 0 and
# leave it mixing their checkpoints. Holds an flock on SAVE_DIR/.lock for the life of the
# script (the fd is inherited by fairseq-train, also through exec) and writes the holder
# into SAVE_DIR/.lock.pid; a second run exits 2 naming it.
#   lock_save_dir SAVE_DIR
lock_save_dir() {
    mkdir -p "$1"
    command -v flock >/dev/null || { echo "$(basename "$0"): warning: no flock here, $1 is not locked" >&2; return 0; }
    exec {SAVE_LOCK_FD}>>"$1/.lock"
    if ! flock -n "$SAVE_LOCK_FD"; then
        echo "$(basename "$0"): another run is training into $1 ($(cat "$1/.lock.pid" 2>/dev/null || echo "pid unknown"));" \
             "wait for it or choose another save dir" >&2
        exit 2
    fi
    echo "pid $$, $(basename "$0"), started $(date '+%Y-%m-%d %H:%M:%S')" > "$1/.lock.pid"
}

# A run killed while fairseq copied checkpoint_E_N.pt to checkpoint_last.pt leaves the
# latter empty or truncated (the plugin makes that copy atomic; stock fairseq does not),
# and resuming from it fails. Says so in one sentence and resumes from the newest whole
# checkpoint_E_N.pt, or moves the broken file aside to start over (fairseq_memtrm/checkpoint_files.py).
#   recover_last_checkpoint SAVE_DIR
recover_last_checkpoint() {
    [ -f "$1/checkpoint_last.pt" ] || return 0
    checkpoint_files recover "$1"
}

# Exit 2 with one sentence when CHECKPOINT is not a readable fairseq checkpoint (empty,
# truncated, not a torch file, no 'model' entry), before fairseq prints torch's traceback.
#   require_checkpoint FLAG CHECKPOINT
require_checkpoint() {
    checkpoint_files check "$(basename "$0")" "$1" "$2"
}
# fairseq_memtrm/checkpoint_files.py's main, without the import noise of fairseq's extras
checkpoint_files() {
    "$BIN/python" -c 'import sys; from fairseq_memtrm.checkpoint_files import main; sys.exit(main())' "$@" \
        2> >(grep -v -e tensorboardX -e faiss >&2)
}

# Whether SAVE_DIR/checkpoint_last.pt already holds MAX updates (exit status 0: done).
# Repairs a broken checkpoint_last.pt first (recover_last_checkpoint).
#   is_trained SAVE_DIR MAX_UPDATE
is_trained() {
    local checkpoint=$1/checkpoint_last.pt
    recover_last_checkpoint "$1"
    [ -f "$checkpoint" ] || return 1
    "$BIN/python" - "$checkpoint" "$2" <<'PY'
import sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
done = state["optimizer_history"][-1]["num_updates"]
sys.exit(0 if done >= int(sys.argv[2]) else 1)
PY
}

# Exit 0 (done) when SAVE_DIR/checkpoint_last.pt already holds MAX updates. fairseq-train
# resumed at its --max-update still runs one more update before it stops, so without this
# check every rerun of a finished step would move its checkpoint by one update.
#   stop_if_trained SAVE_DIR MAX_UPDATE
stop_if_trained() {
    if is_trained "$1" "$2"; then
        echo "$1/checkpoint_last.pt already has ${2}+ updates: nothing to train (raise MAX_UPDATE to continue)"
        exit 0
    fi
}

# A checkpoint folder keeps the vocabulary it was trained with: dict.txt and spm.model
# are copied from DATA_BIN at its first run (so that the folder is self-contained for
# the demo and eval), and must equal DATA_BIN's whenever it is resumed or fine-tuned
# from. A data-bin rebuilt with a new SentencePiece model has other token ids under
# the same vocabulary size: training on would be silent garbage.
#   same_vocabulary CHECKPOINT_DIR DATA_BIN           (exit 2 on a mismatch)
#   keep_vocabulary SAVE_DIR DATA_BIN                 (check, then copy)
same_vocabulary() {
    local name
    for name in dict.txt spm.model; do
        if [ -f "$1/$name" ] && [ -f "$2/$name" ] && ! cmp -s "$1/$name" "$2/$name"; then
            echo "$(basename "$0"): the checkpoint folder $1 was trained with another $name than $2/$name (the data-bin" \
                 "was rebuilt with a new vocabulary); use the data-bin it was trained on, or rebuild" \
                 "$2 with prepare_data.py --spm-model $1/spm.model --dict $1/dict.txt" >&2
            exit 2
        fi
    done
}
keep_vocabulary() {
    same_vocabulary "$1" "$2"
    mkdir -p "$1"
    local name
    for name in dict.txt spm.model; do
        if [ -f "$2/$name" ] && [ ! -f "$1/$name" ]; then cp "$2/$name" "$1/$name"; fi
    done
}

# The arguments of every fine-tuning script (finetune_memory.sh, finetune_longmem.sh,
# finetune_gptm.sh): DATA_BIN FROM_CKPT SAVE_DIR [extra fairseq-train args] -> DATA, FROM,
# SAVE and the array EXTRA_ARGS; exit 2 when FROM_CKPT is missing.
#   finetune_arguments "$@"
finetune_arguments() {
    local usage="usage: $(basename "$0") DATA_BIN FROM_CKPT SAVE_DIR [fairseq args]"
    DATA=${1:?$usage}
    FROM=${2:?$usage}
    SAVE=${3:?$usage}
    shift 3
    EXTRA_ARGS=("$@")
    [ -f "$FROM" ] || { echo "$(basename "$0"): no checkpoint $FROM; run scripts/train_vanilla.sh first" >&2; exit 2; }
}

# The start shared by the fine-tuning scripts: the vocabulary of the
# checkpoint fine-tuned from and of SAVE_DIR, the lock on SAVE_DIR, a readable FROM_CKPT,
# the options, and nothing to do when SAVE_DIR is already trained.
#   start_finetune DATA_BIN FROM_CKPT SAVE_DIR [FLAG: how fairseq-train is given FROM_CKPT, --finetune-from-model]
start_finetune() {
    same_vocabulary "$(dirname "$2")" "$1"
    same_vocabulary "$3" "$1"  # refused before the lock creates SAVE_DIR
    lock_save_dir "$3"
    require_checkpoint "${4:---finetune-from-model}" "$2"
    finetune_options "$3"
    keep_vocabulary "$3" "$1"
    stop_if_trained "$3" "$FINETUNE_MAX_UPDATE"
}

# A whole fine-tuning script: its arguments (finetune_arguments), the checks and
# options (start_finetune), then fairseq-train on --task document_lm with the
# model's own arguments, the checkpoint given by FROM_FLAG, the shared budget and
# the user's extra arguments (last, so they win). MEMORY_PARAM_GAIN, when set, is
# every memory model's --memory-param-gain (how much faster than the other weights
# Adam moves the memory gates).
#   finetune FROM_FLAG MODEL_ARGS... -- "$@"
finetune() {
    local from_flag=$1 model=()
    shift
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do model+=("$1"); shift; done
    shift
    finetune_arguments "$@"
    start_finetune "$DATA" "$FROM" "$SAVE" "$from_flag"
    exec "$BIN/fairseq-train" "$DATA" --user-dir fairseq_memtrm --task document_lm --dropout "$DROPOUT" \
        "${model[@]}" ${MEMORY_PARAM_GAIN:+--memory-param-gain "$MEMORY_PARAM_GAIN"} "$from_flag" "$FROM" \
        "${FINETUNE_OPTIONS[@]}" "${EXTRA_ARGS[@]}"
}

# The comparison scripts (run_experiment.sh, compare_longmem.sh) take the same arguments:
#   experiment_paths SCRIPT NAME TRAIN_DATA_BIN EVAL_DATA_BIN
# sets NAME, DATA, EVAL, CKPT=${CKPT:-checkpoints}/NAME and OUT=${RESULTS:-results}/NAME
# (both created).
experiment_paths() {
    local usage="usage: $1 NAME TRAIN_DATA_BIN EVAL_DATA_BIN"
    NAME=${2:?$usage}
    DATA=${3:?$usage}
    EVAL=${4:?$usage}
    CKPT=${CKPT:-checkpoints}/$NAME
    OUT=${RESULTS:-results}/$NAME
    mkdir -p "$CKPT" "$OUT"
}

# timed STEP command...: runs the command, then appends "STEP seconds" to OUT/timings.tsv.
timed() {
    local step=$1 start
    shift
    start=$(date +%s)
    "$@"
    printf '%s\t%s\n' "$step" "$(( $(date +%s) - start ))" >> "$OUT/timings.tsv"
}
