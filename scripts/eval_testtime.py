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
  (``scripts/build_datastore.py``), one run per ``--knnlm-lambda``;
* ``cache+knnlm``: both, one run per pair of lambdas.

The settings ``--dyneval-lr``, ``--dyneval-decay``, ``--cache-theta``,
``--knnlm-temperature`` and the lambdas take comma-separated grids: one run per
point. With ``--tune-subset valid`` every point is scored on that split (its
first ``--tune-batches`` segments per stream), the best per method is kept, and
only it scores ``--subset``: hyperparameters never see the scored split.

Writes ``OUT/testtime.json`` and ``OUT/testtime.md`` (perplexity, perplexity past
``--far-position``, the planted-passage probe, tokens/s, extra memory MB, the
tuning grid) and ``OUT/testtime.png``. See docs/baselines.md.

Example::

    python scripts/eval_testtime.py data-bin/books --checkpoint checkpoints/books/vanilla/checkpoint_last.pt \\
        --methods vanilla,dyneval,cache --subset valid --max-batches 20 --out results/books/testtime
"""

import argparse
import ast
import itertools
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fairseq import utils

from fairseq_memtrm.console import configure_logging
from fairseq_memtrm.errors import run_script
from fairseq_memtrm.diagnostics import PROBE_KEYS
from fairseq_memtrm.evaluation import (
    add_probe_arguments, gate_values, load, load_task, planted_note, planted_probes, planted_settings,
    probe_passages,
    save_perplexity_plot, summarise,
)
from fairseq_memtrm.testtime import (CacheKNNLM, DynamicEvaluator, NeuralCache, StaticScorer, gradient_rms,
                                     planted_passage_losses, score_streams)
from fairseq_memtrm.testtime.knn_lm import KNNLM

logger = logging.getLogger("eval_testtime")

METHODS = ("vanilla", "dyneval", "cache", "knnlm", "cache+knnlm")
GRIDS = {  # method -> the flags (args attributes) whose values are a grid of runs; lambdas mix inside one run
    "vanilla": (),
    "dyneval": ("dyneval_lr", "dyneval_decay"),
    "cache": ("cache_theta", "cache_lambda"),
    "knnlm": ("knnlm_temperature", "knnlm_lambda"),
    "cache+knnlm": ("cache_theta", "knnlm_temperature", "cache_lambda", "knnlm_lambda"),
}
LAMBDAS = ("cache_lambda", "knnlm_lambda")


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
    group.add_argument("--dyneval-lr", default="5e-5", help="learning rate(s), comma-separated: a grid of runs")
    group.add_argument("--dyneval-decay", default="0.002",
                       help="decay rate(s) toward the checkpoint's weights per step, in [0, 1], comma-separated")
    group.add_argument("--dyneval-eps", type=float, default=2e-5, help="rms: added to the gradient RMS")
    group.add_argument("--dyneval-stats-batches", type=int, default=20,
                       help="rms: training batches (of --batch-size segments) the gradient RMS is estimated on")
    group.add_argument("--dyneval-stats-subset", default="train", help="rms: the split those batches come from")
    group = parser.add_argument_group("neural cache")
    group.add_argument("--cache-lambda", default="0.1",
                       help="interpolation weight(s) of the cache in [0, 1), comma-separated: one run each, "
                       "at the cost of one")
    group.add_argument("--cache-theta", default="0.05",
                       help="inverse temperature(s) of exp(theta * h_t . h_i), comma-separated: one pass each")
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
    group.add_argument("--knnlm-temperature", default="1",
                       help="p_knn is a softmax of -distance / temperature (squared L2); comma-separated: one pass each")
    group.add_argument("--knnlm-nprobe", type=int, default=32, help="IVF lists searched (ivfpq stores)")
    group = parser.add_argument_group("tuning")
    group.add_argument("--tune-subset", default=None,
                       help="score every grid point on this split (e.g. valid), keep the best per method, and run "
                       "only it on --subset (None: every grid point runs on --subset)")
    group.add_argument("--tune-batches", type=int, default=None,
                       help="tune on the first N segments of every stream of --tune-subset (None: all of it)")
    add_probe_arguments(parser)
    parser.add_argument("--title", default="test-time methods", help="title of the report and plot")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    parser.add_argument("--log-format", default=None, choices=["tqdm", "simple", "none", "json"])
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown or args.methods}; choose among {','.join(METHODS)}")
    for flag in ("cache_lambda", "knnlm_lambda", "dyneval_lr", "dyneval_decay", "cache_theta", "knnlm_temperature"):
        try:
            setattr(args, flag, [float(x) for x in getattr(args, flag).split(",") if x.strip()])
        except ValueError:
            parser.error(f"--{flag.replace('_', '-')} expects comma-separated numbers, got {getattr(args, flag)!r}")
        if not getattr(args, flag):
            parser.error(f"--{flag.replace('_', '-')} needs at least one value")
    if any("knnlm" in m for m in args.methods) and not args.datastore:
        parser.error("--methods knnlm and cache+knnlm need --datastore DIR (build it with scripts/build_datastore.py)")
    if args.tune_subset is not None and args.tune_subset == args.subset:
        parser.error(f"--tune-subset must be another split than --subset {args.subset}: hyperparameters are never "
                     "tuned on the split they are reported on")
    if args.tune_batches is not None and args.tune_batches < 1:
        parser.error("--tune-batches must be at least 1")
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


def grid_points(method, args):
    """Every point of ``method``'s grid: {flag: value}; the lambdas stay lists (one pass
    scores them all)."""
    flags = [f for f in GRIDS[method] if f not in LAMBDAS]
    lambdas = {f: getattr(args, f) for f in GRIDS[method] if f in LAMBDAS}
    return [{**dict(zip(flags, values)), **lambdas}
            for values in itertools.product(*(getattr(args, f) for f in flags))]


def point_label(method, point, args):
    """The settings that vary in ``method``'s grid, for run names (e.g. 'theta=0.1')."""
    varying = [f for f in GRIDS[method] if f not in LAMBDAS and len(getattr(args, f)) > 1]
    return " ".join(f"{f.split('_', 1)[1]}={point[f]:g}" for f in varying)


def dyneval_scorer(model, task, args, point):
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
    lr, decay = point["dyneval_lr"], point["dyneval_decay"]
    scorer = DynamicEvaluator(model, lr=lr, decay=decay, optimizer=args.dyneval_optimizer, rms=rms,
                              eps=args.dyneval_eps)
    settings = {"optimizer": args.dyneval_optimizer, "lr": lr, "decay": decay}
    if rms is not None:
        settings.update(eps=args.dyneval_eps, stats_batches=args.dyneval_stats_batches,
                        stats_subset=args.dyneval_stats_subset, stats_seconds=round(stats_seconds, 1))
    return scorer, settings, scorer.extra_bytes(args.batch_size)


def cache_scorer(model, args, point):
    scorer = NeuralCache(model, args.batch_size, point["cache_lambda"], point["cache_theta"], args.cache_size,
                         args.cache_k, args.tokens_per_sample, backend=args.cache_backend, dtype=args.cache_dtype)
    settings = {"theta": point["cache_theta"], "size": args.cache_size, "k": args.cache_k,
                "backend": args.cache_backend, "dtype": args.cache_dtype}
    return scorer, settings


def knnlm_scorer(model, task, args, point, subset):
    scorer = KNNLM(model, task.target_dictionary, Path(args.datastore), point["knnlm_lambda"], args.knnlm_k,
                   point["knnlm_temperature"], args.knnlm_nprobe, eval_subset=subset, checkpoint=args.checkpoint)
    settings = {"datastore": args.datastore, "entries": scorer.meta["entries"], "index": scorer.meta["index"],
                "k": args.knnlm_k, "temperature": point["knnlm_temperature"]}
    return scorer, settings


def build_scorer(method, model, task, args, point, subset):
    """(scorer, settings, extra bytes or None: known after the first batch)."""
    if method == "vanilla":
        return StaticScorer(model), {}, 0
    if method == "dyneval":
        return dyneval_scorer(model, task, args, point)
    if method == "cache":
        return (*cache_scorer(model, args, point), None)
    if method == "knnlm":
        scorer, settings = knnlm_scorer(model, task, args, point, subset)
        return scorer, settings, scorer.extra_bytes()
    cache, cache_settings = cache_scorer(model, args, point)
    knnlm, knnlm_settings = knnlm_scorer(model, task, args, point, subset)
    settings = {**{f"cache_{k}": v for k, v in cache_settings.items()},
                **{f"knnlm_{k}": v for k, v in knnlm_settings.items()}}
    return CacheKNNLM(cache, knnlm), settings, None


def run_lambdas(name):
    """The lambda(s) a mixture run's name ends with ('cache lambda=0.1' -> [0.1])."""
    return [float(x) for x in name.split("lambda=")[1].split(",")] if "lambda=" in name else []


def run_method(method, args, point, subset, max_batches, probes=None):
    """Score ``subset`` with one grid point of ``method``: one row per run (per lambda)."""
    model, task = load(args.checkpoint, args.data, subset, args.tokens_per_sample, args.batch_size,
                       args.model_overrides, args.cpu)
    max_positions = utils.resolve_max_positions(task.max_positions(), model.max_positions())
    scorer, settings, extra = build_scorer(method, model, task, args, point, subset)
    label = point_label(method, point, args)
    logger.info("scoring %s with %s %s", subset, method, settings or "")
    start = time.perf_counter()
    scored = score_streams(scorer, task, subset, args.batch_size, args.tokens_per_sample, max_positions,
                           max_batches, args.log_format)
    wall = time.perf_counter() - start
    if extra is None:
        extra = scorer.extra_bytes()
    planted = {kind: planted_passage_losses(scorer, documents, args.probe_at, args.probe_gap, args.probe_length,
                                            args.tokens_per_sample, args.batch_size, task.target_dictionary.pad())
               for kind, documents in (probes or {}).items()}
    rows = []
    for name, tokens in scored.items():
        memory_size = getattr(getattr(model, "memory_bank", None), "memory_size", 0)
        full_name = f"{name} {label}" if label else name
        row = summarise(full_name, args.checkpoint, memory_size, tokens, wall, args.far_position, gate_values(model))
        if math.isinf(row["ppl"]):  # exp(mean loss) beyond a float, e.g. --dyneval-lr too high
            logger.warning("%s diverged: its perplexity is reported as inf", full_name)
        row.update(method=method, settings=dict(settings), extra_memory_mb=round(extra / 2**20, 1), subset=subset)
        row["model_memory_size"] = row.pop("memory_size")
        lambdas = run_lambdas(name)
        if lambdas:
            row["settings"]["lambda"] = lambdas[0] if len(lambdas) == 1 else lambdas
        for kind, losses in planted.items():
            row[PROBE_KEYS[kind]] = {k: round(v, 4) for k, v in losses[name].items()}
        logger.info("%s: ppl %.3f (past %d: %s) over %d tokens, %.0f tokens/s, extra memory %.1f MB%s", full_name,
                    row["ppl"], args.far_position, row["ppl_past_far_position"], row["tokens"],
                    row["tokens_per_second"], row["extra_memory_mb"],
                    "".join(f", planted {kind} passage {row[PROBE_KEYS[kind]]}" for kind in planted))
        rows.append(row)
    return rows, point


def chosen_point(method, rows_with_points):
    """The grid point (lambdas narrowed to the best run's) of ``method``'s lowest-perplexity run."""
    best_row, best_point = min(((row, point) for rows, point in rows_with_points for row in rows),
                               key=lambda pair: pair[0]["ppl"])
    point = dict(best_point)
    lambdas = best_row["settings"].get("lambda", [])
    lambdas = lambdas if isinstance(lambdas, list) else [lambdas]
    for flag, value in zip([f for f in GRIDS[method] if f in LAMBDAS], lambdas):
        point[flag] = [value]
    return point, best_row


def probe_documents(args):
    """{kind of passage: the planted-passage documents of ``--subset``} ({}: no probe)."""
    if not probe_passages(args):
        return {}
    return planted_probes(load_task(args.data, args.subset, args.tokens_per_sample, args.batch_size, args.cpu), args)


def write_outputs(out: Path, report):
    out.mkdir(parents=True, exist_ok=True)
    (out / "testtime.json").write_text(json.dumps(report, indent=2))
    far = report["far_position"]
    lines = [f"# {report['title']}", "",
             f"`{report['checkpoint']}` on `{report['data']}` {report['subset']}: {report['batch_size']} streams of "
             f"{report['tokens_per_sample']}-token segments"
             + (f", the first {report['max_batches']} segments of each" if report["max_batches"] else "") + ".", "",
             f"| run | ppl | ppl past {far} | planted random: 1st / 2nd copy | planted text: 1st / 2nd copy | tokens "
             "| tok/s | extra memory (MB) | settings |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in report["runs"]:
        past = f"{row['ppl_past_far_position']:.2f}" if row["ppl_past_far_position"] else "-"
        planted = [f"{row[key]['first_copy_loss']:.3f} / {row[key]['second_copy_loss']:.3f}" if key in row else "-"
                   for key in (PROBE_KEYS["random"], PROBE_KEYS["text"])]
        settings = ", ".join(f"{k} {v}" for k, v in row["settings"].items()) or "-"
        lines.append(f"| {row['name']} | {row['ppl']:.2f} | {past} | {planted[0]} | {planted[1]} | {row['tokens']} | "
                     f"{row['tokens_per_second']:.0f} | {row['extra_memory_mb']:.1f} | {settings} |")
    probe = report.get("planted_passage")
    if probe:
        lines += ["", planted_note(probe)]
    tuning = report.get("tuning")
    if tuning:
        lines += ["", f"Hyperparameters tuned on {tuning['subset']}"
                  + (f" (the first {tuning['max_batches']} segments of each stream)" if tuning["max_batches"] else "")
                  + ", never on the scored split: the best point per method (lowest perplexity) scored the table.", "",
                  "| run on the tuning split | ppl | ppl past far |", "|---|---:|---:|"]
        lines += [f"| {r['name']} | {r['ppl']:.2f} | "
                  + (f"{r['ppl_past_far_position']:.2f}" if r["ppl_past_far_position"] else "-") + " |"
                  for r in tuning["runs"]]
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
    configure_logging()
    probes = probe_documents(args)
    runs, tuning = [], None
    if args.tune_subset is not None:
        tuning = {"subset": args.tune_subset, "max_batches": args.tune_batches, "runs": [], "chosen": {}}
    for method in args.methods:
        logger.info("evaluating %s with %s", args.checkpoint, method)
        points = grid_points(method, args)
        if tuning is not None and (len(points) > 1 or any(len(v) > 1 for v in points[0].values() if isinstance(v, list))):
            tried = [run_method(method, args, point, args.tune_subset, args.tune_batches) for point in points]
            point, best = chosen_point(method, tried)
            tuning["runs"] += [{"name": row["name"], "settings": row["settings"], "ppl": row["ppl"],
                                "ppl_past_far_position": row["ppl_past_far_position"], "tokens": row["tokens"]}
                               for rows, _ in tried for row in rows]
            tuning["chosen"][method] = best["settings"]
            logger.info("%s: chose %s on %s (ppl %.3f)", method, best["settings"], args.tune_subset, best["ppl"])
            points = [point]
        for point in points:
            rows, _ = run_method(method, args, point, args.subset, args.max_batches, probes)
            runs += rows
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
        "planted_passage": planted_settings(probes, args),
        "tuning": tuning,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                   f"{torch.__version__}, {'cuda' if torch.cuda.is_available() and not args.cpu else 'cpu'}",
        "runs": runs,
    }
    write_outputs(Path(args.out), report)
    print((Path(args.out) / "testtime.md").read_text())


if __name__ == "__main__":
    run_script(main, "eval_testtime.py")
