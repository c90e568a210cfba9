#!/usr/bin/env python
"""Build a kNN-LM datastore (Khandelwal et al. 2020) of a checkpoint over a training split.

Every token of ``--subset`` (default train; never the split you will score) is
read on the same ``document_lm`` segments as at test time, and its final hidden
state is stored with the token that followed it; then a faiss index is built
(flat up to 2M entries, else IVF-PQ; ``--index``). The sizes on disk and in RAM
are logged before any work, and a progress bar runs over the streams. The store
remembers the checkpoint's weights and dictionary: ``eval_testtime.py --methods
knnlm --datastore DIR`` refuses it with any other. See docs/baselines.md.

Example::

    python scripts/build_datastore.py data-bin/books --checkpoint checkpoints/books/vanilla/checkpoint_last.pt \\
        --out datastores/books-vanilla --max-tokens 2000000
"""

import argparse
from pathlib import Path

from fairseq_memtrm.console import configure_logging
from fairseq_memtrm.errors import run_script
from fairseq_memtrm.evaluation import load
from fairseq_memtrm.testtime.knn_lm import build_datastore


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("data", help="data-bin folder (scripts/prepare_data.py) holding the checkpoint's dict.txt")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint whose hidden states are stored")
    parser.add_argument("--out", required=True, help="datastore folder (keys.npy, vals.npy, index.faiss, meta.json)")
    parser.add_argument("--subset", default="train", help="split to store (the test split never belongs here)")
    parser.add_argument("--tokens-per-sample", type=int, default=512, help="segment length, as at test time")
    parser.add_argument("--batch-size", type=int, default=4, help="streams read side by side")
    parser.add_argument("--max-tokens", type=int, default=None, help="store only the first N tokens of the streams")
    parser.add_argument("--index", choices=["auto", "flat", "ivfpq"], default="auto",
                        help="faiss index: flat (exact) or IVF-PQ; auto: flat up to 2M entries")
    parser.add_argument("--nlist", type=int, default=None, help="ivfpq: inverted lists (default ~4 sqrt(N))")
    parser.add_argument("--pq-m", type=int, default=None, help="ivfpq: bytes per compressed key (divides the width)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    parser.add_argument("--log-format", default=None, choices=["tqdm", "simple", "none", "json"])
    parser.add_argument("--log-interval", type=int, default=50, help="batches between progress lines (simple, json)")
    args = parser.parse_args(argv)
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    if args.log_interval < 1:
        parser.error("--log-interval must be at least 1")
    configure_logging()
    model, task = load(args.checkpoint, args.data, args.subset, args.tokens_per_sample, args.batch_size, {},
                       args.cpu)
    build_datastore(model, task, args.subset, Path(args.out), args.tokens_per_sample, args.batch_size, args.index,
                    args.max_tokens, args.nlist, args.pq_m, args.log_format, log_interval=args.log_interval)


if __name__ == "__main__":
    run_script(main, "build_datastore.py")
