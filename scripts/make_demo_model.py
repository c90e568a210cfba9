#!/usr/bin/env python
"""Build the demo's model: the code experiment's memorizing fine-tune, exported.

The demo model is the ``memory`` model of the code corpus experiment
(README "Results", the same scripts): the running
interpreter's standard library, one module = one document. Steps, each reused
when its output exists (``--force`` redoes the training):

1. data: ``scripts/prepare_data.py --stdlib --name pycode`` (SentencePiece 8K,
   indentation kept) -> ``data-bin/pycode`` with ``dict.txt`` and ``spm.model``;
2. ``scripts/train_vanilla.sh``: a vanilla 6 x 256 ``transformer_lm``, trained
   with repeated spans mixed in (``--task repeat_lm``) so that it learns to copy
   from its context, which is what the memory extends;
3. ``scripts/finetune_memory.sh``: ``memorizing_transformer_lm`` from it, with a
   65K memory over whole documents (``--task document_lm``), queried with each
   token's key and keyed by the previous token (``--memory-query key
   --memory-shift-keys``: the variant that gains on code, README "Results");
4. export: fp16 weights without optimizer state, with ``spm.model`` and
   ``dict.txt``, to ``demo/assets/`` (<= 25 MB).

``--checkpoint CKPT --data-bin DIR`` exports an existing fine-tune instead.
The full recipe (3,000 + 1,000 updates) takes about 75 minutes on 2 CPU cores.
"""

import argparse
import logging
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere

logging.basicConfig(format="%(asctime)s | %(levelname)s | make_demo_model | %(message)s", level=logging.INFO)
logger = logging.getLogger("make_demo_model")

MAX_CHECKPOINT_BYTES = 25 * 2**20


def run(command, **env):
    logger.info("$ %s", " ".join(map(str, command)))
    subprocess.run([str(c) for c in command], check=True, cwd=REPO,
                   env={**os.environ, "BIN": os.path.dirname(sys.executable), **env})


def build(args) -> str:
    """Steps 1-3; returns the fine-tuned checkpoint."""
    data_bin = os.path.join(REPO, "data-bin", "pycode")
    run([sys.executable, "scripts/prepare_data.py", "--stdlib", "--name", "pycode", "--dest-dir", "data-bin",
         "--character-coverage", "1.0", "--workers", "2", "--quiet"])
    work = os.path.join(REPO, "checkpoints", "pycode")
    if args.force:
        for step in ("vanilla", "memory-keyq"):
            shutil.rmtree(os.path.join(work, step), ignore_errors=True)
    run(["bash", "scripts/train_vanilla.sh", data_bin, os.path.join(work, "vanilla")],
        MAX_UPDATE=str(args.vanilla_updates), REPEAT_PROB="0.5")
    run(["bash", "scripts/finetune_memory.sh", data_bin, os.path.join(work, "vanilla", "checkpoint_last.pt"),
         os.path.join(work, "memory-keyq"), "--memory-query", "key", "--memory-shift-keys"],
        MAX_UPDATE=str(args.finetune_updates), MEMORY_SIZE=str(args.memory_size))
    return os.path.join(work, "memory-keyq", "checkpoint_last.pt")


def export(checkpoint: str, data_bin: str, assets: str) -> str:
    """fp16 weights, no optimizer state, plus spm.model and dict.txt."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state["model"] = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    state["last_optimizer_state"] = None
    state["extra_state"] = {}
    state["cfg"]["task"]["data"] = "."  # found next to the checkpoint at load time
    state["cfg"]["checkpoint"]["finetune_from_model"] = None
    os.makedirs(assets, exist_ok=True)
    target = os.path.join(assets, "demo_model.pt")
    torch.save(state, target)
    for name in ("spm.model", "dict.txt"):
        shutil.copy(os.path.join(data_bin, name), os.path.join(assets, name))
    size = os.path.getsize(target)
    if size > MAX_CHECKPOINT_BYTES:
        raise SystemExit(f"make_demo_model: {target} is {size / 2**20:.1f} MB, over the 25 MB limit")
    logger.info("wrote %s (%.1f MB) with spm.model and dict.txt", target, size / 2**20)
    return target


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="export this memorizing checkpoint instead of training one")
    parser.add_argument("--data-bin", help="the checkpoint's data-bin (dict.txt, spm.model)")
    parser.add_argument("--assets", default=os.path.join(REPO, "demo", "assets"))
    parser.add_argument("--vanilla-updates", type=int, default=3000)
    parser.add_argument("--finetune-updates", type=int, default=1000)
    parser.add_argument("--memory-size", type=int, default=65536)
    parser.add_argument("--force", action="store_true", help="retrain the vanilla and the fine-tuned model")
    args = parser.parse_args()
    if args.checkpoint:
        if not args.data_bin:
            parser.error("--checkpoint needs --data-bin (where its dict.txt and spm.model are)")
        for path in (args.checkpoint, os.path.join(args.data_bin, "spm.model"), os.path.join(args.data_bin, "dict.txt")):
            if not os.path.isfile(path):
                raise SystemExit(f"make_demo_model: no file {path}")
        checkpoint, data_bin = args.checkpoint, args.data_bin
    else:
        checkpoint, data_bin = build(args), os.path.join(REPO, "data-bin", "pycode")
    export(checkpoint, data_bin, args.assets)


if __name__ == "__main__":
    main()
