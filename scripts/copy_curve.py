#!/usr/bin/env python
"""When did a model learn to copy? The copy score of every saved checkpoint of a run.

Takes one or more checkpoint folders in training order (e.g. the two phases of
``scripts/train_vanilla.sh``: ``SAVE_DIR/copy-phase`` then ``SAVE_DIR``), scores each
``checkpoint_*_N.pt`` (and ``checkpoint_last.pt`` when it is newer) with the copy
score of ``fairseq_memtrm.diagnostics`` on passages of the valid split, and writes

* ``OUT.json``: one row per checkpoint: folder, updates, training tokens seen, the
  copy score (and on --long-span passages where the context holds two), and Olsson's
  in-context score where the model's context allows it;
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

from fairseq_memtrm.console import configure_logging
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
    parser.add_argument("--long-span", type=int, default=200,
                        help="also score passages of this length (copy_score.py's default) on the checkpoints whose "
                        "context holds two of them (0: no)")
    parser.add_argument("--in-context-last-only", action="store_true",
                        help="Olsson's score for the last checkpoint of the last folder only (it reads "
                        "--in-context-segments x 512 tokens per checkpoint)")
    args = parser.parse_args()
    configure_logging(fmt="%(asctime)s | %(message)s")
    for folder in args.folders:
        if not os.path.isdir(folder):
            raise MemtrmUserError(f"copy_curve: no checkpoint folder {folder}")

    from fairseq import checkpoint_utils  # the plugin's tasks are registered by the import above

    cache = {}
    if os.path.isfile(args.out + ".json"):
        with open(args.out + ".json") as handle:
            cache = {(row["folder"], row["updates"]): row for row in json.load(handle)["checkpoints"]}
    rows, tokens_before, passages, segments, long_passages = [], 0, None, None, None
    for number, folder in enumerate(args.folders):
        name = os.path.basename(os.path.normpath(folder))
        checkpoints = checkpoints_in_order(folder)
        final = checkpoints[-1][0] if checkpoints and number == len(args.folders) - 1 else None
        per_update = 0
        for updates, path in checkpoints:
            row = cache.get((name, updates))
            stamp = int(os.path.getmtime(path))
            want_in_context = not args.in_context_last_only or updates == final
            if (row is None or row.get("span") != args.span or row.get("passages") != args.count
                    or row.get("mtime", stamp) != stamp  # a folder trained anew: score it anew
                    or (want_in_context and row.get("max_positions", 0) >= 512 and "in_context_score" not in row)
                    or (0 < 2 * args.long_span <= row.get("max_positions", 0) and "long_span_copy_ratio" not in row)):
                models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
                    [path], arg_overrides={"data": args.data_bin})
                model = models[0].eval()
                if passages is None:
                    passages = load_passages(args.data_bin, args.split, task.source_dictionary, args.count, args.span)
                per_update = tokens_per_update(cfg)
                row = {"folder": name, "updates": updates, "mtime": stamp, "span": args.span, "passages": args.count,
                       "tokens_per_update": per_update, "max_positions": model.max_positions(),
                       **{k: round(v, 4) for k, v in copy_score(model, passages).items()}}
                if 0 < 2 * args.long_span <= model.max_positions():
                    if long_passages is None:
                        long_passages = load_passages(args.data_bin, args.split, task.source_dictionary, 16,
                                                      args.long_span)
                    long = copy_score(model, long_passages)
                    row.update(long_span=args.long_span, long_span_copy_ratio=round(
                        long["second_copy_loss"] / long["first_copy_loss"], 4))
                if model.max_positions() >= 512 and want_in_context:
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
            logger.info("%s @ %d updates (%.2fM tokens): copy ratio %.3f%s%s", name, updates, row["tokens"] / 1e6,
                        row["copy_ratio"], f" ({row['long_span']}-token passages: {row['long_span_copy_ratio']:.3f})"
                        if "long_span_copy_ratio" in row else "",
                        f", in-context {row['in_context_score']:.3f}" if "in_context_score" in row else "")
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
        line, = ax.plot([r["tokens"] / 1e6 for r in mine], [r["copy_ratio"] for r in mine], "o-", label=folder)
        long = [r for r in mine if "long_span_copy_ratio" in r]
        if long:
            ax.plot([r["tokens"] / 1e6 for r in long], [r["long_span_copy_ratio"] for r in long], "s--",
                    color=line.get_color(), mfc="none", label=f"{folder}, {long[0]['long_span']}-token passages")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(0.4, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel(f"second / first copy loss ({span}-token passages)")  # dashed: longer passages
    ax.set_ylim(0, 1.1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
