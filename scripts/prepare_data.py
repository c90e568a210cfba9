#!/usr/bin/env python
"""Turn a folder of documents into a ``data-bin`` for ``--task document_lm``.

Input, one document per file, either
  * a PG-19-style folder with ``train/ valid/ test/`` (``--source-dir``), or
  * files, folders or globs per split (``--train/--valid/--test``), e.g. the
    Python standard library's ``*.py`` files as a code corpus.

Steps: train a SentencePiece model on the train split (or reuse
``--spm-model``), encode every document one text line per output line, separate
documents by an empty line, and binarize with ``fairseq-preprocess
--only-source`` into ``DEST/NAME`` (which also keeps ``spm.model``,
``dict.txt`` and ``stats.json``). Blank lines inside a document are dropped,
since an empty line is the document separator; tabs become spaces.

Running it again with the same inputs and options does nothing
("up to date"); ``--force`` rebuilds.

Examples::

    python scripts/prepare_data.py --source-dir ../shared/data/books --name books
    python scripts/prepare_data.py --stdlib --name pycode
    python scripts/prepare_data.py --name mycode \\
        --train "$(python -c 'import os;print(os.path.dirname(os.__file__))')/[a-m]*.py" \\
        --valid ".../[n-r]*.py" --test ".../[s-z]*.py"
"""

import argparse
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional

import sentencepiece as spm
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fairseq_memtrm.errors import MemtrmUserError  # noqa: E402

logger = logging.getLogger("prepare_data")

SPLITS = ("train", "valid", "test")
REPLACEMENT = "\ufffd"
MANIFEST = "prepare.json"


@dataclass
class SplitStats:
    files: int = 0
    documents: int = 0
    tokens: int = 0  # as fairseq sees them: pieces + one </s> per line
    skipped_empty: int = 0
    replaced_bytes: int = 0


# ---------------------------------------------------------------- inputs
STDLIB_SKIP = ("site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo", "pydoc_data")


def stdlib_split(min_bytes: int = 4000) -> Dict[str, List[str]]:
    """The running interpreter's own ``.py`` modules as a code corpus, one module
    one document, split by file: a hash of the path sends 1 in 20 to test and 1
    in 20 to valid (the same on every machine with the same Python). Tests,
    IDLE, vendored packages, pydoc's topic text and files under ``min_bytes``
    are left out."""
    root = os.path.dirname(os.__file__)
    splits: Dict[str, List[str]] = {split: [] for split in SPLITS}
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        parts = os.path.relpath(path, root).split(os.sep)
        if parts[0] in STDLIB_SKIP or any(p.startswith("test") for p in parts) or os.path.getsize(path) < min_bytes:
            continue
        bucket = zlib.crc32("/".join(parts).encode()) % 20
        splits["test" if bucket == 0 else "valid" if bucket == 1 else "train"].append(path)
    return splits


def split_files(args) -> Dict[str, List[str]]:
    """The input files of every requested split, sorted; a missing split is an error."""
    files: Dict[str, List[str]] = {}
    stdlib = stdlib_split() if args.stdlib else None
    for split in args.splits:
        if stdlib is not None:
            patterns = stdlib[split]
        elif args.source_dir:
            folder = os.path.join(args.source_dir, split)
            if not os.path.isdir(folder):
                raise MemtrmUserError(
                    f"split {split!r} is missing: no folder {folder}; a --source-dir needs "
                    f"{'/ '.join(args.splits)}/ subfolders, one document per file (or choose --splits)"
                )
            patterns = [folder]
        else:
            patterns = getattr(args, split) or []
            if not patterns:
                raise MemtrmUserError(
                    f"split {split!r} is missing: pass --{split} FILE_OR_GLOB ... (or choose --splits)"
                )
        found = sorted({path for pattern in patterns for path in expand(pattern)})
        if not found:
            raise MemtrmUserError(f"split {split!r}: no file matches {' '.join(patterns)}")
        files[split] = found[: args.max_docs_per_split] if args.max_docs_per_split else found
    return files


def expand(pattern: str) -> Iterator[str]:
    """Files named by a path, a folder (recursively, hidden files skipped) or a glob."""
    paths = [pattern] if os.path.exists(pattern) else glob.glob(os.path.expanduser(pattern), recursive=True)
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                yield from (os.path.join(root, n) for n in names if not n.startswith("."))
        elif os.path.isfile(path):
            yield path


def read_document(path: str, max_chars: Optional[int]):
    """(non-blank lines, number of undecodable bytes replaced by U+FFFD)."""
    with open(path, "rb") as handle:
        raw = handle.read()
    text = raw.decode("utf-8", errors="replace")
    # U+FFFD already present in valid UTF-8 is text, not a replacement.
    replaced = text.count(REPLACEMENT) - raw.count(REPLACEMENT.encode("utf-8"))
    if max_chars:
        text = text[:max_chars]
    lines = [line.expandtabs(4).rstrip() for line in text.splitlines()]
    return [line for line in lines if line.strip()], replaced


# ------------------------------------------------------------ sentencepiece
def train_spm(files: List[str], args, model_prefix: str) -> None:
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as text:
        for path in tqdm(files, desc="spm text", unit="doc", disable=args.quiet):
            text.writelines(line + "\n" for line in read_document(path, args.max_chars_per_doc)[0])
    spm.set_random_generator_seed(args.seed)
    try:
        spm.SentencePieceTrainer.train(
            input=text.name,
            model_prefix=model_prefix,
            vocab_size=args.vocab_size,
            model_type="unigram",
            character_coverage=args.character_coverage,
            # Keep runs of spaces: code indentation is meaning, not noise.
            remove_extra_whitespaces=False,
            # A small corpus may support fewer pieces than asked for.
            hard_vocab_limit=False,
            input_sentence_size=args.spm_sample_lines,
            shuffle_input_sentence=True,
            num_threads=args.workers,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise MemtrmUserError(f"SentencePiece training failed on the train split: {error}")
    finally:
        os.unlink(text.name)


def write_fairseq_dict(processor: spm.SentencePieceProcessor, path: str) -> None:
    """fairseq's dict.txt from the SentencePiece vocabulary, in piece-id order,
    so that every piece of every split is known (no <unk> from a small train split)."""
    with open(path, "w", encoding="utf-8") as out:
        size = processor.get_piece_size()
        for piece_id in range(size):
            if processor.is_control(piece_id) or processor.is_unknown(piece_id):
                continue
            out.write(f"{processor.id_to_piece(piece_id)} {size - piece_id}\n")


def encode_split(processor, split: str, files: List[str], out_path: str, args) -> SplitStats:
    stats = SplitStats(files=len(files))
    with open(out_path, "w", encoding="utf-8") as out:
        for path in tqdm(files, desc=f"encode {split}", unit="doc", disable=args.quiet):
            lines, replaced = read_document(path, args.max_chars_per_doc)
            stats.replaced_bytes += replaced
            if replaced:
                logger.warning("%s: %d undecodable byte(s) replaced by U+FFFD", path, replaced)
            if not lines:
                logger.warning("%s: empty document, skipped", path)
                stats.skipped_empty += 1
                continue
            if stats.documents:
                out.write("\n")  # the document separator
            for pieces in processor.encode(lines, out_type=str):
                # A piece can hold exotic whitespace that fairseq would split on.
                pieces = [p for piece in pieces for p in piece.split()]
                out.write(" ".join(pieces) + "\n")
                stats.tokens += len(pieces) + 1
            stats.documents += 1
    if stats.documents == 0:
        raise MemtrmUserError(f"split {split!r} has no non-empty document ({len(files)} file(s) read)")
    return stats


# ------------------------------------------------------------- idempotence
def fingerprint(files: Dict[str, List[str]], args, signature=None) -> str:
    """Hash of every input (path, size and content) and every option that changes the output.

    Content, not modification time: a data folder copied or synced anew with the same
    books must not trigger a rebuild, since a retrained SentencePiece model is not the
    same model, and checkpoints trained on the old one would no longer match."""
    signature = signature or file_signature
    digest = hashlib.sha256()
    options = {k: getattr(args, k) for k in (
        "vocab_size", "character_coverage", "max_chars_per_doc", "spm_sample_lines", "seed")}
    for name in ("spm_model", "dict"):
        path = getattr(args, name)
        options[name] = signature(path) if path else None
    digest.update(json.dumps(options, sort_keys=True).encode())
    for split in sorted(files):
        for path in files[split]:
            digest.update(json.dumps([split, signature(path)]).encode())
    return digest.hexdigest()


def file_signature(path: str):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return [os.path.abspath(path), os.path.getsize(path), digest.hexdigest()]


def legacy_file_signature(path: str):
    """The first manifests' signature (path, size, mtime): still read, so that their data-bins stay valid."""
    status = os.stat(path)
    return [os.path.abspath(path), status.st_size, status.st_mtime_ns]


def outputs_present(dest: str, splits) -> bool:
    needed = ["dict.txt", "spm.model"] + [f"{s}.{ext}" for s in splits for ext in ("bin", "idx")]
    return all(os.path.isfile(os.path.join(dest, name)) for name in needed)


# -------------------------------------------------------------------- main
def binarize(text_dir: str, dest: str, splits, workers: int) -> None:
    command = [sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
               "--srcdict", os.path.join(dest, "dict.txt"), "--destdir", dest,
               "--dataset-impl", "mmap", "--workers", str(workers)]
    for split in splits:
        command += [f"--{split}pref", os.path.join(text_dir, split)]
    logger.info("binarizing: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise MemtrmUserError(f"fairseq-preprocess failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def report(stats: Dict[str, dict]) -> None:
    logger.info("%-6s %6s %10s %8s %9s", "split", "docs", "tokens", "skipped", "replaced")
    for split, row in stats.items():
        logger.info("%-6s %6d %10d %8d %9d", split, row["documents"], row["tokens"],
                    row["skipped_empty"], row["replaced_bytes"])


def check_given_files(args) -> None:
    """--spm-model and --dict name existing files (checked before anything reads them)."""
    for flag, path in (("--spm-model", args.spm_model), ("--dict", args.dict)):
        if path and not os.path.isfile(path):
            raise MemtrmUserError(f"{flag} {path}: no such file")


def copy_given_file(path: str, dest_path: str) -> None:
    """Take a given --spm-model or --dict into the data-bin."""
    if os.path.abspath(path) != os.path.abspath(dest_path):
        shutil.copyfile(path, dest_path)


def prepare(args) -> str:
    """Builds ``DEST/NAME``; returns its path."""
    files = split_files(args)
    check_given_files(args)
    dest = os.path.join(args.dest_dir, args.name)
    manifest_path = os.path.join(dest, MANIFEST)
    key = fingerprint(files, args)
    if not args.force and os.path.isfile(manifest_path) and outputs_present(dest, files):
        with open(manifest_path) as handle:
            manifest = json.load(handle)
        stored = manifest.get("fingerprint")
        if stored == key or stored == fingerprint(files, args, legacy_file_signature):
            if stored != key:  # a first-format manifest: keep it valid when the files' times change
                with open(manifest_path, "w") as handle:
                    json.dump({**manifest, "fingerprint": key}, handle, indent=2)
            logger.info("%s is up to date (same inputs and options); --force rebuilds it", dest)
            report(manifest["stats"])
            return dest
    if "train" not in files and not args.spm_model:
        raise MemtrmUserError("without a train split, pass --spm-model (and --dict) to encode with")
    if os.path.isfile(os.path.join(dest, "spm.model")) and not args.spm_model:
        logger.warning(
            "rebuilding %s with a newly trained SentencePiece model: checkpoints trained on its old "
            "spm.model/dict.txt will not match it (to keep them, rebuild with --spm-model and --dict "
            "from a copy of the old ones)", dest,
        )
    os.makedirs(dest, exist_ok=True)
    if os.path.exists(manifest_path):
        os.unlink(manifest_path)  # a crash below must not leave a stale "up to date"

    spm_path = os.path.join(dest, "spm.model")
    if args.spm_model:
        copy_given_file(args.spm_model, spm_path)
    else:
        logger.info("training SentencePiece (vocab %d) on %d train document(s)", args.vocab_size, len(files["train"]))
        train_spm(files["train"], args, os.path.join(dest, "spm"))
    processor = spm.SentencePieceProcessor(model_file=spm_path)
    dict_path = os.path.join(dest, "dict.txt")
    if args.dict:
        copy_given_file(args.dict, dict_path)
    else:
        write_fairseq_dict(processor, dict_path)
    logger.info("SentencePiece model: %d pieces", processor.get_piece_size())

    stats = {}
    with tempfile.TemporaryDirectory(dir=dest, prefix=".text-") as text_dir:
        for split in files:
            stats[split] = asdict(encode_split(processor, split, files[split], os.path.join(text_dir, split), args))
        if args.keep_text:
            for split in files:
                shutil.copyfile(os.path.join(text_dir, split), os.path.join(dest, f"{split}.txt"))
        binarize(text_dir, dest, list(files), args.workers)

    with open(os.path.join(dest, "stats.json"), "w") as handle:
        json.dump(stats, handle, indent=2)
    with open(manifest_path, "w") as handle:
        json.dump({"fingerprint": key, "stats": stats}, handle, indent=2)
    report(stats)
    logger.info("wrote %s", dest)
    return dest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("input (one of)")
    source.add_argument("--source-dir", help="folder with train/ valid/ test/, one document per file")
    source.add_argument("--stdlib", action="store_true",
                        help="this Python's standard library .py modules (tests excluded), split by file "
                        "(1 in 20 test, 1 in 20 valid): a code corpus on every machine")
    for split in SPLITS:
        source.add_argument(f"--{split}", nargs="+", metavar="FILE_OR_GLOB",
                            help=f"files, folders or globs of the {split} split")
    parser.add_argument("--name", required=True, help="output folder name under --dest-dir")
    parser.add_argument("--dest-dir", default="data-bin", help="parent of the output folder")
    parser.add_argument("--splits", default="train,valid,test", help="comma-separated splits to build")
    parser.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece vocabulary size (at most)")
    parser.add_argument("--character-coverage", type=float, default=0.9995,
                        help="SentencePiece character coverage; rarer characters become <unk>")
    parser.add_argument("--spm-model", help="reuse this SentencePiece model instead of training one")
    parser.add_argument("--dict", help="reuse this fairseq dict.txt (e.g. a checkpoint's data-bin); "
                        "default: built from the SentencePiece vocabulary")
    parser.add_argument("--max-docs-per-split", type=int, default=0, help="keep the first N files per split (0: all)")
    parser.add_argument("--max-chars-per-doc", type=int, default=0, help="truncate every document (0: whole)")
    parser.add_argument("--spm-sample-lines", type=int, default=2_000_000,
                        help="lines SentencePiece samples from the train split")
    parser.add_argument("--seed", type=int, default=1, help="SentencePiece sampling seed")
    parser.add_argument("--workers", type=int, default=1, help="processes for SentencePiece and fairseq-preprocess")
    parser.add_argument("--keep-text", action="store_true", help="also keep the encoded SPLIT.txt files")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> str:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        level=logging.INFO, stream=sys.stdout, force=True)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.splits = [s for s in args.splits.split(",") if s]
    unknown = [s for s in args.splits if s not in SPLITS]
    if unknown:
        parser.error(f"--splits: unknown {unknown}; choose among {','.join(SPLITS)}")
    if bool(args.source_dir) + bool(args.stdlib) + any(getattr(args, s) for s in SPLITS) != 1:
        parser.error("give one of --source-dir, --stdlib or --train/--valid/--test files")
    if args.vocab_size < 10:
        parser.error("--vocab-size must be at least 10")
    return prepare(args)


if __name__ == "__main__":
    main()
