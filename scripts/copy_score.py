#!/usr/bin/env python
"""Does a checkpoint copy from its context? The precondition of a kNN memory.

A kNN memory extends attention to the distant past; it can only help where the
model's attention already retrieves earlier tokens (induction heads). This
script takes passages of real text from a data-bin split, shows each passage
twice in one context (``P P``), and reports the mean loss (nats/token) on the
first and on the second copy. A model that copies predicts the second copy far
better; one that does not scores both alike, and memory will not help it.

    python scripts/copy_score.py CHECKPOINT DATA_BIN [--split valid] [--span 200]

Works for plain ``transformer_lm`` and plugin checkpoints (memory unused: one
segment, no memory bound). Prints one JSON line.
"""

import argparse
import json
import logging
import os


from fairseq_memtrm.diagnostics import copy_score, induction_scores, load_passages
from fairseq_memtrm.errors import MemtrmUserError


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
    args = parser.parse_args()
    logging.disable(logging.INFO)
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
    print(json.dumps({"checkpoint": args.checkpoint, "span": args.span, "passages": args.count,
                      **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}}))


if __name__ == "__main__":
    main()
