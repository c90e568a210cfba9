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
since an empty line is the document separator; tabs become spaces. Files that
are not text (a NUL byte, or over 25% undecodable bytes) are skipped and counted.

The data-bin is built in a hidden folder beside ``DEST/NAME`` and swapped in
only when complete, so an interrupted or failed run leaves the old data-bin as
it was; SIGINT/SIGTERM stop the child processes, remove the temporaries and
exit with 130/143. Rebuilding some ``--splits`` keeps the other splits' files.

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
import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import zlib
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional

import sentencepiece as spm
from tqdm import tqdm

from fairseq_memtrm.console import configure_logging
from fairseq_memtrm.data.encoding import document_lines, line_pieces
from fairseq_memtrm.errors import MemtrmUserError

logger = logging.getLogger("prepare_data")

SPLITS = ("train", "valid", "test")
REPLACEMENT = "\ufffd"
MANIFEST = "prepare.json"
# A file is not text when it holds a NUL byte (no UTF-8 text does; PNG, JPEG, zip, PDF streams, UTF-16
# all do), or when more than this share of its bytes does not decode as UTF-8: random or compressed
# bytes decode ~40% to U+FFFD, while text in a legacy 8-bit encoding (Latin-1 prose: one bad byte per
# accented letter) stays at a few percent and is still kept, its bytes replaced and counted.
BINARY_SHARE = 0.25
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class SplitStats:
    files: int = 0
    documents: int = 0
    tokens: int = 0  # as fairseq sees them: pieces + one </s> per line
    skipped_empty: int = 0
    skipped_binary: int = 0  # files that are not text (see BINARY_SHARE)
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
    """(non-blank lines, number of undecodable bytes replaced by U+FFFD, why the file is not text or None).

    A file that is not text gives no lines."""
    with open(path, "rb") as handle:
        raw = handle.read()
    if b"\0" in raw:
        return [], 0, "not text (NUL bytes)"
    text = raw.decode("utf-8", errors="replace")
    # U+FFFD already present in valid UTF-8 is text, not a replacement.
    replaced = text.count(REPLACEMENT) - raw.count(REPLACEMENT.encode("utf-8"))
    if replaced > BINARY_SHARE * len(raw):
        return [], replaced, f"not text ({replaced / len(raw):.0%} of its bytes are not UTF-8)"
    if max_chars:
        text = text[:max_chars]
    return document_lines(text), replaced, None


# ------------------------------------------------------------ sentencepiece
# SentencePiece trains in a child process: in this one it would hold off SIGINT/SIGTERM until done.
SPM_TRAIN = """
import json, sys
import sentencepiece as spm
options = json.loads(sys.argv[1])
spm.set_random_generator_seed(options.pop("seed"))
try:
    spm.SentencePieceTrainer.train(**options)
except RuntimeError as error:
    sys.exit(f"SentencePiece training failed on the train split: {error}")
"""


def train_spm(files: List[str], args, model_prefix: str, text_dir: str, stage: "Staging") -> None:
    text_path = os.path.join(text_dir, "spm-train.txt")
    with open(text_path, "w", encoding="utf-8") as text:
        for path in tqdm(files, desc="spm text", unit="doc", disable=args.quiet):
            raise_if_stopped()
            text.writelines(line + "\n" for line in read_document(path, args.max_chars_per_doc)[0])
    if os.path.getsize(text_path) == 0:
        raise MemtrmUserError(f"split 'train' has no text to train SentencePiece on ({len(files)} file(s), "
                              "all empty or not text)")
    options = dict(
        seed=args.seed,
        input=text_path,
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
    try:
        result = stage.run([sys.executable, "-c", SPM_TRAIN, json.dumps(options)])
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or [f"exit code {result.returncode}"]
            raise MemtrmUserError(lines[-1] if "SentencePiece" in lines[-1] else
                                  f"SentencePiece training failed on the train split: {lines[-1]}")
    finally:
        os.unlink(text_path)


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
            raise_if_stopped()
            lines, replaced, not_text = read_document(path, args.max_chars_per_doc)
            if not_text:
                logger.warning("%s: %s, skipped", path, not_text)
                stats.skipped_binary += 1
                continue
            stats.replaced_bytes += replaced
            if replaced:
                logger.warning("%s: %d undecodable byte(s) replaced by U+FFFD", path, replaced)
            if not lines:
                logger.warning("%s: empty document, skipped", path)
                stats.skipped_empty += 1
                continue
            if stats.documents:
                out.write("\n")  # the document separator
            for pieces in line_pieces(processor, lines):
                out.write(" ".join(pieces) + "\n")
                stats.tokens += len(pieces) + 1
            stats.documents += 1
    if stats.documents == 0:
        raise MemtrmUserError(f"split {split!r} has no non-empty text document ({len(files)} file(s) read, "
                              f"{stats.skipped_binary} not text)")
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


# ----------------------------------------------------- interruption, staging
class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, so that no ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.outcome = "nothing changed"


# The first SIGINT/SIGTERM, the children to stop with us, and whether raising is held off now.
_STOP = {"signum": None, "children": set(), "deferred": 0}


@contextlib.contextmanager
def stop_signals_raise():
    """While inside, the first SIGINT/SIGTERM stops the child processes and raises ``Interrupted``
    (later ones are ignored, so that the clean-up it triggers runs to the end); the previous
    handlers come back after. Python may run a handler where its exception is lost (an at-fork
    hook, a finalizer): ``raise_if_stopped`` at the steps of the build catches up with it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum, frame):
        if _STOP["signum"] is not None or os.getpid() != owner:  # (a forked child before its exec)
            return
        _STOP["signum"] = signum
        for pid in list(_STOP["children"]):
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGTERM)
        if not _STOP["deferred"]:
            raise Interrupted(signum)

    _STOP["signum"] = None
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        _STOP["signum"] = None


def raise_if_stopped() -> None:
    if _STOP["signum"] is not None:
        raise Interrupted(_STOP["signum"])


@contextlib.contextmanager
def signals_deferred(check: bool = True):
    """A SIGINT/SIGTERM inside this block raises only at its end (``check``) or not at all: for
    steps that must not be cut in two."""
    _STOP["deferred"] += 1
    try:
        yield
    finally:
        _STOP["deferred"] -= 1
    if check:
        raise_if_stopped()


try:
    _PRCTL = ctypes.CDLL(None).prctl  # looked up here: a forked child should not load libraries
except (OSError, AttributeError):
    _PRCTL = None


def _child_setup() -> None:
    """In a child before exec: die with this process, even if it is SIGKILLed (Linux)."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def exchange_paths(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), b)


def staging_prefixes(dest: str):
    """The names of the temporary folders beside DEST: the build (.NAME.tmp-PID-*) and, while two
    plain renames swap them where the atomic exchange is missing, the old data-bin (.NAME.old-PID-*)."""
    name = os.path.basename(dest)
    return f".{name}.tmp-", f".{name}.old-"


def clean_stale_staging(dest: str) -> None:
    """Remove the temporary folders of runs that were killed too hard to clean up (SIGKILL, power
    loss); an old data-bin set aside by an interrupted swap goes back to DEST. Folders of a run
    that is still alive are left alone."""
    parent = os.path.dirname(dest)
    if not os.path.isdir(parent):
        return
    tmp_prefix, old_prefix = staging_prefixes(dest)
    for entry in sorted(os.listdir(parent)):
        prefix = next((p for p in (tmp_prefix, old_prefix) if entry.startswith(p)), None)
        if prefix is None:
            continue
        try:
            pid = int(entry[len(prefix):].split("-")[0])
            os.kill(pid, 0)
            continue  # its run is alive
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        path = os.path.join(parent, entry)
        if prefix == old_prefix and not os.path.lexists(dest):
            logger.warning("%s: an interrupted run left the old data-bin aside; putting it back", dest)
            os.rename(path, dest)
        else:
            logger.info("removing %s, left by an interrupted run", path)
            shutil.rmtree(path, ignore_errors=True)


class Staging:
    """A folder beside DEST (same file system) where the new data-bin is built; ``commit`` swaps it
    in. Leaving the ``with`` block without a commit (an error, SIGINT, SIGTERM) stops the child
    processes and removes the folder: DEST is never half written."""

    def __init__(self, dest: str, shown: Optional[str] = None):
        self.dest = dest
        self.shown = shown or dest  # DEST as the user named it
        self.path: Optional[str] = None
        self.old: Optional[str] = None
        self.children: List[subprocess.Popen] = []
        self.committed = False

    def __enter__(self) -> "Staging":
        with signals_deferred(check=False):  # (a signal raises in the block, where __exit__ cleans up)
            os.makedirs(os.path.dirname(self.dest), exist_ok=True)
            self.path = tempfile.mkdtemp(dir=os.path.dirname(self.dest),
                                         prefix=f"{staging_prefixes(self.dest)[0]}{os.getpid()}-")
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(self.path, 0o777 & ~umask)  # as os.makedirs would make DEST (mkdtemp: owner only)
        return self

    def run(self, command: List[str]) -> subprocess.CompletedProcess:
        """Run ``command`` to its end in its own process group, stopped with us if we are stopped."""
        raise_if_stopped()
        with signals_deferred():  # no Interrupted between the fork and the bookkeeping
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, preexec_fn=_child_setup)
            self.children.append(child)
            _STOP["children"].add(child.pid)
        stdout, stderr = child.communicate()
        self.children.remove(child)
        _STOP["children"].discard(child.pid)
        raise_if_stopped()  # stopped by a signal whose exception Python lost
        return subprocess.CompletedProcess(command, child.returncode, stdout, stderr)

    def commit(self) -> None:
        """Put the finished build at DEST: one atomic exchange with the old data-bin where the
        system has it, else two renames with SIGINT/SIGTERM held off between them; then the old
        data-bin is deleted. A kill at any moment leaves the old or the new data-bin at DEST."""
        raise_if_stopped()
        with signals_deferred():
            if not os.path.lexists(self.dest):
                os.rename(self.path, self.dest)
            elif exchange_paths(self.path, self.dest):
                self.old = self.path  # the old data-bin now sits at the temporary name
            else:
                tmp_prefix, old_prefix = staging_prefixes(self.dest)
                self.old = os.path.join(os.path.dirname(self.path),
                                        os.path.basename(self.path).replace(tmp_prefix, old_prefix, 1))
                os.rename(self.dest, self.old)
                os.rename(self.path, self.dest)
            self.path = None
            self.committed = True
        if self.old:
            shutil.rmtree(self.old, ignore_errors=True)
            self.old = None

    def stop_children(self) -> None:
        for child in list(self.children):
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(child.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    child.communicate(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            self.children.remove(child)
            _STOP["children"].discard(child.pid)

    def __exit__(self, kind, error, traceback) -> None:
        with signals_deferred(check=False):  # a first signal now must not cut the clean-up short
            self.stop_children()
            for path in (self.path, self.old):
                if path:
                    shutil.rmtree(path, ignore_errors=True)
        outcome = (f"the new data-bin is complete at {self.shown}" if self.committed else
                   f"{self.shown} is as it was")
        if isinstance(error, Interrupted):
            error.outcome = outcome
        elif _STOP["signum"] is not None:  # stopped, and the exception was lost or seen as a failure
            stop = Interrupted(_STOP["signum"])
            stop.outcome = outcome
            raise stop


# -------------------------------------------------------------------- main
def binarize(text_dir: str, dest: str, splits, workers: int, stage: Staging) -> None:
    command = [sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
               "--srcdict", os.path.join(dest, "dict.txt"), "--destdir", dest,
               "--dataset-impl", "mmap", "--workers", str(workers)]
    for split in splits:
        command += [f"--{split}pref", os.path.join(text_dir, split)]
    logger.info("binarizing: %s", " ".join(command))
    result = stage.run(command)
    if result.returncode != 0:
        raise MemtrmUserError(f"fairseq-preprocess failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def report(stats: Dict[str, dict]) -> None:
    logger.info("%-6s %6s %10s %8s %7s %9s", "split", "docs", "tokens", "skipped", "binary", "replaced")
    for split, row in stats.items():
        logger.info("%-6s %6d %10d %8d %7d %9d", split, row["documents"], row["tokens"],
                    row["skipped_empty"], row.get("skipped_binary", 0), row["replaced_bytes"])


def check_given_files(args) -> None:
    """--spm-model and --dict name existing files (checked before anything reads them)."""
    for flag, path in (("--spm-model", args.spm_model), ("--dict", args.dict)):
        if path and not os.path.isfile(path):
            raise MemtrmUserError(f"{flag} {path}: no such file")


def copy_given_file(path: str, dest_path: str) -> None:
    """Take a given --spm-model or --dict into the data-bin."""
    if os.path.abspath(path) != os.path.abspath(dest_path):
        shutil.copyfile(path, dest_path)


def split_outputs(split: str):
    return [f"{split}.bin", f"{split}.idx", f"{split}.txt"]


def carry_over(old: str, new: str, splits) -> Dict[str, dict]:
    """Take into the new build what the old data-bin holds besides this run's outputs, chiefly the
    splits not rebuilt (``--splits valid`` keeps train.*): hard links where possible (nothing
    writes to them, and they are not copied twice over a large train.bin); their rows of the old
    stats.json are returned. spm.vocab goes, it describes the replaced spm.model."""
    if not os.path.isdir(old):
        return {}
    rebuilt = {"spm.model", "spm.vocab", "dict.txt", "stats.json", MANIFEST}
    rebuilt.update(name for split in splits for name in split_outputs(split))
    kept = []
    for entry in sorted(os.listdir(old)):
        raise_if_stopped()
        source, target = os.path.join(old, entry), os.path.join(new, entry)
        if entry in rebuilt or entry.startswith(".") or os.path.islink(source):
            continue
        if os.path.isdir(source):
            shutil.copytree(source, target, copy_function=link_or_copy)
        elif entry == "preprocess.log":
            shutil.copy2(source, target)  # fairseq-preprocess appends to it
        else:
            link_or_copy(source, target)
        kept.append(entry)
    if set(kept) - {"preprocess.log"}:
        logger.info("kept from the old %s: %s", old, " ".join(kept))
    try:
        with open(os.path.join(old, "stats.json")) as handle:
            old_stats = json.load(handle)
    except (OSError, ValueError):
        return {}
    return {split: row for split, row in old_stats.items()
            if split not in splits and all(f"{split}.{ext}" in kept for ext in ("bin", "idx"))}


def link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def prepare(args) -> str:
    """Builds ``DEST/NAME``; returns its path."""
    files = split_files(args)
    check_given_files(args)
    dest = os.path.join(args.dest_dir, args.name)
    manifest_path = os.path.join(dest, MANIFEST)
    key = fingerprint(files, args)
    clean_stale_staging(os.path.realpath(dest))
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
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise MemtrmUserError(f"{dest} exists and is not a folder; remove it or choose another --name")
    if os.path.isfile(os.path.join(dest, "spm.model")) and not args.spm_model:
        logger.warning(
            "rebuilding %s with a newly trained SentencePiece model: checkpoints trained on its old "
            "spm.model/dict.txt will not match it (to keep them, rebuild with --spm-model and --dict "
            "from a copy of the old ones)", dest,
        )

    # Built beside DEST (a symbolic link is followed: the build lands on the target's file system).
    with Staging(os.path.realpath(dest), dest) as stage:
        stats = build(stage, dest, files, key, args)
        stage.commit()
    report(stats)
    logger.info("wrote %s", dest)
    return dest


def build(stage: Staging, dest: str, files: Dict[str, List[str]], key: str, args) -> Dict[str, dict]:
    """The whole data-bin in ``stage.path``; returns the stats of the rebuilt splits."""
    work = stage.path
    kept_stats = carry_over(dest, work, list(files))
    text_dir = tempfile.mkdtemp(dir=work, prefix=".text-")
    spm_path = os.path.join(work, "spm.model")
    if args.spm_model:
        copy_given_file(args.spm_model, spm_path)
    else:
        logger.info("training SentencePiece (vocab %d) on %d train document(s)", args.vocab_size, len(files["train"]))
        train_spm(files["train"], args, os.path.join(work, "spm"), text_dir, stage)
    processor = spm.SentencePieceProcessor(model_file=spm_path)
    dict_path = os.path.join(work, "dict.txt")
    if args.dict:
        copy_given_file(args.dict, dict_path)
    else:
        write_fairseq_dict(processor, dict_path)
    logger.info("SentencePiece model: %d pieces", processor.get_piece_size())

    stats = {}
    for split in files:
        stats[split] = asdict(encode_split(processor, split, files[split], os.path.join(text_dir, split), args))
    if args.keep_text:
        for split in files:
            shutil.copyfile(os.path.join(text_dir, split), os.path.join(work, f"{split}.txt"))
    binarize(text_dir, work, list(files), args.workers, stage)
    shutil.rmtree(text_dir)

    with open(os.path.join(work, "stats.json"), "w") as handle:
        json.dump({**kept_stats, **stats}, handle, indent=2)
    with open(os.path.join(work, MANIFEST), "w") as handle:
        json.dump({"fingerprint": key, "stats": stats}, handle, indent=2)
    return stats


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
    configure_logging()
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
    with stop_signals_raise():
        try:
            dest = prepare(args)
            if _STOP["signum"] is not None:  # a signal whose exception Python lost, after the swap
                stop = Interrupted(_STOP["signum"])
                stop.outcome = f"the new data-bin is complete at {dest}"
                raise stop
            return dest
        except Interrupted as stop:
            name = signal.Signals(stop.signum).name
            print(f"prepare_data.py: stopped by {name}: {stop.outcome}; child processes and temporary "
                  "files removed", file=sys.stderr, flush=True)
            raise SystemExit(128 + stop.signum)


if __name__ == "__main__":
    main()
