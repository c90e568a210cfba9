#!/usr/bin/env python
"""Build the demo's model: a memorizing_transformer_lm_tiny trained on Python code.

The corpus is the Python standard library of the running interpreter (real,
long documents on every machine: one module = one document). Steps, each
skipped when its output exists (``--force`` redoes them):

1. data: the stdlib's ``.py`` files (no tests), split by file into train/valid,
   tokenized by ``scripts/prepare_data.py`` (SentencePiece that keeps
   indentation) into a data-bin holding ``dict.txt`` and ``spm.model``;
2. pretraining: a vanilla ``transformer_lm`` of the tiny shape (4 x 128, 4
   heads), plain LM training on the concatenated code;
3. memory fine-tuning: ``memorizing_transformer_lm_tiny`` from that checkpoint
   (``--finetune-from-model``) with the ``document_lm`` task, which streams
   whole documents so the memory fills and the gate learns to use it;
4. export: fp16 weights without optimizer state, with ``spm.model`` and
   ``dict.txt``, to ``demo/assets/`` (<= 25 MB).

Each training stage stops after its updates or its time cap, whichever comes
first, so the whole script takes at most ~8 minutes on 2 CPU cores.
"""

import argparse
import glob
import logging
import os
import shutil
import subprocess
import sys
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere

logging.basicConfig(format="%(asctime)s | %(levelname)s | make_demo_model | %(message)s", level=logging.INFO)
logger = logging.getLogger("make_demo_model")

MAX_CHECKPOINT_BYTES = 25 * 2**20


def stdlib_documents():
    """The interpreter's own ``.py`` modules, tests and IDLE excluded, sorted."""
    root = os.path.dirname(os.__file__)
    files = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        relative = os.path.relpath(path, root)
        parts = relative.split(os.sep)
        if parts[0] in ("site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo") or any(
            p.startswith("test") for p in parts
        ):
            continue
        files.append(path)
    return root, files


def split_documents(max_train_bytes: int) -> dict:
    """Train/valid file lists: 1 file in 25 is valid; up to ``max_train_bytes`` of train."""
    root, files = stdlib_documents()
    splits = {"train": [], "valid": []}
    budget = {"train": max_train_bytes, "valid": max_train_bytes // 10}
    for path in files:
        split = "valid" if zlib.crc32(os.path.relpath(path, root).encode()) % 25 == 0 else "train"
        size = os.path.getsize(path)
        if size < 4000 or budget[split] < size:  # short files teach the memory little
            continue
        budget[split] -= size
        splits[split].append(path)
    for split, paths in splits.items():
        logger.info("%s: %d modules, %.1f MB", split, len(paths), sum(map(os.path.getsize, paths)) / 1e6)
    return splits


def run(command):
    logger.info("$ %s", " ".join(command[:12]) + (" ..." if len(command) > 12 else ""))
    subprocess.run(command, check=True)


def prepare_data(work: str, vocab_size: int, max_train_bytes: int) -> str:
    splits = split_documents(max_train_bytes)
    run([
        sys.executable, os.path.join(REPO, "scripts", "prepare_data.py"), "--name", "pycode",
        "--dest-dir", work, "--splits", "train,valid", "--vocab-size", str(vocab_size),
        "--character-coverage", "1.0", "--workers", "2", "--quiet",
        "--train", *splits["train"], "--valid", *splits["valid"],
    ])
    return os.path.join(work, "pycode")


TINY_SHAPE = [
    "--decoder-layers", "4", "--decoder-embed-dim", "128", "--decoder-ffn-embed-dim", "512",
    "--decoder-input-dim", "128", "--decoder-output-dim", "128",  # transformer_lm defaults to 512
    "--decoder-attention-heads", "4", "--share-decoder-input-output-embed",
    "--decoder-normalize-before",  # as the memorizing archs (base_lm_architecture); transformer_lm: off
]


def previous_training_hours(checkpoint: str) -> float:
    """Training time a checkpoint has behind it: fairseq carries it into a
    --finetune-from-model run and counts it against --stop-time-hours."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return float((state.get("extra_state") or {}).get("previous_training_time", 0.0)) / 3600


def train(data_bin: str, save_dir: str, stage_args, updates: int, minutes: float, start_hours: float = 0.0) -> str:
    """One fairseq-train run; stops after ``updates`` or ``minutes``, whichever is first."""
    run([
        os.path.join(os.path.dirname(sys.executable), "fairseq-train"), data_bin,
        "--user-dir", os.path.join(REPO, "fairseq_memtrm"), *TINY_SHAPE,
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
        "--dropout", "0.0", "--max-update", str(updates), "--stop-time-hours", f"{start_hours + minutes / 60:.4f}",
        "--save-dir", save_dir, "--no-epoch-checkpoints", "--disable-validation",
        "--log-format", "simple", "--log-interval", "20", "--seed", "1", "--num-workers", "0",
        *(["--cpu"] if not torch_has_cuda() else []), *stage_args,
    ])
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    if not os.path.isfile(checkpoint):
        raise SystemExit(f"make_demo_model: fairseq-train wrote no {checkpoint}")
    return checkpoint


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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
    parser.add_argument("--work-dir", default=os.path.join(REPO, "build", "demo_model"))
    parser.add_argument("--assets", default=os.path.join(REPO, "demo", "assets"))
    parser.add_argument("--max-train-mb", type=float, default=3.0, help="stdlib code to train on")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--tokens-per-sample", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pretrain-updates", type=int, default=300)
    parser.add_argument("--pretrain-minutes", type=float, default=4.0)
    parser.add_argument("--finetune-updates", type=int, default=150)
    parser.add_argument("--finetune-minutes", type=float, default=3.0)
    parser.add_argument("--memory-size", type=int, default=4096)
    parser.add_argument("--force", action="store_true", help="redo every step")
    args = parser.parse_args()

    work = args.work_dir
    if args.force and os.path.isdir(work):
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    data_bin = os.path.join(work, "pycode")
    if not os.path.isfile(os.path.join(data_bin, "spm.model")):
        data_bin = prepare_data(work, args.vocab_size, int(args.max_train_mb * 1e6))

    segments = ["--tokens-per-sample", str(args.tokens_per_sample), "--batch-size", str(args.batch_size)]
    pretrained = os.path.join(work, "pretrain", "checkpoint_last.pt")
    if not os.path.isfile(pretrained):
        pretrained = train(
            data_bin, os.path.join(work, "pretrain"),
            ["--task", "language_modeling", "--sample-break-mode", "none", "--arch", "transformer_lm",
             "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "50", *segments],
            args.pretrain_updates, args.pretrain_minutes,
        )
    finetuned = os.path.join(work, "finetune", "checkpoint_last.pt")
    if not os.path.isfile(finetuned):
        finetuned = train(
            data_bin, os.path.join(work, "finetune"),
            ["--task", "document_lm", "--arch", "memorizing_transformer_lm_tiny",
             "--memory-size", str(args.memory_size), "--knn-k", "32", "--finetune-from-model", pretrained,
             "--lr", "1e-3", "--lr-scheduler", "fixed", *segments],
            args.finetune_updates, args.finetune_minutes, start_hours=previous_training_hours(pretrained),
        )
    export(finetuned, data_bin, args.assets)


if __name__ == "__main__":
    main()
