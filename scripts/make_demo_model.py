#!/usr/bin/env python
"""Build a demo model: a corpus experiment's memorizing fine-tune, exported.

The demo serves one model per corpus (``demo/assets/code/``, ``demo/assets/books/``),
each a memorizing fine-tune of that corpus's experiment (README "Results", the
same scripts), with the memory options that retrieve best there (docs/demo.md):
code the paper's (a token's query retrieves keys), books the memory that copies
(queried with each token's key and keyed by the previous token: ``--memory-query
key --memory-shift-keys``). Steps, each reused when its output exists (``--force``
redoes the training):

1. data: ``scripts/prepare_data.py`` (SentencePiece 8K) -> ``data-bin/NAME`` with
   ``dict.txt`` and ``spm.model``. code: the running interpreter's standard
   library, one module = one document, indentation kept (``--stdlib``); books:
   the PG-19-layout folder ``--books-dir`` (default ``../shared/data/books``);
2. the vanilla: a 6 x 256 ``transformer_lm`` that copies from its context, which
   is what the memory extends. By default the committed ``demo/assets/CORPUS/vanilla.pt``
   (then step 1 reuses its ``spm.model`` and ``dict.txt``), else ``--vanilla CKPT``;
   without either, or with ``--train-vanilla``, ``scripts/train_vanilla.sh`` trains one
   (books: its two-phase recipe; code: from the committed books vanilla, ``INIT_FROM``,
   3,000 updates: docs/vanilla.md);
3. the fine-tune: ``scripts/run_experiment.sh``'s step for the corpus (code: ``memory``,
   books: ``copying-memory``; ``VANILLA_CKPT`` the vanilla of step 2), so a demo model is
   exactly that experiment's fine-tune, in its folder (``checkpoints/CORPUS/STEP``):
   ``memorizing_transformer_lm`` with a 65K memory over whole documents
   (``--task document_lm``), at the recipe's layer, gates, budget and updates
   (run_experiment.sh and docs/results.md say which and why);
4. export: fp16 weights without optimizer state, with ``spm.model`` and
   ``dict.txt``, to ``demo/assets/CORPUS/`` (<= 25 MB).

``--checkpoint CKPT --data-bin DIR`` exports an existing fine-tune instead.
On 2 CPU cores a vanilla trained here takes about 2.3 hours (books) or 1 hour (code)
(docs/vanilla.md), the fine-tune about 15 minutes.
``--checkpoint CKPT --data-bin DIR --export-vanilla`` exports a vanilla as
``ASSETS/vanilla.pt`` instead, a base model to fine-tune with ``--vanilla``.
"""

import argparse
import logging
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

logging.basicConfig(format="%(asctime)s | %(levelname)s | make_demo_model | %(message)s", level=logging.INFO)
logger = logging.getLogger("make_demo_model")

MAX_CHECKPOINT_BYTES = 25 * 2**20
#: corpus -> data-bin name, the run_experiment.sh step that fine-tunes it (the memory options
#: that retrieve best on the corpus, docs/demo.md), and the environment of train_vanilla.sh when
#: a vanilla is trained here
RECIPES = {
    # code: the paper's memory (query -> keys); copying is slow to appear on the standard library,
    # so a code vanilla starts from the committed books vanilla, its embeddings rebuilt for the
    # code vocabulary (docs/vanilla.md)
    "code": dict(data_bin="code", step="memory",
                 vanilla_env={"INIT_FROM": os.path.join(REPO, "demo", "assets", "books", "vanilla.pt"),
                              "MAX_UPDATE": "3000"}),
    # books: the copying memory (key query, shifted keys)
    "books": dict(data_bin="books", step="copying-memory", vanilla_env={}),
}


def run(command, **env):
    """Run one step; a failed step has said why (its own message, above): stop with its exit code."""
    logger.info("$ %s", " ".join(map(str, command)))
    done = subprocess.run([str(c) for c in command], cwd=REPO,
                          env={**os.environ, "BIN": os.path.dirname(sys.executable), **env})
    if done.returncode != 0:
        logger.error("step %s failed (exit %d): see its message above", os.path.basename(str(command[1])),
                     done.returncode)
        raise SystemExit(done.returncode)


def prepare_data(args, recipe, vocabulary=None) -> str:
    """The corpus's data-bin; with ``vocabulary`` (a folder with spm.model and dict.txt, e.g. a
    vanilla's) it is encoded with that vocabulary instead of a new one."""
    reuse = ["--spm-model", os.path.join(vocabulary, "spm.model"), "--dict", os.path.join(vocabulary, "dict.txt")] \
        if vocabulary else []
    if args.corpus == "code":
        source = ["--stdlib", "--character-coverage", "1.0"]
    else:
        if not os.path.isdir(os.path.join(args.books_dir, "train")):
            raise SystemExit(
                f"make_demo_model: no books at {args.books_dir} (a folder with train/ valid/ test/, one book "
                "per .txt); pass --books-dir DIR"
            )
        source = ["--source-dir", args.books_dir]
    run([sys.executable, "scripts/prepare_data.py", *source, *reuse, "--name", recipe["data_bin"],
         "--dest-dir", "data-bin", "--workers", "2", "--quiet"])
    return os.path.join(REPO, "data-bin", recipe["data_bin"])


def build(args, recipe) -> str:
    """Steps 1-3; returns the fine-tuned checkpoint."""
    vanilla = args.vanilla
    committed = os.path.join(assets_folder(args), "vanilla.pt")
    if vanilla is None and not args.train_vanilla and os.path.isfile(committed):
        vanilla = committed
        logger.info("fine-tuning the committed vanilla %s (--train-vanilla trains one instead)", committed)
    data_bin = prepare_data(args, recipe, os.path.dirname(os.path.abspath(vanilla)) if vanilla else None)
    work = os.path.join(REPO, "checkpoints", recipe["data_bin"])
    if args.force:
        for step in ("vanilla", recipe["step"]):
            shutil.rmtree(os.path.join(work, step), ignore_errors=True)
    if vanilla is None:
        vanilla = os.path.join(work, "vanilla", "checkpoint_last.pt")
        run(["bash", "scripts/train_vanilla.sh", data_bin, os.path.dirname(vanilla)],
            **{**recipe["vanilla_env"], **({"MAX_UPDATE": str(args.vanilla_updates)} if args.vanilla_updates else {})})
    budget = {name: str(value) for name, value in (("FINETUNE_UPDATES", args.finetune_updates),
                                                   ("TRAIN_MEMORY", args.memory_size)) if value is not None}
    run(["bash", "scripts/run_experiment.sh", recipe["data_bin"], data_bin, data_bin],
        STEPS=recipe["step"], VANILLA_CKPT=os.path.abspath(vanilla), CKPT=os.path.dirname(work), **budget)
    return os.path.join(work, recipe["step"], "checkpoint_last.pt")


def assets_folder(args) -> str:
    return args.assets or os.path.join(REPO, "demo", "assets", args.corpus)


def export(checkpoint: str, data_bin: str, assets: str, name: str = "demo_model.pt") -> str:
    """fp16 weights, no optimizer state, plus spm.model and dict.txt, as ``assets/name``."""
    import filecmp

    import torch

    trained_with = os.path.dirname(os.path.abspath(checkpoint))  # the training scripts keep a copy there
    for vocabulary_file in ("spm.model", "dict.txt"):
        kept = os.path.join(trained_with, vocabulary_file)
        if os.path.isfile(kept) and not filecmp.cmp(kept, os.path.join(data_bin, vocabulary_file), shallow=False):
            raise SystemExit(
                f"make_demo_model: {checkpoint} was trained with another {vocabulary_file} than "
                f"{data_bin}/{vocabulary_file} "
                f"(the data-bin was rebuilt with a new vocabulary); export with --data-bin {trained_with}, "
                "or retrain with --force"
            )

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state["model"] = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    state["last_optimizer_state"] = None
    state["extra_state"] = {}
    state["cfg"]["task"]["data"] = "."  # found next to the checkpoint at load time
    state["cfg"]["checkpoint"]["finetune_from_model"] = None
    os.makedirs(assets, exist_ok=True)
    target = os.path.join(assets, name)
    torch.save(state, target + ".part")  # a kill while writing leaves the previous export whole
    os.replace(target + ".part", target)
    for vocabulary_file in ("spm.model", "dict.txt"):
        shutil.copy(os.path.join(data_bin, vocabulary_file), os.path.join(assets, vocabulary_file))
    size = os.path.getsize(target)
    if size > MAX_CHECKPOINT_BYTES:
        raise SystemExit(f"make_demo_model: {target} is {size / 2**20:.1f} MB, over the 25 MB limit")
    logger.info("wrote %s (%.1f MB) with spm.model and dict.txt", target, size / 2**20)
    return target


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=sorted(RECIPES), default="code", help="which demo model to build")
    parser.add_argument("--books-dir", default=os.path.join(os.path.dirname(REPO), "shared", "data", "books"),
                        help="PG-19-layout books folder (train/ valid/ test/) for --corpus books")
    parser.add_argument("--checkpoint", help="export this memorizing checkpoint instead of training one")
    parser.add_argument("--data-bin", help="the checkpoint's data-bin (dict.txt, spm.model)")
    parser.add_argument("--assets", default=None, help="output folder (default: demo/assets/CORPUS)")
    parser.add_argument("--vanilla", help="fine-tune this vanilla checkpoint (default: ASSETS/vanilla.pt, when it exists)")
    parser.add_argument("--train-vanilla", action="store_true",
                        help="train the vanilla with scripts/train_vanilla.sh even when ASSETS/vanilla.pt exists")
    parser.add_argument("--export-vanilla", action="store_true",
                        help="export --checkpoint as ASSETS/vanilla.pt (a base model to fine-tune) instead")
    parser.add_argument("--vanilla-updates", type=int, default=None,
                        help="context-phase updates of the vanilla (default: train_vanilla.sh's)")
    parser.add_argument("--finetune-updates", type=int, default=None,
                        help="updates of the fine-tune (default: run_experiment.sh's FINETUNE_UPDATES)")
    parser.add_argument("--memory-size", type=int, default=None,
                        help="memory size of the fine-tune (default: run_experiment.sh's TRAIN_MEMORY)")
    parser.add_argument("--force", action="store_true", help="redo the fine-tune (and the vanilla, when it is trained here)")
    args = parser.parse_args()
    recipe = RECIPES[args.corpus]
    assets = assets_folder(args)
    if args.checkpoint:
        if not args.data_bin:
            parser.error("--checkpoint needs --data-bin (where its dict.txt and spm.model are)")
        for path in (args.checkpoint, os.path.join(args.data_bin, "spm.model"), os.path.join(args.data_bin, "dict.txt")):
            if not os.path.isfile(path):
                raise SystemExit(f"make_demo_model: no file {path}")
        checkpoint, data_bin = args.checkpoint, args.data_bin
    else:
        checkpoint, data_bin = build(args, recipe), os.path.join(REPO, "data-bin", recipe["data_bin"])
    export(checkpoint, data_bin, assets, "vanilla.pt" if args.export_vanilla else "demo_model.pt")


if __name__ == "__main__":
    main()
