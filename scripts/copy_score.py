#!/usr/bin/env python
"""Does a checkpoint copy from its context? The precondition of a kNN memory.

A kNN memory extends attention to the distant past; it can only help where the
model's attention already retrieves earlier tokens (induction heads). This
script takes passages of real text from a data-bin split, shows each passage
twice in one context (``P P``), and reports the mean loss (nats/token) on the
first and on the second copy. A model that copies predicts the second copy far
better; one that does not scores both alike, and memory will not help it.

    python scripts/copy_score.py CHECKPOINT DATA_BIN [--split valid] [--span 200]
        [--induction] [--key-ranks [--memory-query key] [--memory-shift-keys]]

``--key-ranks`` asks whether a memory could find a copy through each head: a
passage planted twice, ``--probe-gap`` tokens apart, in every document of the
split long enough, read in segments without memory; for each layer and head, the
rank of the first copy's key for the token to predict among every earlier
segment's keys, by cosine (the memory's score), its median and the share of
queries where it is among the top ``--knn-k`` (what a memory reading k entries
can find), per kind of passage. ``--memory-query key --memory-shift-keys`` ask the
same of the copying memory (a token's key against each entry's previous-token key).

Works for plain ``transformer_lm`` and plugin checkpoints (memory unused). Prints
one JSON line.
"""

import argparse
import json
import logging
import os
import sys

import torch


from fairseq_memtrm.console import configure_logging
from fairseq_memtrm.diagnostics import copy_score, induction_scores, load_passages, planted_key_ranks
from fairseq_memtrm.errors import MemtrmUserError
from fairseq_memtrm.evaluation import add_probe_arguments, load_task, planted_probes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data_bin", help="data-bin with dict.txt and the split")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--span", type=int, default=200, help="passage length; 2 x span must fit the model's context")
    parser.add_argument("--count", type=int, default=16, help="passages")
    parser.add_argument("--induction", action="store_true",
                        help="also report every layer's and head's induction score (attention from a second-copy "
                        "token to the position after its first occurrence): where the model copies")
    parser.add_argument("--key-ranks", action="store_true",
                        help="also report, per layer and head, where the key a copy needs ranks among the keys a "
                        "memory holds, for a planted passage's second copy (the --probe-* flags)")
    parser.add_argument("--knn-k", type=int, default=32, help="--key-ranks: the entries a memory reads per query")
    parser.add_argument("--memory-query", choices=("query", "key"), default="query",
                        help="--key-ranks: what a token queries the memory with, as the memory's flag")
    parser.add_argument("--memory-shift-keys", action="store_true",
                        help="--key-ranks: each entry keyed by the previous token, as the memory's flag")
    parser.add_argument("--tokens-per-sample", type=int, default=512, help="--key-ranks: the segment length")
    add_probe_arguments(parser)
    args = parser.parse_args()
    configure_logging(logging.WARNING, stream=sys.stderr)  # stdout is the JSON result
    for path in (args.checkpoint, os.path.join(args.data_bin, "dict.txt")):
        if not os.path.isfile(path):
            raise MemtrmUserError(f"copy_score: no file {path}")

    from fairseq import checkpoint_utils  # the plugin's tasks and models are registered by the import above

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [args.checkpoint], arg_overrides={"data": args.data_bin}
    )
    model = models[0].eval()
    passages = load_passages(args.data_bin, args.split, task.source_dictionary, args.count, args.span)
    result = copy_score(model, passages)
    if args.induction:
        scores = induction_scores(model, passages)
        result["induction_scores"] = [[round(v, 4) for v in layer] for layer in scores.tolist()]
        result["induction_layer"] = int(scores.max(dim=1).values.argmax())  # the layer of the strongest head
    if args.key_ranks:
        result.update(key_ranks(model, args))
    print(json.dumps({"checkpoint": args.checkpoint, "span": args.span, "passages": args.count,
                      **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}}))


def key_ranks(model, args) -> dict:
    """{"key_ranks": {kind: {"median": [[per head] per layer], "found": [[...]]}},
    "key_rank_layer": the layer whose best head finds the copy most often}."""
    args.subset = args.split
    probes = planted_probes(load_task(args.data_bin, args.split, args.tokens_per_sample, 1, cpu=True), args)
    if not probes:
        raise MemtrmUserError(f"--key-ranks: no {args.split} document holds a planted passage "
                              f"{args.probe_gap} tokens apart: lower --probe-gap")
    report, found = {}, []
    for kind, documents in probes.items():
        ranks = planted_key_ranks(model, documents, args.probe_at, args.probe_gap, args.probe_length,
                                  args.tokens_per_sample, args.memory_query,
                                  args.memory_shift_keys).flatten(2).float()  # (layers, heads, queries)
        share = (ranks < args.knn_k).float().mean(-1)
        found.append(share)
        report[kind] = {"documents": documents.size(0), "median": ranks.median(-1).values.int().tolist(),
                        "found": [[round(v, 3) for v in layer] for layer in share.tolist()]}
    best = torch.stack(found).mean(0).max(-1).values  # per layer: its best head, averaged over the kinds
    return {"key_ranks": report, "key_rank_layer": int(best.argmax())}


if __name__ == "__main__":
    main()
