#!/usr/bin/env python
"""Perplexity against evaluation memory size, on held-out documents.

Runs fairseq's eval-lm path (``--task document_lm``: ``task.eval_lm_dataloader``,
models loaded by ``checkpoint_utils`` with ``--model-overrides``) once per
configuration and keeps every token's loss, so that it can also report

* perplexity on tokens past position ``--far-position`` (8K) of their document,
  where memory matters most;
* which token types gain most from memory (loss without minus with memory);
* the memory each run holds per stream (MB), a ``gptm_lm`` checkpoint's included
  (``--gptm-checkpoint``: run once, its memory is its matrix of --gptm-slots rows,
  not a number of tokens), and the token types it gains most on against the
  control (or the vanilla);
* the per-head gate values sigmoid(b_h) of each memory layer, and retrieval
  statistics (top-1 similarity, distance back, and how often the best entry is
  the very token to predict), to tell whether the model uses its memory.

The headline perplexity of each configuration is the one ``fairseq-eval-lm``
prints for the same checkpoint and overrides (tests/test_memory_sweep.py checks
the two agree). Writes ``OUT/memory_sweep.json``, ``OUT/memory_sweep.md`` and
``OUT/memory_sweep.png`` (perplexity vs memory size, log-x). ``--keep-runs`` adds this
sweep's runs to the report already in ``OUT`` (measured on the same data with the same
settings), so that a run trained later joins the comparison without scoring the others again.

Example::

    python scripts/eval_memory_sweep.py data-bin/books-eval \\
        --memory-checkpoint checkpoints/books/memory/checkpoint_last.pt \\
        --control-checkpoint checkpoints/books/control/checkpoint_last.pt \\
        --vanilla-checkpoint checkpoints/books/vanilla/checkpoint_last.pt \\
        --memory-sizes 0,1536,8192,32768,65536,262144 --out results/books
"""

import argparse
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fairseq import progress_bar, utils
from fairseq.data import Dictionary

from fairseq_memtrm.console import configure_logging
from fairseq_memtrm.analysis import entries_hold_token, gains_by_token_type
from fairseq_memtrm.diagnostics import (
    PROBE_KEYS, PROBE_PASSAGES, copy_score, load_passages, planted_passage_loss,
)
from fairseq_memtrm.errors import MemtrmUserError
from fairseq_memtrm.evaluation import (
    add_probe_arguments, gate_values, load, load_task, planted_note, planted_probes, probe_passages,
    save_perplexity_plot, summarise,
)
from fairseq_memtrm.models.memory_model import MemoryModel

logger = logging.getLogger("eval_memory_sweep")

# Every run of the comparison, in the order they are scored: its name in the outputs, the
# flag that gives its checkpoint, the memory size it is scored at (SWEEP: every --memory-sizes;
# None: the checkpoint's own) and the flag's help.
SWEEP = "sweep"
RUNS = (
    ("paper-memory", "--memory-checkpoint", SWEEP, "memorizing fine-tune with the paper's options"),
    ("copying-memory", "--copying-memory-checkpoint", SWEEP,
     "memorizing fine-tune with --memory-query key --memory-shift-keys"),
    ("repeat-memory", "--repeat-memory-checkpoint", SWEEP,
     "memorizing fine-tune with the paper's options, trained with distant repeats (--distant-repeat-prob)"),
    ("longmem", "--longmem-checkpoint", SWEEP, "a longmem_sidenet_lm checkpoint (scripts/finetune_longmem.sh)"),
    ("gptm", "--gptm-checkpoint", None, "a gptm_lm checkpoint (scripts/finetune_gptm.sh): its memory is its slots"),
    ("control", "--control-checkpoint", 0, "same updates without memory"),
    ("vanilla", "--vanilla-checkpoint", None, "the transformer_lm checkpoint the others started from"),
)
MEMORY_RUNS = tuple(name for name, _, size, _ in RUNS if size == SWEEP)  # one line each in the plot
MARKERS = "os^Dv<>p"[:len(MEMORY_RUNS)]  # one marker per line
GAIN_RUNS = ("gptm", "control", "vanilla")  # GPTm's per-token gains: against the control, else the vanilla
LABELS = {"paper-memory": "memorizing fine-tune (paper's options)",
          "copying-memory": "memorizing fine-tune (copying options)",
          "repeat-memory": "memorizing fine-tune (paper's options, distant repeats)", "longmem": "LongMem SideNet"}


@torch.no_grad()
def score(model, task, subset, tokens_per_sample, batch_size, far_position, log_format):
    """Every target token's loss (nats), document id, position and type."""
    itr = task.eval_lm_dataloader(task.dataset(subset), batch_size=batch_size,
                                  max_positions=utils.resolve_max_positions(task.max_positions(),
                                                                            model.max_positions()))
    progress = progress_bar.progress_bar(itr, log_format=log_format, log_interval=50, prefix=subset,
                                         default_log_format="tqdm")
    pad = task.target_dictionary.pad()
    device = next(model.parameters()).device
    recording = isinstance(model, MemoryModel)
    losses, docs, positions, types = [], [], [], []
    top1_scores, distances, top1_holds_next, next_seen = [], [], [], []
    doc_tokens = {}  # doc id -> its source tokens so far, by document position (retrieval quality)
    for sample in progress:
        sample = utils.move_to_cuda(sample, device) if device.type == "cuda" else sample
        net_input = dict(sample["net_input"], record_retrievals=True) if recording else sample["net_input"]
        net_output = model(**net_input)
        lprobs = model.get_normalized_probs(net_output, log_probs=True, sample=sample)
        target = sample["target"]
        nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        mask = target.ne(pad)
        offset = (sample["segment"].clamp(min=0) * tokens_per_sample).unsqueeze(1)
        position = offset + torch.arange(target.size(1), device=target.device).unsqueeze(0)
        losses.append(nll[mask].float().cpu())
        docs.append(sample["doc_id"].unsqueeze(1).expand_as(target)[mask].cpu())
        positions.append(position[mask].cpu())
        types.append(target[mask].cpu())
        if recording:
            for record in net_output[1]["retrievals"].values():  # layers that retrieved something
                found = record.retrieval.mask[..., 0]  # (B, H, T)
                top1_scores.append(record.retrieval.scores[..., 0][found].float().cpu())
                query_position = position.unsqueeze(1).expand_as(found)  # = its source token's memory position
                distances.append((query_position - record.retrieval.positions[..., 0])[found].cpu())
                holds, seen = retrieval_quality(record, doc_tokens, sample, mask)
                top1_holds_next.append(holds)
                next_seen.append(seen)
            remember_source_tokens(doc_tokens, sample, position, mask)
    result = {
        "loss": torch.cat(losses).numpy(),
        "doc": torch.cat(docs).numpy(),
        "position": torch.cat(positions).numpy(),
        "type": torch.cat(types).numpy(),
    }
    if top1_scores:
        scores, dist = torch.cat(top1_scores), torch.cat(distances).float()
        result["retrieval"] = {"mean_top1_similarity": float(scores.mean()),
                               "median_top1_distance": float(dist.median()),
                               "mean_top1_distance": float(dist.mean()),
                               "top1_holds_next_token": float(torch.cat(top1_holds_next).float().mean()),
                               "next_token_seen_before": float(torch.cat(next_seen).float().mean())}
    return result


def remember_source_tokens(doc_tokens, sample, position, mask):
    """Append each row's source tokens to its document's (the memory just wrote them)."""
    source = sample["net_input"]["src_tokens"].cpu()
    for row in range(source.size(0)):
        doc, real = int(sample["doc_id"][row]), mask[row].cpu()
        start = int(position[row, 0])
        known = doc_tokens.get(doc, torch.zeros(0, dtype=torch.long))[:start]  # a new document starts at 0
        doc_tokens[doc] = torch.cat([known, source[row][real]])


def retrieval_quality(record, doc_tokens, sample, mask):
    """Per (head, token) of this segment that retrieved something: does the top-1
    entry's own token (what its value carries) equal the token to predict? And,
    per token, does that token occur at all among the memory's earlier tokens
    (the ceiling of the first)? The entry at document position p holds source
    token p, whether its key is its own or (--memory-shift-keys) the previous one's."""
    target = sample["target"].cpu()
    positions = record.retrieval.positions[..., 0].cpu()  # (B, H, T)
    found = record.retrieval.mask[..., 0].cpu()
    holds, seen = [], []
    for row in range(target.size(0)):
        past = doc_tokens.get(int(sample["doc_id"][row]))
        real = mask[row].cpu()
        if past is None or not found[row].any():
            continue
        hit = entries_hold_token(past, positions[row], target[row])  # (H, T)
        holds.append(hit[:, real][found[row][:, real]])  # only where something was found
        seen.append(torch.isin(target[row][real], past))
    empty = torch.zeros(0, dtype=torch.bool)
    return (torch.cat(holds) if holds else empty), (torch.cat(seen) if seen else empty)


def vanilla_copy_score(model, task, args):
    """Does the starting checkpoint copy from its context? (fairseq_memtrm.diagnostics)
    Without it the memory has nothing to extend; None when the split is too short."""
    span = min(200, args.tokens_per_sample // 2)
    try:
        passages = load_passages(args.data, args.subset, task.source_dictionary, 16, span)
    except MemtrmUserError as error:
        logger.warning("no copy score: %s", error)
        return None
    result = {k: round(v, 4) for k, v in copy_score(model, passages).items()}
    logger.info("vanilla copy score (16 passages of %d tokens, shown twice): %s", span, result)
    return {"span": span, "passages": 16, **result}


def biggest_gains(without, with_memory, dictionary, top=25, min_count=5):
    """Token types whose summed loss falls most with memory (same tokens, same order)."""
    if not np.array_equal(without["type"], with_memory["type"]):
        raise RuntimeError("the two runs scored different tokens; cannot compare per token")
    gain = without["loss"] - with_memory["loss"]
    ranked = gains_by_token_type(without["type"].tolist(), gain.tolist(), top, min_count)
    return [{"token": dictionary[g.token], "count": g.count, "total_gain_nats": round(g.total, 2),
             "mean_gain_nats": round(g.mean, 3)} for g in ranked]


class RunCache:
    """Each finished run's row and per-token losses under ``OUT/cache``, so that a sweep
    killed after hours resumes at its first unfinished run. A run is found again only for
    the same checkpoint file (path and modification time), memory size, overrides and
    evaluation settings; files are written whole (temporary name, then rename)."""

    SETTINGS = ("data", "subset", "tokens_per_sample", "batch_size", "far_position", "probe_gap", "probe_at",
                "probe_length")

    def __init__(self, folder: Path, args):
        self.folder = folder
        self.settings = {key: getattr(args, key) for key in self.SETTINGS}

    def _key(self, name, checkpoint, size, overrides) -> str:
        stamp = os.path.getmtime(checkpoint) if os.path.isfile(checkpoint) else None
        blob = json.dumps([name, os.path.abspath(checkpoint), stamp, size, overrides, self.settings], sort_keys=True)
        return f"{name}-{size}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"

    def get(self, name, checkpoint, size, overrides):
        key = self._key(name, checkpoint, size, overrides)
        row_file, scored_file = self.folder / f"{key}.json", self.folder / f"{key}.npz"
        if not (row_file.is_file() and scored_file.is_file()):
            return None
        with np.load(scored_file) as arrays:
            scored = {k: arrays[k] for k in arrays.files}
        return json.loads(row_file.read_text()), scored

    def get_probe(self, kind, name, checkpoint, size, overrides):
        """The losses of a planted-passage probe of ``kind`` on this run, or None."""
        path = self.folder / f"{self._key(name, checkpoint, size, overrides)}.probe-{kind}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def put_probe(self, kind, name, checkpoint, size, overrides, losses):
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self._key(name, checkpoint, size, overrides)}.probe-{kind}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(losses))
        os.replace(tmp, path)

    def put(self, name, checkpoint, size, overrides, row, scored, extra):
        """``extra``: what the report needs besides the row (keys with None values are dropped)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self._key(name, checkpoint, size, overrides)
        arrays = {k: v for k, v in scored.items() if isinstance(v, np.ndarray)}
        tmp = self.folder / f"{key}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, self.folder / f"{key}.npz")
        saved = dict(row, **{k: v for k, v in extra.items() if v is not None})
        tmp = self.folder / f"{key}.json.tmp"
        tmp.write_text(json.dumps(saved))
        os.replace(tmp, self.folder / f"{key}.json")


KEPT_SETTINGS = ("subset", "tokens_per_sample", "batch_size", "far_position")


def earlier_report(out: Path, args, plan) -> dict:
    """``--keep-runs``: the report already in ``out``, with only the rows this sweep does
    not score again (a (run, memory size) of ``plan``; a run scored at its own size
    replaces every row of its name). Refused, in one sentence, when it was measured on
    other data or with other settings, where its rows would not compare."""
    path = out / "memory_sweep.json"
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text())
    except ValueError:
        raise MemtrmUserError(f"--keep-runs: {path} is not a JSON report; move it aside or drop --keep-runs")
    differ = [f"--{key.replace('_', '-')} {report.get(key)}" for key in KEPT_SETTINGS
              if report.get(key) != getattr(args, key)]
    if os.path.normpath(str(report.get("data"))) != os.path.normpath(args.data):
        differ.append(f"data {report.get('data')}")
    probe = report.get("planted_passage")
    if probe and (probe["at"], probe["gap"], probe["length"]) != (args.probe_at, args.probe_gap, args.probe_length):
        differ.append(f"--probe-at {probe['at']} --probe-gap {probe['gap']} --probe-length {probe['length']}")
    if differ:
        raise MemtrmUserError(f"--keep-runs: {path} was measured with {', '.join(differ)}; rerun with those "
                              "settings, or write to another --out")
    again = {(name, size) for name, _, size in plan}
    report["runs"] = [row for row in report["runs"]
                      if (row["name"], None) not in again and (row["name"], row["memory_size"]) not in again]
    return report


def merge_reports(earlier: dict, report: dict) -> dict:
    """``report`` with the rows (and what was measured beside them) it keeps from ``earlier``,
    every row in the order of RUNS, then of memory size."""
    if not earlier:
        return report
    order = {name: index for index, (name, *_) in enumerate(RUNS)}
    report["runs"] = sorted(earlier["runs"] + report["runs"], key=lambda r: (order[r["name"]], r["memory_size"]))
    if report.get("vanilla_copy_score") is None:
        report["vanilla_copy_score"] = earlier.get("vanilla_copy_score")
    if "planted_passage" in earlier:
        counts = {**earlier["planted_passage"]["documents"],
                  **report.get("planted_passage", {}).get("documents", {})}
        report["planted_passage"] = dict(earlier["planted_passage"], documents=counts)
    kept = {row["name"] for row in earlier["runs"]}
    for source, keys in (("paper-memory", ("gains_between", "biggest_gains")),
                         ("gptm", ("gptm_gains_between", "gptm_gains"))):
        if source in kept:  # gains between rows this sweep did not score again
            report.update({key: earlier[key] for key in keys if key in earlier and key not in report})
    return report


def write_outputs(out, report):
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_sweep.json").write_text(json.dumps(report, indent=2))
    far = report["far_position"]
    lines = [f"| run | eval memory | memory MB/stream | ppl | ppl past {far} | tokens | tok/s | gate (mean) | "
             "top-1 holds next |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["runs"]:
        gates = [g for layer in row["gates"].values() for g in layer]
        gate = f"{np.mean(gates):.3f}" if gates else "-"
        past = f"{row['ppl_past_far_position']:.2f}" if row["ppl_past_far_position"] else "-"
        found = row.get("retrieval", {})
        holds = f"{found['top1_holds_next_token']:.1%}" if "top1_holds_next_token" in found else "-"
        size = f"{row['memory_size']} slots" if row["name"] == "gptm" else row["memory_size"]
        lines.append(f"| {row['name']} | {size} | {row.get('memory_mb_per_stream', 0):.2f} | {row['ppl']:.2f} | {past} | "
                     f"{row['tokens']} | "
                     f"{row['tokens_per_second']:.0f} | {gate} | {holds} |")
    ceiling = [r["retrieval"]["next_token_seen_before"] for r in report["runs"] if "next_token_seen_before" in r.get("retrieval", {})]
    if ceiling:
        lines += ["", "top-1 holds next: share of (head, token) retrievals whose best entry is the token to predict "
                  f"(what its value carries); that token occurs earlier in its document for {max(ceiling):.0%} "
                  "of tokens."]
    probe = report.get("planted_passage")
    keys = [(kind, PROBE_KEYS[kind]) for kind in PROBE_PASSAGES]
    probed = [r for r in report["runs"] if any(key in r for _, key in keys)]
    if probe and probed:
        kinds = [(kind, key) for kind, key in keys if any(key in r for r in probed)]
        lines += ["", planted_note(probe), "",
                  "| run | eval memory | " + " | ".join(f"{kind}: 1st copy | {kind}: 2nd copy" for kind, _ in kinds)
                  + " |", "|---|---:|" + "---:|---:|" * len(kinds)]
        for r in probed:
            cells = [f"{r[key]['first_copy_loss']:.3f} | {r[key]['second_copy_loss']:.3f}" if key in r else "- | -"
                     for _, key in kinds]
            lines.append(f"| {r['name']} | {r['memory_size']} | " + " | ".join(cells) + " |")
        found = [(r, kind, r[key]) for r in probed for kind, key in kinds if "second_copy_next_found" in r.get(key, {})]
        if found:
            lines += ["", "What the memory retrieved for the second copy, over (memory layer, head, query): found = "
                      "the first copy's entry for the token to predict is among the k retrieved (same token: the "
                      "entry of the query's own token); weight = the memory attention on the first.", "",
                      "| run | eval memory | passage | found | found, same token | weight |",
                      "|---|---:|---|---:|---:|---:|"]
            lines += [f"| {r['name']} | {r['memory_size']} | {kind} | {f['second_copy_next_found']:.1%} | "
                      f"{f['second_copy_same_found']:.1%} | {f['second_copy_next_weight']:.3f} |"
                      for r, kind, f in found]
    for gains, between in (("biggest_gains", "gains_between"), ("gptm_gains", "gptm_gains_between")):
        if report.get(gains):
            lines += ["", f"Token types that gain most from memory ({report[between]}):", "",
                      "| token | count | total gain (nats) | mean gain |", "|---|---:|---:|---:|"]
            lines += [f"| `{g['token']}` | {g['count']} | {g['total_gain_nats']} | {g['mean_gain_nats']} |"
                      for g in report[gains]]
    copy = report.get("vanilla_copy_score")
    if copy:
        lines += ["", f"Does the vanilla checkpoint copy from its context? {copy['passages']} passages of "
                  f"{copy['span']} tokens shown twice: loss {copy['first_copy_loss']:.3f} nats on the first "
                  f"copy, {copy['second_copy_loss']:.3f} on the second (copy gain {copy['copy_gain']:.3f}; "
                  "a model that copies scores the second copy far lower, and only then can memory help)."]
    lines += ["", f"Machine: {report['machine']}"]
    (out / "memory_sweep.md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for colour, name in enumerate(MEMORY_RUNS):
        sweep = [r for r in report["runs"] if r["name"] == name and r["memory_size"] > 0]
        if sweep:
            ax.plot([r["memory_size"] for r in sweep], [r["ppl"] for r in sweep], MARKERS[colour] + "-",
                    color=f"C{colour}", label=LABELS[name])
            ax.set_xscale("log", base=2)
    baselines = [r for r in report["runs"] if r["name"] not in MEMORY_RUNS or r["memory_size"] == 0]
    for colour, row in enumerate(baselines, start=len(MEMORY_RUNS)):  # C0-C3: the sweeps' lines
        ax.axhline(row["ppl"], linestyle="--", linewidth=1, color=f"C{colour}",
                   label=f"{row['name']} (memory {row['memory_size']})")
    ax.set_xlabel("evaluation memory size (tokens, log scale)")
    save_perplexity_plot(fig, ax, report, out / "memory_sweep.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="data-bin folder (scripts/prepare_data.py)")
    for name, flag, size, help in RUNS:
        scored_at = "at every --memory-sizes" if size == SWEEP else "once" if size is None else f"at memory {size}"
        parser.add_argument(flag, help=f"{help} (run '{name}', scored {scored_at})")
    parser.add_argument("--longmem-backbone", help="its backbone checkpoint, if it moved since training")
    parser.add_argument("--memory-sizes", default="0,1536,8192,32768,65536,262144",
                        help="comma-separated evaluation memory sizes for the memory checkpoint")
    parser.add_argument("--subset", default="test")
    parser.add_argument("--tokens-per-sample", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4, help="streams evaluated side by side")
    parser.add_argument("--far-position", type=int, default=8192,
                        help="also report perplexity on tokens at least this far into their document")
    add_probe_arguments(parser)
    parser.add_argument("--title", default="perplexity vs memory size")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--keep-runs", action="store_true",
                        help="add to the report already in --out: keep its rows of the runs and memory sizes this "
                        "sweep does not score (refused if it was measured with other data or settings)")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--log-format", default=None, choices=["tqdm", "simple", "none", "json"])
    args = parser.parse_args(argv)
    configure_logging()
    try:
        sizes = [int(s) for s in args.memory_sizes.split(",") if s.strip()]
    except ValueError:
        raise MemtrmUserError(f"--memory-sizes expects comma-separated integers, got {args.memory_sizes!r}")

    memory_flags = [flag for name, flag, size, _ in RUNS if size == SWEEP or name == "gptm"]
    given = [flag for _, flag, _, _ in RUNS if getattr(args, flag[2:].replace("-", "_"))]
    if not set(given) & set(memory_flags) and not (given and args.keep_runs):
        raise MemtrmUserError(f"nothing with a memory to evaluate: give one of {', '.join(memory_flags)} "
                              "(or --keep-runs to re-score only a run without memory into the report in --out)")
    plan = []
    for name, flag, size, _ in RUNS:
        checkpoint = getattr(args, flag[2:].replace("-", "_"))
        if checkpoint:
            plan += [(name, checkpoint, each) for each in (sizes if size == SWEEP else [size])]
    earlier = earlier_report(Path(args.out), args, plan) if args.keep_runs else {}
    if not set(given) & set(memory_flags) and not earlier:
        raise MemtrmUserError(f"--keep-runs: no report in {args.out} to re-score {', '.join(given)} into; "
                              f"give one of {', '.join(memory_flags)} too")
    runs, scored_by_size, vanilla_copy = [], {}, None
    scored_by_run = {}  # the runs GPTm's per-token gains are measured between
    probes, probe_counts = None, {}  # {kind: planted documents}, built once; {kind: how many}
    cache = RunCache(Path(args.out) / "cache", args)
    for name, checkpoint, size in plan:
        overrides = {"memory_size": size} if size is not None else {}
        if name == "longmem" and args.longmem_backbone:
            overrides["backbone_checkpoint"] = os.path.abspath(args.longmem_backbone)
        model = task = None
        cached = cache.get(name, checkpoint, size, overrides)
        if cached is not None:
            row, scored = cached
            logger.info("%s memory %s: ppl %.3f (cached in %s)", name, size, row["ppl"], cache.folder)
            vanilla_copy = row.pop("vanilla_copy_score", vanilla_copy)
            legacy_count = row.pop("planted_documents", None)  # rows that kept the random probe themselves
        else:
            logger.info("evaluating %s (%s) with memory size %s", name, checkpoint, size)
            model, task = load(checkpoint, args.data, args.subset, args.tokens_per_sample, args.batch_size,
                               overrides, args.cpu)
            start = time.perf_counter()
            scored = score(model, task, args.subset, args.tokens_per_sample, args.batch_size, args.far_position,
                           args.log_format)
            bank = getattr(model, "memory_bank", None)
            row = summarise(name, checkpoint, size if size is not None else getattr(bank, "memory_size", 0), scored,
                            time.perf_counter() - start, args.far_position, gate_values(model))
            row["memory_mb_per_stream"] = round(bank.bytes_per_stream() / 2**20, 2) if bank is not None else 0.0
            logger.info("%s memory %s: ppl %.3f (past %d: %s) over %d tokens", name, size, row["ppl"],
                        args.far_position, row["ppl_past_far_position"], row["tokens"])
            if name == "vanilla":
                vanilla_copy = vanilla_copy_score(model, task, args)
            cache.put(name, checkpoint, size, overrides, row, scored,
                      {"vanilla_copy_score": vanilla_copy if name == "vanilla" else None})
            legacy_count = None
        kinds = probe_passages(args)
        for kind in PROBE_PASSAGES:  # each probe is cached on its own, so a new kind runs alone
            key = PROBE_KEYS[kind]
            legacy = row.pop(key, None)
            if kind not in kinds:
                continue
            found = cache.get_probe(kind, name, checkpoint, size, overrides)
            if found is None and legacy is not None and legacy_count is not None:
                found = dict(legacy, documents=legacy_count)
            if found is None:
                if probes is None:
                    task = task or load_task(args.data, args.subset, args.tokens_per_sample, args.batch_size,
                                             args.cpu)
                    probes = planted_probes(task, args)
                if kind not in probes:
                    continue
                if model is None:
                    model, task = load(checkpoint, args.data, args.subset, args.tokens_per_sample, args.batch_size,
                                       overrides, args.cpu)
                found = {k: round(v, 4) for k, v in planted_passage_loss(
                    model, probes[kind], args.probe_at, args.probe_gap, args.probe_length,
                    args.tokens_per_sample).items()}
                found["documents"] = probes[kind].size(0)
                cache.put_probe(kind, name, checkpoint, size, overrides, found)
                logger.info("%s memory %s: planted %s passage %s", name, size, kind, found)
            probe_counts[kind] = found.pop("documents")
            row[key] = found
        runs.append(row)
        if name == "paper-memory":
            scored_by_size[size] = scored
        if name in GAIN_RUNS:
            scored_by_run[name] = scored
        del model

    report = {
        "title": args.title,
        "data": args.data,
        "subset": args.subset,
        "tokens_per_sample": args.tokens_per_sample,
        "batch_size": args.batch_size,
        "far_position": args.far_position,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                   f"{torch.__version__}, {'cuda' if torch.cuda.is_available() and not args.cpu else 'cpu'}",
        "runs": runs,
        "vanilla_copy_score": vanilla_copy,
    }
    if probe_counts:
        report["planted_passage"] = {"at": args.probe_at, "gap": args.probe_gap, "length": args.probe_length,
                                     "documents": probe_counts}
    with_memory = [s for s in sizes if s > 0]
    if 0 in scored_by_size and with_memory:
        largest = max(with_memory)
        report["gains_between"] = f"memory 0 vs memory {largest}"
        if largest in scored_by_size:
            dictionary = Dictionary.load(os.path.join(args.data, "dict.txt"))
            report["biggest_gains"] = biggest_gains(scored_by_size[0], scored_by_size[largest], dictionary)
    baseline = next((name for name in ("control", "vanilla") if name in scored_by_run), None)
    if "gptm" in scored_by_run and baseline:
        dictionary = Dictionary.load(os.path.join(args.data, "dict.txt"))
        report["gptm_gains_between"] = f"{baseline} vs gptm"
        report["gptm_gains"] = biggest_gains(scored_by_run[baseline], scored_by_run["gptm"], dictionary)
    write_outputs(Path(args.out), merge_reports(earlier, report))
    print((Path(args.out) / "memory_sweep.md").read_text())


if __name__ == "__main__":
    main()
