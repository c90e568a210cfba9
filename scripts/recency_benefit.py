#!/usr/bin/env python
"""Train two vanilla models from the same initial weights on the same segments,
one in document order and one shuffled, and measure during training how much the
update on a stream's segment helps its next segment (the recency benefit,
``fairseq_memtrm/recency.py``). Issue #19's training-time half; see docs/baselines.md.

Everything after ``--`` is fairseq's model arguments (``--arch`` and its shape);
the data is read as ``--task document_lm`` reads it. Each order's result is saved
as ``OUT/recency-ORDER.json`` when it ends, and a rerun skips finished orders.

Example::

    python scripts/recency_benefit.py data-bin/books --out results/books/recency --updates 1500 \\
        -- --arch transformer_lm --decoder-layers 4 --decoder-embed-dim 256 --decoder-ffn-embed-dim 1024 \\
        --decoder-attention-heads 4 --share-decoder-input-output-embed
"""

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from fairseq_memtrm.console import configure_logging
from fairseq_memtrm.data.document_streams import DocumentStreamDataset
from fairseq_memtrm.errors import MemtrmUserError, run_script
from fairseq_memtrm.evaluation import PACKAGE
from fairseq_memtrm.recency import ORDERS, mean_loss, shuffled, train_and_measure, training_segments

logger = logging.getLogger("recency_benefit")


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    model_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", help="data-bin folder (scripts/prepare_data.py)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--orders", default=",".join(ORDERS), help=f"comma-separated, among {','.join(ORDERS)}")
    parser.add_argument("--updates", type=int, default=1500, help="updates per order (one batch each)")
    parser.add_argument("--measure-every", type=int, default=5, help="measure the recency benefit every N updates")
    parser.add_argument("--batch-size", type=int, default=4, help="streams (rows) per batch")
    parser.add_argument("--tokens-per-sample", type=int, default=256, help="segment length")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (Adam, betas 0.9/0.98)")
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up updates, then inverse square root")
    parser.add_argument("--seed", type=int, default=1, help="initial weights, stream layout, shuffling, U segments")
    parser.add_argument("--valid-batches", type=int, default=50, help="valid batches scored after training")
    parser.add_argument("--smooth", type=int, default=20, help="moving-average window (measures) of the plot")
    args = parser.parse_args(argv)
    args.model_args = model_args or ["--arch", "transformer_lm"]
    args.orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    if not args.orders or any(o not in ORDERS for o in args.orders):
        parser.error(f"--orders takes {','.join(ORDERS)}, got {args.orders}")
    for flag in ("updates", "batch_size", "tokens_per_sample", "warmup"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def build(args):
    """(model, task) from the same seed, as fairseq-train --task document_lm builds them."""
    argv = [args.data, "--user-dir", PACKAGE, "--task", "document_lm", "--tokens-per-sample",
            str(args.tokens_per_sample), "--batch-size", str(args.batch_size), "--cpu", "--dropout", "0",
            *args.model_args]
    try:
        parsed = options.parse_args_and_arch(options.get_training_parser(), argv)
    except SystemExit as error:
        raise MemtrmUserError(f"fairseq rejected the model arguments after '--' ({' '.join(args.model_args)}); "
                              "pass an --arch and its flags as fairseq-train takes them") from error
    cfg = convert_namespace_to_omegaconf(parsed)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(args.seed)
    model = task.build_model(cfg.model)
    return model, task


def streams_of(task, split, args, shuffle):
    task.load_dataset(split)
    dictionary = task.source_dictionary
    return DocumentStreamDataset(task.dataset(split), args.tokens_per_sample, args.batch_size, dictionary.pad(),
                                 dictionary.eos(), shuffle=shuffle, seed=args.seed)


def run_order(order, args):
    model, task = build(args)
    streams = streams_of(task, "train", args, shuffle=True)
    try:
        batches = training_segments(streams, args.updates)
    except ValueError as error:
        raise MemtrmUserError(f"{error}: lower --updates or --batch-size") from error
    if order == "shuffled":
        batches = shuffled(batches, args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98))

    def lr_at(update):
        step = update + 1
        return args.lr * (step / args.warmup if step <= args.warmup else (args.warmup / step) ** 0.5)

    logger.info("%s order: %d updates of %d x %d tokens", order, args.updates, args.batch_size,
                args.tokens_per_sample)
    result = train_and_measure(model, streams, batches, optimizer, lr_at, args.measure_every, seed=args.seed)
    valid = streams_of(task, "valid", args, shuffle=False)
    result["valid_loss"] = mean_loss(model, valid, args.valid_batches)
    result["train_tokens"] = int(sum(streams.segment_tokens(*row)[1].numel()
                                     for batch in batches for row in batch if row))
    logger.info("%s order: valid loss %.4f (ppl %.2f)", order, result["valid_loss"], np.exp(result["valid_loss"]))
    return result


def summary(result):
    benefits = np.array([b for b in result["benefit"] if b is not None])
    half = benefits[len(benefits) // 2 :]
    return {"mean_benefit": float(benefits.mean()) if benefits.size else None,
            "mean_benefit_second_half": float(half.mean()) if half.size else None,
            "sem_second_half": float(half.std(ddof=1) / np.sqrt(half.size)) if half.size > 1 else None,
            "valid_ppl": float(np.exp(result["valid_loss"])), "final_train_loss": float(np.mean(result["train_loss"][-50:]))}


def write_report(out: Path, args, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = {"settings": {k: v for k, v in vars(args).items() if k != "orders"}, "orders": args.orders,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "summary": {order: summary(r) for order, r in results.items()}}
    (out / "recency.json").write_text(json.dumps(report, indent=2))
    lines = ["| order | recency benefit (nats/token, mean) | second half (± s.e.) | valid ppl |", "|---|---:|---:|---:|"]
    for order, s in report["summary"].items():
        sem = f" ± {s['sem_second_half']:.4f}" if s["sem_second_half"] is not None else ""
        lines.append(f"| {order} | {s['mean_benefit']:+.4f} | {s['mean_benefit_second_half']:+.4f}{sem} | "
                     f"{s['valid_ppl']:.2f} |")
    (out / "recency.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    for order, r in results.items():
        updates = np.array([m["update"] for m in r["measures"]])
        benefit = np.array([b if b is not None else np.nan for b in r["benefit"]])
        keep = ~np.isnan(benefit)
        window = max(1, min(args.smooth, int(keep.sum())))
        smooth = np.convolve(benefit[keep], np.ones(window) / window, mode="valid")
        ax.plot(updates[keep][window - 1 :], smooth, label=f"{order} (valid ppl {np.exp(r['valid_loss']):.1f})")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("update")
    ax.set_ylabel("recency benefit (nats/token)")
    ax.set_title(f"update on A1: loss drop on A2 minus on an unrelated segment ({args.smooth}-measure average)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "recency.png", dpi=120)
    plt.close(fig)
    return report


def main(argv=None):
    args = parse_args(argv)
    configure_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    settings = {k: v for k, v in vars(args).items() if k not in ("orders", "out", "smooth", "valid_batches")}
    for order in args.orders:
        path = out / f"recency-{order}.json"
        if path.is_file() and json.loads(path.read_text()).get("settings") == settings:
            logger.info("%s order: done before with these settings (%s)", order, path)
            results[order] = json.loads(path.read_text())
            continue
        results[order] = {**run_order(order, args), "settings": settings}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results[order]))
        os.replace(tmp, path)
    report = write_report(out, args, results)
    print((out / "recency.md").read_text())
    return report


if __name__ == "__main__":
    run_script(main, "recency_benefit.py")
