#!/usr/bin/env bash
# LongMem vs Memorizing fine-tune vs vanilla, at equal trainable-update budgets,
# on one corpus. Every step is resumable/idempotent (fairseq resumes training;
# finished steps return at once):
#   1. vanilla transformer_lm (the backbone)        -> CKPT/NAME/vanilla
#   for each training memory size M in TRAIN_MEMORIES (8K and 65K):
#   2. memorizing fine-tune, MAX_UPDATE updates      -> CKPT/NAME/memory-M
#   3. LongMem SideNet, the same MAX_UPDATE updates  -> CKPT/NAME/longmem-M
#   4. eval at memory M: vanilla, memorizing, LongMem -> RESULTS/NAME/compare-M/memory_sweep.*
#   5. staleness at the end of fine-tuning, both     -> RESULTS/NAME/staleness-{memory,longmem}-M.json
#   6. one side-by-side table                         -> RESULTS/NAME/longmem_comparison.md
# Same data, stream order, batch, optimizer and update count for both memory
# models; LongMem trains fewer parameters (the SideNet only). Wall times are
# appended to RESULTS/NAME/timings.tsv.
#
#   scripts/compare_longmem.sh NAME TRAIN_DATA_BIN EVAL_DATA_BIN
#   env: TRAIN_MEMORIES ("8192 65536"), VANILLA_UPDATES (1500), FINETUNE_UPDATES (400),
#        CHUNK_SIZE (1; 4 is LongMem's), STALENESS (1; 0 skips step 5, which trains once more),
#        EVAL_BATCH_SIZE (4), CKPT (checkpoints), RESULTS (results), and those of train_vanilla.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
experiment_paths compare_longmem.sh "$@"
VANILLA=$CKPT/vanilla/checkpoint_last.pt

staleness() {  # staleness OUT.json fairseq-train args...: skipped when OUT.json exists
    local out=$1; shift
    # the fine-tunes' own options (measure_staleness.py replaces the save dir with a temporary one)
    MAX_UPDATE="${FINETUNE_UPDATES:-400}" finetune_options "$(dirname "$out")"
    [ -f "$out" ] || "$BIN/python" scripts/measure_staleness.py --out "$out" -- "$DATA" --user-dir fairseq_memtrm \
        --task document_lm "${FINETUNE_OPTIONS[@]}" "$@"
}

timed vanilla env MAX_UPDATE="${VANILLA_UPDATES:-1500}" scripts/train_vanilla.sh "$DATA" "$CKPT/vanilla"
for M in ${TRAIN_MEMORIES:-8192 65536}; do
    timed "memory-$M" env MAX_UPDATE="${FINETUNE_UPDATES:-400}" MEMORY_SIZE="$M" \
        scripts/finetune_memory.sh "$DATA" "$VANILLA" "$CKPT/memory-$M"
    timed "longmem-$M" env MAX_UPDATE="${FINETUNE_UPDATES:-400}" MEMORY_SIZE="$M" CHUNK_SIZE="${CHUNK_SIZE:-1}" \
        scripts/finetune_longmem.sh "$DATA" "$VANILLA" "$CKPT/longmem-$M"
    timed "eval-$M" "$BIN/python" scripts/eval_memory_sweep.py "$EVAL" \
        --memory-checkpoint "$CKPT/memory-$M/checkpoint_last.pt" \
        --longmem-checkpoint "$CKPT/longmem-$M/checkpoint_last.pt" \
        --vanilla-checkpoint "$VANILLA" --memory-sizes "$M" \
        --tokens-per-sample "$TOKENS_PER_SAMPLE" --batch-size "${EVAL_BATCH_SIZE:-4}" \
        --title "$NAME: memory $M" --out "$OUT/compare-$M" --log-format simple "${CPU_FLAG[@]}"
    if [ "${STALENESS:-1}" = 1 ]; then
        timed "staleness-memory-$M" staleness "$OUT/staleness-paper-memory-$M.json" \
            --arch memorizing_transformer_lm "${SHAPE[@]}" --dropout "$DROPOUT" --memory-size "$M" --knn-k "${KNN_K:-32}" \
            --finetune-from-model "$VANILLA"
        timed "staleness-longmem-$M" staleness "$OUT/staleness-longmem-$M.json" \
            --arch longmem_sidenet_lm --backbone-checkpoint "$VANILLA" --dropout "$DROPOUT" --memory-size "$M" \
            --knn-k "${KNN_K:-32}" --memory-chunk-size "${CHUNK_SIZE:-1}"
    fi
done

"$BIN/python" - "$OUT" ${TRAIN_MEMORIES:-8192 65536} <<'PY'
import json, sys
from pathlib import Path
out, sizes = Path(sys.argv[1]), sys.argv[2:]
lines = ["| memory | model | trained params | ppl | ppl far | gate (mean) | staleness: mean cosine (oldest bin) |",
         "|---:|---|---|---:|---:|---:|---|"]
for size in sizes:
    report = json.loads((out / f"compare-{size}" / "memory_sweep.json").read_text())
    for row in report["runs"]:
        name = {"paper-memory": "Memorizing fine-tune", "longmem": "LongMem SideNet", "vanilla": "vanilla"}[row["name"]]
        trained = {"paper-memory": "all", "longmem": "SideNet only", "vanilla": "-"}[row["name"]]
        gates = [g for layer in row["gates"].values() for g in layer]
        stale = out / f"staleness-{row['name']}-{size}.json"
        staleness = "-"
        if stale.is_file():
            s = json.loads(stale.read_text())
            staleness = f"{s['mean_cosine']:.4f} ({s['by_age'][-1]['mean_cosine']:.4f} at age {s['by_age'][-1]['age_updates']})"
        far = f"{row['ppl_past_far_position']:.2f}" if row["ppl_past_far_position"] else "-"
        gate = f"{sum(gates) / len(gates):.3f}" if gates else "-"
        lines.append(f"| {size} | {name} | {trained} | {row['ppl']:.2f} | {far} | {gate} | {staleness} |")
(out / "longmem_comparison.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
