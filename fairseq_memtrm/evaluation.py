"""Evaluation as ``fairseq-eval-lm --task document_lm`` does it, shared by the
scripts that score held-out documents (``eval_memory_sweep.py``, ``eval_testtime.py``,
``build_datastore.py``): loading a checkpoint with ``--model-overrides``, the
per-head memory gates, and one run's summary row."""

import logging
import math
import os
from typing import List, Optional

import torch
from fairseq import checkpoint_utils, options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from fairseq_memtrm.diagnostics import PROBE_PASSAGES, planted_documents
from fairseq_memtrm.errors import MemtrmUserError
from fairseq_memtrm.models.memory_model import MemoryModel

logger = logging.getLogger(__name__)
PACKAGE = os.path.dirname(os.path.abspath(__file__))  # the --user-dir


def perplexity(mean_loss) -> float:
    """exp(mean loss in nats); inf for a run that diverged, not an OverflowError."""
    mean_loss = float(mean_loss)
    return math.exp(mean_loss) if mean_loss < 700 else math.inf


def load_task(data, subset, tokens_per_sample, batch_size, cpu, checkpoint=None, overrides=None):
    """The ``document_lm`` task, with ``subset`` loaded, exactly as ``fairseq-eval-lm
    --task document_lm`` builds it (no model is loaded)."""
    argv = [data, "--user-dir", PACKAGE, "--task", "document_lm", "--gen-subset", subset,
            "--tokens-per-sample", str(tokens_per_sample), "--batch-size", str(batch_size),
            "--model-overrides", repr(overrides or {})]
    if checkpoint is not None:
        argv += ["--path", checkpoint]
    if cpu:
        argv.append("--cpu")
    args = options.parse_args_and_arch(options.get_eval_lm_parser(), argv)
    cfg = convert_namespace_to_omegaconf(args)
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    task.load_dataset(subset)
    return task


def load(checkpoint, data, subset, tokens_per_sample, batch_size, overrides, cpu):
    """Model and task exactly as ``fairseq-eval-lm --task document_lm`` builds them."""
    if not os.path.isfile(checkpoint):
        raise MemtrmUserError(f"checkpoint {checkpoint!r} not found; train it first (README, Quick start)")
    task = load_task(data, subset, tokens_per_sample, batch_size, cpu, checkpoint, overrides)
    models, _ = checkpoint_utils.load_model_ensemble([checkpoint], arg_overrides=overrides, task=task)
    model = models[0].eval()
    if torch.cuda.is_available() and not cpu:
        model = model.cuda()
    return model, task


def gate_values(model):
    """{layer: [sigmoid(b_h) per head]} for a model that uses memory, else {}."""
    if not isinstance(model, MemoryModel) or model.memory_bank.memory_size == 0:
        return {}
    return {str(layer): att.gate_values().tolist()
            for layer, att in zip(model.memory_layer_ids, model.memory_attentions())}


def summarise(name, checkpoint, memory_size, scored, wall, far_position, gates):
    loss = scored["loss"]
    far = scored["position"] >= far_position
    row = {
        "name": name,
        "checkpoint": checkpoint,
        "memory_size": memory_size,
        "tokens": int(loss.size),
        "loss": float(loss.mean()),
        "ppl": perplexity(loss.mean()),
        "tokens_past_far_position": int(far.sum()),
        "ppl_past_far_position": perplexity(loss[far].mean()) if far.any() else None,
        "wall_seconds": round(wall, 1),
        "tokens_per_second": round(loss.size / wall, 1),
        "gates": gates,
    }
    if "retrieval" in scored:
        row["retrieval"] = scored["retrieval"]
    return row


def save_perplexity_plot(fig, ax, report, path) -> None:
    """Label a report's perplexity figure (y axis, title, legend), write it and close it."""
    import matplotlib.pyplot as plt

    ax.set_ylabel(f"perplexity ({report['subset']})")
    ax.set_title(report["title"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_probe_arguments(parser):
    """The planted-passage probe's flags (:func:`fairseq_memtrm.diagnostics.planted_documents`)."""
    parser.add_argument("--probe-gap", type=int, default=30000,
                        help="planted-passage probe: a passage at --probe-at of every document long enough, "
                        "and again this many tokens later; the loss on each copy is reported (0: no probe)")
    parser.add_argument("--probe-at", type=int, default=1000, help="where the probe's first copy starts")
    parser.add_argument("--probe-length", type=int, default=40, help="the probe passage's length in tokens")
    parser.add_argument("--probe-passages", default=",".join(PROBE_PASSAGES),
                        help="comma-separated kinds of planted passage, each probed on its own: random (uniform "
                        "random tokens) and text (a span of another document of the split: natural text that only "
                        "a copy predicts)")


def planted_probes(task, args) -> dict:
    """{kind of passage: (B, N) the planted-passage documents of ``args.subset``} for
    ``--probe-passages`` (:func:`fairseq_memtrm.diagnostics.planted_documents`); a kind
    that no document can hold is left out, with a warning."""
    probes = {}
    for kind in probe_passages(args):
        documents = planted_documents(task.dataset(args.subset), task.source_dictionary, args.probe_at,
                                      args.probe_gap, args.probe_length, passage=kind)
        if documents is None:
            logger.warning("no planted %s passage probe: no %s document has %d tokens (or none other to take it "
                           "from)", kind, args.subset, args.probe_at + args.probe_gap - args.probe_length)
        else:
            probes[kind] = documents
    return probes


def probe_passages(args) -> List[str]:
    """The kinds of ``--probe-passages``, checked; [] when the probe is off."""
    kinds = [kind.strip() for kind in args.probe_passages.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in PROBE_PASSAGES]
    if unknown:
        raise MemtrmUserError(f"--probe-passages takes {', '.join(PROBE_PASSAGES)}; got {', '.join(unknown)}")
    return kinds if args.probe_gap > 0 else []


PASSAGE_WORDS = {"random": "uniform random tokens", "text": "a span of another document of the split"}


def planted_settings(probes: dict, args) -> Optional[dict]:
    """What a report keeps of its planted-passage probes ({kind: documents (B, N)}); None: none ran."""
    if not probes:
        return None
    return {"at": args.probe_at, "gap": args.probe_gap, "length": args.probe_length,
            "documents": {kind: int(documents.size(0)) for kind, documents in probes.items()}}


def planted_note(probe: dict) -> str:
    """One sentence that says what the planted-passage columns of a report measured."""
    documents = probe["documents"] if isinstance(probe["documents"], dict) else {"random": probe["documents"]}
    kinds = "; ".join(f"{kind}: {PASSAGE_WORDS[kind]} ({count} documents)" for kind, count in documents.items())
    return (f"Planted passages: {probe['length']} tokens written at token {probe['at']} of each document long enough "
            f"and again {probe['gap']:,} tokens later ({kinds}); mean loss in nats on each copy, its first token "
            "excluded.")
