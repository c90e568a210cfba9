#!/usr/bin/env python
"""Test-time baselines on held-out documents: dynamic evaluation, the neural cache and
kNN-LM beside the plain model, on the same document streams as ``eval_memory_sweep.py``.

Loads any checkpoint of the plugin or a plain fairseq ``transformer_lm`` the way
``fairseq-eval-lm --task document_lm`` does (``fairseq_memtrm.evaluation.load``), reads
the split's streams segment after segment, and scores every token once per
method (``fairseq_memtrm.testtime``):

* ``vanilla``: the checkpoint as it is (a memorizing checkpoint keeps its memory);
* ``dyneval``: dynamic evaluation (Krause et al. 2018/2019), per stream, weights
  restored to the checkpoint's at every document start;
* ``cache``: the neural cache (Grave et al. 2017) over a per-stream kNN memory,
  one run per ``--cache-lambda``;
* ``knnlm``: kNN-LM (Khandelwal et al. 2020) over a datastore of the train split
  (``scripts/build_datastore.py``), one run per ``--knnlm-lambda``.

Writes ``OUT/testtime.json`` and ``OUT/testtime.md`` (perplexity, perplexity past
``--far-position``, tokens/s, extra memory MB) and ``OUT/testtime.png``. Tune
``--dyneval-lr``/``--dyneval-decay`` and ``--cache-lambda``/``--cache-theta`` on
``--subset valid`` only. See docs/baselines.md.

Example::

    python scripts/eval_testtime.py data-bin/books --checkpoint checkpoints/books/vanilla/checkpoint_last.pt \\
        --methods vanilla,dyneval,cache --subset valid --max-batches 20 --out results/books/testtime
"""

import argparse
import ast
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fairseq import utils  # noqa: E402

from fairseq_memtrm.errors import MemtrmUserError  # noqa: E402
from fairseq_memtrm.evaluation import gate_values, load, save_perplexity_plot, summarise  # noqa: E402
from fairseq_memtrm.testtime import DynamicEvaluator, NeuralCache, StaticScorer, gradient_rms, score_streams  # noqa: E402
from fairseq_memtrm.testtime.knn_lm import KNNLM  # noqa: E402

logger = logging.getLogger("eval_testtime")

METHODS = ("vanilla", "dyneval", "cache", "knnlm")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", help="data-bin folder (scripts/prepare_data.py) holding the checkpoint's dict.txt")
    parser.add_argument("--checkpoint", required=True,
                        help="a transformer_lm or memorizing_transformer_lm / longmem checkpoint")
    parser.add_argument("--model-overrides", default="{}",
                        help="a Python dict of model settings to override, as fairseq-eval-lm's, "
                        "e.g. \"{'memory_size': 8192}\"")
    parser.add_argument("--methods", default="vanilla,dyneval,cache",
                        help=f"comma-separated methods to run, among {','.join(METHODS)}")
    parser.add_argument("--subset", default="test", help="split to score (tune hyperparameters on valid)")
    parser.add_argument("--tokens-per-sample", type=int, default=512, help="segment length")
    parser.add_argument("--batch-size", type=int, default=4, help="streams evaluated side by side")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="score only the first N segments of every stream (None: the whole split)")
    parser.add_argument("--far-position", type=int, default=8192,
                        help="also report perplexity on tokens at least this far into their document")
    group = parser.add_argument_group("dynamic evaluation")
    group.add_argument("--dyneval-optimizer", choices=["rms", "sgd"], default="rms",
                       help="rms: Krause et al.'s RMS-normalised step with decay toward the checkpoint's weights "
                       "scaled per weight; sgd: plain SGD plus a uniform decay")
    group.add_argument("--dyneval-lr", type=float, default=5e-5, help="learning rate (tune on valid)")
    group.add_argument("--dyneval-decay", type=float, default=0.002,
                       help="decay rate toward the checkpoint's weights per step, in [0, 1] (tune on valid)")
    group.add_argument("--dyneval-eps", type=float, default=2e-5, help="rms: added to the gradient RMS")
    group.add_argument("--dyneval-stats-batches", type=int, default=20,
                       help="rms: training batches (of --batch-size segments) the gradient RMS is estimated on")
    group.add_argument("--dyneval-stats-subset", default="train", help="rms: the split those batches come from")
    group = parser.add_argument_group("neural cache")
    group.add_argument("--cache-lambda", default="0.1",
                       help="interpolation weight(s) of the cache in [0, 1), comma-separated: one run each, "
                       "at the cost of one")
    group.add_argument("--cache-theta", type=float, default=0.05,
                       help="inverse temperature of exp(theta * h_t . h_i) (tune on valid)")
    group.add_argument("--cache-size", type=int, default=65536,
                       help="entries per stream (a ring buffer: the oldest are evicted)")
    group.add_argument("--cache-k", type=int, default=1024,
                       help="entries of earlier segments summed over per token (the top-k by h_t . h_i); "
                       "the current segment's earlier positions are always all summed")
    group.add_argument("--cache-backend", default="exact",
                       help="search backend of the cache's kNN memory (exact, faiss-flat, faiss-ivf, ...)")
    group.add_argument("--cache-dtype", choices=["fp32", "fp16"], default="fp32", help="storage of cached states")
    group = parser.add_argument_group("kNN-LM")
    group.add_argument("--datastore", help="datastore folder from scripts/build_datastore.py (same checkpoint)")
    group.add_argument("--knnlm-lambda", default="0.25",
                       help="interpolation weight(s) of p_knn in [0, 1), comma-separated: one run each")
    group.add_argument("--knnlm-k", type=int, default=1024, help="neighbours per token")
    group.add_argument("--knnlm-temperature", type=float, default=1.0,
                       help="p_knn is a softmax of -distance / temperature (squared L2)")
    group.add_argument("--knnlm-nprobe", type=int, default=32, help="IVF lists searched (ivfpq stores)")
    parser.add_argument("--title", default="test-time methods", help="title of the report and plot")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    parser.add_argument("--log-format", default=None, choices=["tqdm", "simple", "none", "json"])
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown or args.methods}; choose among {','.join(METHODS)}")
    for flag in ("cache_lambda", "knnlm_lambda"):
        try:
            setattr(args, flag, [float(x) for x in getattr(args, flag).split(",") if x.strip()])
        except ValueError:
            parser.error(f"--{flag.replace('_', '-')} expects comma-separated numbers, got {getattr(args, flag)!r}")
    if "knnlm" in args.methods and not args.datastore:
        parser.error("--methods knnlm needs --datastore DIR (build it with scripts/build_datastore.py)")
    try:
        args.model_overrides = ast.literal_eval(args.model_overrides)
        assert isinstance(args.model_overrides, dict)
    except (ValueError, SyntaxError, AssertionError):
        parser.error(f"--model-overrides expects a Python dict, e.g. \"{{'memory_size': 8192}}\", "
                     f"got {args.model_overrides!r}")
    for flag in ("tokens_per_sample", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_batches is not None and args.max_batches < 1:
        parser.error("--max-batches must be at least 1")
    return args


def dyneval_scorer(model, task, args):
    stats_seconds, rms = 0.0, None
    if args.dyneval_optimizer == "rms":
        start = time.perf_counter()
        task.load_dataset(args.dyneval_stats_subset)
        batches = task.get_batch_iterator(task.dataset(args.dyneval_stats_subset),
                                          max_sentences=args.batch_size).next_epoch_itr(shuffle=False)
        rms = gradient_rms(model, batches, args.dyneval_stats_batches)
        model.zero_grad(set_to_none=True)
        if hasattr(model, "memory_bank") and model.memory_bank is not None:
            model.memory_bank.clear()  # the statistics' memory is no evaluation stream's
        stats_seconds = time.perf_counter() - start
    scorer = DynamicEvaluator(model, lr=args.dyneval_lr, decay=args.dyneval_decay, optimizer=args.dyneval_optimizer,
                              rms=rms, eps=args.dyneval_eps)
    settings = {"optimizer": args.dyneval_optimizer, "lr": args.dyneval_lr, "decay": args.dyneval_decay}
    if rms is not None:
        settings.update(eps=args.dyneval_eps, stats_batches=args.dyneval_stats_batches,
                        stats_subset=args.dyneval_stats_subset, stats_seconds=round(stats_seconds, 1))
    return scorer, settings, scorer.extra_bytes(args.batch_size)


def cache_scorer(model, task, args):
    scorer = NeuralCache(model, args.batch_size, args.cache_lambda, args.cache_theta, args.cache_size, args.cache_k,
                         args.tokens_per_sample, backend=args.cache_backend, dtype=args.cache_dtype)
    settings = {"theta": args.cache_theta, "size": args.cache_size, "k": args.cache_k,
                "backend": args.cache_backend, "dtype": args.cache_dtype}
    return scorer, settings, None  # bytes: known once the first batch gives the hidden width


def run_method(method, args):
    model, task = load(args.checkpoint, args.data, args.subset, args.tokens_per_sample, args.batch_size,
                       args.model_overrides, args.cpu)
    max_positions = utils.resolve_max_positions(task.max_positions(), model.max_positions())
    if method == "vanilla":
        scorer, settings, extra = StaticScorer(model), {}, 0
    elif method == "dyneval":
        scorer, settings, extra = dyneval_scorer(model, task, args)
    elif method == "cache":
        scorer, settings, extra = cache_scorer(model, task, args)
    else:
        scorer = KNNLM(model, task.target_dictionary, Path(args.datastore), args.knnlm_lambda, args.knnlm_k,
                       args.knnlm_temperature, args.knnlm_nprobe, eval_subset=args.subset, checkpoint=args.checkpoint)
        settings = {"datastore": args.datastore, "entries": scorer.meta["entries"], "index": scorer.meta["index"],
                    "k": args.knnlm_k, "temperature": args.knnlm_temperature}
        extra = scorer.extra_bytes()
    logger.info("scoring %s with %s %s", args.subset, method, settings or "")
    start = time.perf_counter()
    scored = score_streams(scorer, task, args.subset, args.batch_size, args.tokens_per_sample, max_positions,
                           args.max_batches, args.log_format)
    wall = time.perf_counter() - start
    if extra is None:
        extra = scorer.extra_bytes()
    rows = []
    for name, tokens in scored.items():
        memory_size = getattr(getattr(model, "memory_bank", None), "memory_size", 0)
        row = summarise(name, args.checkpoint, memory_size, tokens, wall, args.far_position, gate_values(model))
        if math.isinf(row["ppl"]):  # exp(mean loss) beyond a float, e.g. --dyneval-lr too high
            logger.warning("%s diverged: its perplexity is reported as inf", name)
        row.update(method=method, settings=settings, extra_memory_mb=round(extra / 2**20, 1))
        row["model_memory_size"] = row.pop("memory_size")
        if method in ("cache", "knnlm"):
            row["settings"] = {**settings, "lambda": float(name.split("lambda=")[1])}
        logger.info("%s: ppl %.3f (past %d: %s) over %d tokens, %.0f tokens/s, extra memory %.1f MB", name,
                    row["ppl"], args.far_position, row["ppl_past_far_position"], row["tokens"],
                    row["tokens_per_second"], row["extra_memory_mb"])
        rows.append(row)
    return rows


def write_outputs(out: Path, report):
    out.mkdir(parents=True, exist_ok=True)
    (out / "testtime.json").write_text(json.dumps(report, indent=2))
    far = report["far_position"]
    lines = [f"# {report['title']}", "",
             f"`{report['checkpoint']}` on `{report['data']}` {report['subset']}: {report['batch_size']} streams of "
             f"{report['tokens_per_sample']}-token segments"
             + (f", the first {report['max_batches']} segments of each" if report["max_batches"] else "") + ".", "",
             f"| run | ppl | ppl past {far} | tokens | tok/s | extra memory (MB) | settings |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in report["runs"]:
        past = f"{row['ppl_past_far_position']:.2f}" if row["ppl_past_far_position"] else "-"
        settings = ", ".join(f"{k} {v}" for k, v in row["settings"].items()) or "-"
        lines.append(f"| {row['name']} | {row['ppl']:.2f} | {past} | {row['tokens']} | "
                     f"{row['tokens_per_second']:.0f} | {row['extra_memory_mb']:.1f} | {settings} |")
    lines += ["", f"Machine: {report['machine']}"]
    (out / "testtime.md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(runs)), 4))
    x = np.arange(len(runs))
    ax.bar(x - 0.2, [r["ppl"] for r in runs], 0.4, label="all tokens")
    ax.bar(x + 0.2, [r["ppl_past_far_position"] or 0 for r in runs], 0.4, label=f"past token {far}")
    ax.set_xticks(x)
    ax.set_xticklabels([r["name"] for r in runs], rotation=20, fontsize=8)
    save_perplexity_plot(fig, ax, report, out / "testtime.png")


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    runs = []
    for method in args.methods:
        logger.info("evaluating %s with %s", args.checkpoint, method)
        runs += run_method(method, args)
    report = {
        "title": args.title,
        "checkpoint": args.checkpoint,
        "model_overrides": args.model_overrides,
        "data": args.data,
        "subset": args.subset,
        "tokens_per_sample": args.tokens_per_sample,
        "batch_size": args.batch_size,
        "max_batches": args.max_batches,
        "far_position": args.far_position,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                   f"{torch.__version__}, {'cuda' if torch.cuda.is_available() and not args.cpu else 'cpu'}",
        "runs": runs,
    }
    write_outputs(Path(args.out), report)
    print((Path(args.out) / "testtime.md").read_text())


if __name__ == "__main__":
    try:
        main()
    except MemtrmUserError as error:  # one sentence, exit 2 (a bad input)
        print(f"eval_testtime.py: error: {error.message}", file=sys.stderr)
        sys.exit(2)
