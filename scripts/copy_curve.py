#!/usr/bin/env python
"""When did a model learn to copy? The copy score of every saved checkpoint of a run.

Takes one or more checkpoint folders in training order (e.g. the two phases of
``scripts/train_vanilla.sh``: ``SAVE_DIR/copy-phase`` then ``SAVE_DIR``), scores each
``checkpoint_*_N.pt`` (and ``checkpoint_last.pt`` when it is newer) with the copy
score of ``fairseq_memtrm.diagnostics`` on passages of the valid split, and writes

* ``OUT.json``: one row per checkpoint: folder, updates, training tokens seen, the
  copy score, and Olsson's in-context score where the model's context allows it;
* ``OUT.png``: second-copy / first-copy loss against training tokens (log x), so the
  moment copying appears is visible.

Tokens seen count every update of every earlier folder:
``updates x batch size x tokens per sample x update freq x world size`` from each
checkpoint's own config. Scores are cached in ``OUT.json``: rerunning scores only the
new checkpoints (and those written since they were scored).

    python scripts/copy_curve.py DATA_BIN RUN/copy-phase RUN --out results/books/copy_curve
"""

import argparse
import glob
import json
import logging
import os
import re

import torch

from fairseq_memtrm.diagnostics import copy_score, in_context_score, load_passages
from fairseq_memtrm.errors import MemtrmUserError

logger = logging.getLogger("copy_curve")


def checkpoints_in_order(folder: str):
    """[(updates, path)] of a folder's interval checkpoints, and its last one if newer."""
    found = {}
    for path in glob.glob(os.path.join(folder, "checkpoint_*_*.pt")):
        match = re.search(r"checkpoint_\d+_(\d+)\.pt$", path)
        if match:
            found[int(match.group(1))] = path
    last = os.path.join(folder, "checkpoint_last.pt")
    if os.path.isfile(last):
        state = torch.load(last, map_location="cpu", weights_only=False)
        updates = state["optimizer_history"][-1]["num_updates"]
        found.setdefault(updates, last)
    return sorted(found.items())


def tokens_per_update(cfg) -> int:
    return (cfg.dataset.batch_size * cfg.task.tokens_per_sample * cfg.optimization.update_freq[0]
            * cfg.distributed_training.distributed_world_size)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_bin", help="data-bin with dict.txt and the split")
    parser.add_argument("folders", nargs="+", help="checkpoint folders, in training order")
    parser.add_argument("--out", required=True, help="output path without extension (.json, .png)")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--span", type=int, default=60, help="passage length: 2 x span must fit every checkpoint")
    parser.add_argument("--count", type=int, default=32, help="passages")
    parser.add_argument("--in-context-segments", type=int, default=1000,
                        help="segments of 512 tokens for Olsson's score (checkpoints with a context of 512+); "
                        "it compares two single positions, so it needs many: 128 left +-0.2 nats of noise")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s | %(message)s", level=logging.INFO, force=True)
    for folder in args.folders:
        if not os.path.isdir(folder):
            raise MemtrmUserError(f"copy_curve: no checkpoint folder {folder}")

    from fairseq import checkpoint_utils  # the plugin's tasks are registered by the import above

    cache = {}
    if os.path.isfile(args.out + ".json"):
        with open(args.out + ".json") as handle:
            cache = {(row["folder"], row["updates"]): row for row in json.load(handle)["checkpoints"]}
    rows, tokens_before, passages, segments = [], 0, None, None
    for folder in args.folders:
        name = os.path.basename(os.path.normpath(folder))
        checkpoints = checkpoints_in_order(folder)
        per_update = 0
        for updates, path in checkpoints:
            row = cache.get((name, updates))
            stamp = int(os.path.getmtime(path))
            if (row is None or row.get("span") != args.span or row.get("passages") != args.count
                    or row.get("mtime", stamp) != stamp):  # a folder trained anew: score it anew
                models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
                    [path], arg_overrides={"data": args.data_bin})
                model = models[0].eval()
                if passages is None:
                    passages = load_passages(args.data_bin, args.split, task.source_dictionary, args.count, args.span)
                per_update = tokens_per_update(cfg)
                row = {"folder": name, "updates": updates, "mtime": stamp, "span": args.span, "passages": args.count,
                       "tokens_per_update": per_update,
                       **{k: round(v, 4) for k, v in copy_score(model, passages).items()}}
                if model.max_positions() >= 512:
                    if segments is None:
                        segments = load_passages(args.data_bin, args.split, task.source_dictionary,
                                                 args.in_context_segments, 512)
                    parts = [(len(chunk), in_context_score(model, chunk)) for chunk in segments.split(100)]
                    row.update({k: round(sum(n * part[k] for n, part in parts) / len(segments), 4)
                                for k in parts[0][1]})
                    row["in_context_segments"] = len(segments)
            per_update = row["tokens_per_update"]
            row["tokens"] = tokens_before + updates * per_update
            row["copy_ratio"] = round(row["second_copy_loss"] / row["first_copy_loss"], 4)
            logger.info("%s @ %d updates (%.2fM tokens): copy ratio %.3f%s", name, updates, row["tokens"] / 1e6,
                        row["copy_ratio"], f", in-context {row['in_context_score']:.3f}" if "in_context_score" in row
                        else "")
            rows.append(row)
        if checkpoints:
            tokens_before += checkpoints[-1][0] * per_update
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".json.tmp"
    with open(tmp, "w") as handle:
        json.dump({"data_bin": args.data_bin, "split": args.split, "passages": args.count, "checkpoints": rows},
                  handle, indent=1)
    os.replace(tmp, args.out + ".json")
    plot(rows, args.out + ".png", args.span)


def plot(rows, path, span):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for folder in dict.fromkeys(row["folder"] for row in rows):
        mine = [row for row in rows if row["folder"] == folder]
        ax.plot([r["tokens"] / 1e6 for r in mine], [r["copy_ratio"] for r in mine], "o-", label=folder)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(0.4, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel(f"second / first copy loss ({span}-token passages)")
    ax.set_ylim(0, 1.1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
