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
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_memtrm.errors import MemtrmUserError  # noqa: E402


def copy_score(model, passages: torch.Tensor) -> dict:
    """passages: (N, S) token ids. Loss on each copy of ``P P`` (first token of each copy excluded)."""
    span = passages.size(1)
    tokens = torch.cat([passages, passages], dim=1)
    with torch.no_grad():
        logits = model(tokens)[0].float()
    nll = -torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    first = nll[:, : span - 1].mean().item()
    second = nll[:, span:].mean().item()
    return {"first_copy_loss": first, "second_copy_loss": second, "copy_gain": first - second}


def load_passages(data_bin: str, split: str, dictionary, count: int, span: int) -> torch.Tensor:
    from fairseq.data import data_utils

    dataset = data_utils.load_indexed_dataset(os.path.join(data_bin, split), dictionary)
    if dataset is None:
        raise MemtrmUserError(f"no {split} split in {data_bin}; build it with scripts/prepare_data.py")
    stream, needed = [], count * span * 4
    for i in range(len(dataset)):
        stream.append(dataset[i])
        if sum(map(len, stream)) >= needed:
            break
    stream = torch.cat(stream)
    if len(stream) < count * span:
        raise MemtrmUserError(f"{data_bin}/{split} has {len(stream)} tokens; need {count * span}: lower --count/--span")
    stride = len(stream) // count
    return torch.stack([stream[i * stride : i * stride + span] for i in range(count)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data_bin", help="data-bin with dict.txt and the split")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--span", type=int, default=200, help="passage length; 2 x span must fit the model's context")
    parser.add_argument("--count", type=int, default=16, help="passages")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    for path in (args.checkpoint, os.path.join(args.data_bin, "dict.txt")):
        if not os.path.isfile(path):
            raise MemtrmUserError(f"copy_score: no file {path}")

    import fairseq_memtrm  # noqa: F401  (registers the plugin's tasks and models)
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [args.checkpoint], arg_overrides={"data": args.data_bin}
    )
    model = models[0].eval()
    passages = load_passages(args.data_bin, args.split, task.source_dictionary, args.count, args.span)
    result = copy_score(model, passages)
    print(json.dumps({"checkpoint": args.checkpoint, "span": args.span, "passages": args.count,
                      **{k: round(v, 4) for k, v in result.items()}}))


if __name__ == "__main__":
    main()
