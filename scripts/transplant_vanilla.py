#!/usr/bin/env python
"""Start a vanilla for one vocabulary from a vanilla trained on another.

A ``transformer_lm`` whose attention copies (induction heads) keeps copying when
its token embeddings are replaced: the induction circuit matches a token's
embedding against the embedding written beside an earlier occurrence, and that
match does not depend on which vectors the embeddings are (docs/vanilla.md,
"Code"). So a corpus on which copying is slow to appear can start from a vanilla
that already copies: every weight of ``--from`` is kept, except the (tied) token
embeddings, rebuilt for ``--dict``: a piece that both dictionaries hold keeps its
vector, every other piece takes the vector of a piece that only the source holds,
matched by frequency rank.

    python scripts/transplant_vanilla.py --from demo/assets/books/vanilla.pt \\
        --dict data-bin/code/dict.txt --out checkpoints/code/vanilla/transplanted.pt

The output has no optimizer state; train it with ``--finetune-from-model``
(``INIT_FROM=`` in scripts/train_vanilla.sh does). It is written atomically.
"""

import argparse
import os

import torch

from fairseq_memtrm.errors import MemtrmUserError, run_script

EMBEDDINGS = "decoder.embed_tokens.weight"
OUTPUT_PROJECTION = "decoder.output_projection.weight"  # tied: the same tensor


def transplant(state: dict, source_dict, target_dict) -> int:
    """Rebuild ``state``'s token embeddings for ``target_dict`` in place; returns the
    number of pieces (special symbols included) whose vector was kept."""
    model = state["model"]
    old = model[EMBEDDINGS]
    if old.shape[0] != len(source_dict):
        raise MemtrmUserError(
            f"the checkpoint has {old.shape[0]} token embeddings but its dictionary {len(source_dict)} "
            f"entries; pass the dict.txt it was trained with as --from-dict")
    if OUTPUT_PROJECTION in model and not torch.equal(model[OUTPUT_PROJECTION], old):
        raise MemtrmUserError("the checkpoint's output projection is not tied to its embeddings "
                              "(--share-decoder-input-output-embed); only tied vanillas can be transplanted")
    new = torch.empty(len(target_dict), old.shape[1], dtype=old.dtype)
    fresh = []
    for index, symbol in enumerate(target_dict.symbols):
        source_index = source_dict.indices.get(symbol)
        if source_index is None:
            fresh.append(index)
        else:
            new[index] = old[source_index]
    # The other pieces take the vectors of the source's unused pieces, in frequency order
    # (dict.txt's), one each: trained vectors, not random ones (random ones of the same
    # scale break the copying, docs/vanilla.md); a target with more new pieces than the
    # source has unused ones reuses them from the start (every source piece, if none is unused).
    used = {source_dict.indices[s] for s in target_dict.symbols if s in source_dict.indices}
    spare = [i for i in range(source_dict.nspecial, len(source_dict)) if i not in used] or \
        list(range(source_dict.nspecial, len(source_dict)))
    for n, index in enumerate(fresh):
        new[index] = old[spare[n % len(spare)]]
    model[EMBEDDINGS] = new
    if OUTPUT_PROJECTION in model:
        model[OUTPUT_PROJECTION] = new
    return len(target_dict) - len(fresh)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", required=True, help="vanilla checkpoint that copies")
    parser.add_argument("--from-dict", default=None, help="its dict.txt (default: the one beside --from)")
    parser.add_argument("--dict", required=True, help="dict.txt of the data-bin to train on")
    parser.add_argument("--out", required=True, help="checkpoint to write")
    args = parser.parse_args()

    from fairseq.data import Dictionary

    from fairseq_memtrm.checkpoint_files import require_checkpoint

    source_dict = args.from_dict or os.path.join(os.path.dirname(args.source), "dict.txt")
    for flag, path in (("--from-dict", source_dict), ("--dict", args.dict)):
        if not os.path.isfile(path):
            raise MemtrmUserError(f"{flag} {path} does not exist; pass the dict.txt of the data-bin")
    require_checkpoint(args.source, flag="--from")
    state = torch.load(args.source, map_location="cpu", weights_only=False)  # as saved: plain configs
    if EMBEDDINGS not in state["model"]:
        raise MemtrmUserError(f"--from {args.source} has no {EMBEDDINGS}: pass a transformer_lm checkpoint")
    source, target = Dictionary.load(source_dict), Dictionary.load(args.dict)
    kept = transplant(state, source, target)
    state["last_optimizer_state"] = None
    state["extra_state"] = {}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, args.out)
    print(f"{args.out}: {args.source}'s layers, {kept} of {len(target)} pieces keep their embedding, "
          f"{len(target) - kept} new")


if __name__ == "__main__":
    run_script(main, "transplant_vanilla.py")
