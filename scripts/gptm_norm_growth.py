#!/usr/bin/env python
"""How GPTm's memory matrix M grows over long documents (docs/gptm.md).

Reads the documents of a data-bin split with a ``gptm_lm`` checkpoint exactly as
``fairseq-eval-lm --task document_lm`` does (its streams, its segments) and
records, after each segment of each stream, the Frobenius norm of ``M``, the
share of slot strengths sigmoid(0.5 v) above 0.99 and below 0.01 (how far the
write has saturated) and the mean cosine between the rows of ``M`` (1: every
slot holds the same thing). Writes OUT.json and prints every --every-th segment::

    python scripts/gptm_norm_growth.py data-bin/books checkpoints/books/gptm/checkpoint_last.pt \\
        --subset test --out results/books/gptm_norm_growth
"""

import argparse
import ast
import json
import logging
import sys
from pathlib import Path

import torch

from fairseq_memtrm.console import configure_logging
from fairseq_memtrm.evaluation import load
from fairseq_memtrm.memory.matrix_memory import write_strength


@torch.no_grad()
def measure(model, task, subset, tokens_per_sample, batch_size, every):
    itr = task.eval_lm_dataloader(task.dataset(subset), batch_size=batch_size)
    rows = []
    for step, sample in enumerate(itr):
        net_input = sample["net_input"]
        written = sample["target"].ne(task.target_dictionary.pad()).any(dim=1)  # rows reading a document
        _, extra = model(**net_input)
        matrix = extra["memory_matrix"][written]
        if matrix.numel() == 0:
            continue
        unit = torch.nn.functional.normalize(matrix[:, :: max(1, matrix.size(1) // 256)], dim=-1)  # <= 256 rows
        cosine = torch.einsum("bmf,bnf->bmn", unit, unit).mean().item()
        # the strengths a write of M's mean direction would get now: how saturated sigmoid(0.5 v) is
        summary = torch.nn.functional.normalize(matrix.sum(dim=1), dim=-1)
        strength = write_strength(matrix, summary, model.gptm_addresses)
        segment = int(sample["segment"][written].max())
        row = {"batch": step, "max_segment": segment, "norm": matrix.flatten(1).norm(dim=1).mean().item(),
               "saturated_high": (strength > 0.99).float().mean().item(),
               "saturated_low": (strength < 0.01).float().mean().item(), "row_cosine": cosine}
        rows.append(row)
        if step % every == 0:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("checkpoint", help="a gptm_lm checkpoint")
    parser.add_argument("--subset", default="test")
    parser.add_argument("--tokens-per-sample", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1, help="streams read side by side")
    parser.add_argument("--every", type=int, default=20, help="print every N-th segment")
    parser.add_argument("--overrides", default="{}", help="--model-overrides, e.g. \"{'gptm_decay': 0.99}\"")
    parser.add_argument("--out", required=True, help="OUT.json is written")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(logging.WARNING, stream=sys.stderr)
    model, task = load(args.checkpoint, args.data, args.subset, args.tokens_per_sample, args.batch_size,
                       ast.literal_eval(args.overrides), args.cpu)
    rows = measure(model, task, args.subset, args.tokens_per_sample, args.batch_size, args.every)
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": args.checkpoint, "data": args.data, "subset": args.subset,
                               "tokens_per_sample": args.tokens_per_sample, "segments": rows}, indent=1))


if __name__ == "__main__":
    main()
