#!/usr/bin/env python
"""Build the demo's model: a memorizing_transformer_lm_tiny trained on Python code.

The corpus is the Python standard library of the running interpreter (real,
long documents on every machine: one module = one document). Steps, each
skipped when its output exists (``--force`` redoes them):

1. corpus: the stdlib's ``.py`` files (no tests), split by file into train/valid;
2. tokenizer: a SentencePiece model that keeps indentation (identity
   normalisation, whitespace kept), then ``fairseq-preprocess`` into a data-bin
   holding ``dict.txt`` and ``spm.model``;
3. pretraining: plain LM training (fairseq ``language_modeling``, no document
   structure, so the memory stays empty and the layer is local attention);
4. memory fine-tuning: ``--finetune-from-model`` with the ``document_lm`` task,
   which streams whole documents so the memory fills and the gate learns;
5. export: fp16 weights without optimizer state, with ``spm.model`` and
   ``dict.txt``, to ``demo/assets/`` (<= 25 MB).

About 8 minutes on 2 CPU cores in all; ``--pretrain-updates`` and
``--finetune-updates`` trade time for quality.
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


def write_corpus(work: str, max_train_bytes: int) -> dict:
    """Copy documents into ``work/corpus/{train,valid}/``; 1 in 25 files is valid."""
    root, files = stdlib_documents()
    splits = {"train": [], "valid": []}
    budget = {"train": max_train_bytes, "valid": max_train_bytes // 20}
    for path in files:
        relative = os.path.relpath(path, root)
        split = "valid" if zlib.crc32(relative.encode()) % 25 == 0 else "train"
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            continue
        if len(text) < 2000 or budget[split] < len(text):  # short files teach the memory nothing
            continue
        budget[split] -= len(text)
        splits[split].append((relative.replace(os.sep, "__"), text))
    for split, documents in splits.items():
        os.makedirs(os.path.join(work, "corpus", split), exist_ok=True)
        for name, text in documents:
            with open(os.path.join(work, "corpus", split, name), "w", encoding="utf-8") as f:
                f.write(text)
        logger.info("%s: %d documents, %.1f MB", split, len(documents), sum(len(t) for _, t in documents) / 1e6)
    return splits


def run(command):
    logger.info("$ %s", " ".join(command))
    subprocess.run(command, check=True)


def binarize_with_sentencepiece(work: str, vocab_size: int) -> str:
    """SentencePiece + fairseq-preprocess; documents are separated by an empty line."""
    import sentencepiece

    data_bin = os.path.join(work, "data-bin")
    train_text = os.path.join(work, "corpus", "train.txt")
    for split in ("train", "valid"):
        with open(os.path.join(work, "corpus", f"{split}.txt"), "w", encoding="utf-8") as out:
            for name in sorted(os.listdir(os.path.join(work, "corpus", split))):
                with open(os.path.join(work, "corpus", split, name), encoding="utf-8") as f:
                    out.write("\n".join(line for line in f.read().splitlines() if line.strip()) + "\n\n")
    sentencepiece.SentencePieceTrainer.train(
        input=train_text,
        model_prefix=os.path.join(work, "spm"),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        normalization_rule_name="identity",  # code: keep every character as written
        remove_extra_whitespaces=False,  # ... and its indentation
        split_digits=True,
        byte_fallback=True,
        input_sentence_size=300000,
        shuffle_input_sentence=True,
        num_threads=2,
        minloglevel=1,
    )
    processor = sentencepiece.SentencePieceProcessor(model_file=os.path.join(work, "spm.model"))
    for split in ("train", "valid"):
        with open(os.path.join(work, "corpus", f"{split}.txt"), encoding="utf-8") as f, open(
            os.path.join(work, f"{split}.spm"), "w", encoding="utf-8"
        ) as out:
            for line in f:
                out.write(" ".join(processor.encode(line.rstrip("\n"), out_type=str)) + "\n")
    run([
        os.path.join(os.path.dirname(sys.executable), "fairseq-preprocess"), "--only-source",
        "--trainpref", os.path.join(work, "train.spm"), "--validpref", os.path.join(work, "valid.spm"),
        "--destdir", data_bin, "--workers", "2",
    ])
    shutil.copy(os.path.join(work, "spm.model"), os.path.join(data_bin, "spm.model"))
    return data_bin


def train(data_bin: str, save_dir: str, task_args, updates: int, extra) -> str:
    command = [
        os.path.join(os.path.dirname(sys.executable), "fairseq-train"), data_bin,
        "--user-dir", os.path.join(REPO, "fairseq_memtrm"), "--arch", "memorizing_transformer_lm_tiny",
        "--cpu", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "100", "--dropout", "0.0",
        "--max-update", str(updates), "--save-dir", save_dir, "--no-epoch-checkpoints",
        "--save-interval-updates", str(updates), "--keep-interval-updates", "1",
        "--log-format", "simple", "--log-interval", "25", "--seed", "1",
        "--num-workers", "0", "--stop-time-hours", "0.1",
    ] + task_args + extra
    run(command)
    return os.path.join(save_dir, "checkpoint_last.pt")


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
    parser.add_argument("--max-train-mb", type=float, default=4.0, help="stdlib code to train on")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--tokens-per-sample", type=int, default=256)
    parser.add_argument("--pretrain-updates", type=int, default=600)
    parser.add_argument("--finetune-updates", type=int, default=300)
    parser.add_argument("--memory-size", type=int, default=4096)
    parser.add_argument("--force", action="store_true", help="redo every step")
    args = parser.parse_args()

    work = args.work_dir
    if args.force and os.path.isdir(work):
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    if not os.path.isdir(os.path.join(work, "corpus", "train")):
        write_corpus(work, int(args.max_train_mb * 1e6))
    data_bin = os.path.join(work, "data-bin")
    if not os.path.isfile(os.path.join(data_bin, "spm.model")):
        data_bin = binarize_with_sentencepiece(work, args.vocab_size)

    tokens = ["--tokens-per-sample", str(args.tokens_per_sample), "--memory-size", str(args.memory_size)]
    pretrained = os.path.join(work, "pretrain", "checkpoint_last.pt")
    if not os.path.isfile(pretrained):
        pretrained = train(
            data_bin, os.path.join(work, "pretrain"),
            ["--task", "language_modeling", "--sample-break-mode", "none", "--batch-size", "16"] + tokens,
            args.pretrain_updates, ["--lr", "2e-3"],
        )
    finetuned = os.path.join(work, "finetune", "checkpoint_last.pt")
    if not os.path.isfile(finetuned):
        finetuned = train(
            data_bin, os.path.join(work, "finetune"),
            ["--task", "document_lm", "--batch-size", "8"] + tokens,
            args.finetune_updates, ["--lr", "1e-3", "--finetune-from-model", pretrained],
        )
    export(finetuned, data_bin, args.assets)


if __name__ == "__main__":
    main()
