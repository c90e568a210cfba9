"""scripts/prepare_data.py: documents in, a document_lm data-bin out; the text
survives the round trip, bad inputs (binary files too) are skipped or counted,
a second run with the same inputs does nothing, and a rebuild replaces the
data-bin whole or, interrupted, leaves the old one and no temporaries."""

import filecmp
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import sentencepiece as spm
from fairseq.data import Dictionary, data_utils

from fairseq_memtrm.data import DocumentDataset
from fairseq_memtrm.errors import MemtrmUserError

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(os.__file__).parent
spec = importlib.util.spec_from_file_location("prepare_data", REPO / "scripts" / "prepare_data.py")
prepare_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_data)

SOURCES = ["bisect.py", "colorsys.py", "keyword.py", "numbers.py", "stat.py", "this.py"]


def load_split(data_bin: Path, split: str):
    dictionary = Dictionary.load(str(data_bin / "dict.txt"))
    return DocumentDataset(data_utils.load_indexed_dataset(str(data_bin / split), dictionary), split), dictionary


def decode(document, dictionary, processor):
    """A binarized document back to its text lines."""
    lines, pieces = [], []
    for token in document.tolist():
        if token == dictionary.eos():
            lines.append(processor.decode_pieces(pieces))
            pieces = []
        else:
            pieces.append(dictionary[token])
    return lines


def expected_lines(path: Path):
    return [line.expandtabs(4).rstrip() for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A PG-19-style folder of stdlib sources plus an empty, a blank and a non-UTF-8 file."""
    root = tmp_path_factory.mktemp("corpus")
    for split in ("train", "valid", "test"):
        (root / split).mkdir()
    for name in SOURCES[:4]:
        (root / "train" / name).write_text((STDLIB / name).read_text())
    (root / "train" / "empty.txt").write_text("")
    (root / "train" / "blank.txt").write_text("  \n\t\n\n")
    text = (STDLIB / SOURCES[4]).read_bytes()[:3000]
    # three undecodable bytes, and one U+FFFD that is genuine UTF-8 text
    (root / "valid" / "broken.txt").write_bytes(text + b"\nbad \xff\xfe here \xc3\n" + "ok \ufffd\n".encode())
    (root / "test" / SOURCES[5]).write_text((STDLIB / SOURCES[5]).read_text())
    return root


def run_prepare(*argv):
    return Path(prepare_data.main([*map(str, argv), "--quiet"]))


def test_prepare_round_trip_bad_inputs_and_idempotence(corpus, tmp_path, capsys):
    options = ["--source-dir", corpus, "--name", "code", "--dest-dir", tmp_path, "--vocab-size", "300",
               "--character-coverage", "1.0"]
    data_bin = run_prepare(*options)
    stats = json.loads((data_bin / "stats.json").read_text())
    assert stats["train"]["documents"] == 4 and stats["train"]["skipped_empty"] == 2
    assert stats["valid"]["replaced_bytes"] == 3 and stats["test"]["replaced_bytes"] == 0

    processor = spm.SentencePieceProcessor(model_file=str(data_bin / "spm.model"))
    for split in ("train", "valid", "test"):
        documents, dictionary = load_split(data_bin, split)
        assert len(documents) == stats[split]["documents"]
        assert documents.total_tokens() == stats[split]["tokens"]
    documents, dictionary = load_split(data_bin, "train")
    for doc, name in enumerate(SOURCES[:4]):  # sorted file order, empty files skipped
        assert decode(documents[doc], dictionary, processor) == expected_lines(STDLIB / name)

    stamp = (data_bin / "train.bin").stat().st_mtime_ns
    capsys.readouterr()
    assert run_prepare(*options) == data_bin
    assert "up to date" in capsys.readouterr().out
    assert (data_bin / "train.bin").stat().st_mtime_ns == stamp

    # Files copied or synced anew (new times, same bytes) keep it up to date: a rebuild would
    # train another SentencePiece model, and checkpoints on the old one would no longer match.
    for path in (corpus / "train").iterdir():
        os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    assert run_prepare(*options) == data_bin
    assert "up to date" in capsys.readouterr().out
    assert (data_bin / "train.bin").stat().st_mtime_ns == stamp
    # a first-format manifest (path, size, time) is still valid, and is upgraded to content hashes
    args = prepare_data.build_parser().parse_args([*map(str, options), "--quiet"])
    args.splits = ["train", "valid", "test"]
    files = prepare_data.split_files(args)
    manifest = json.loads((data_bin / prepare_data.MANIFEST).read_text())
    legacy = prepare_data.fingerprint(files, args, prepare_data.legacy_file_signature)
    (data_bin / prepare_data.MANIFEST).write_text(json.dumps({**manifest, "fingerprint": legacy}))
    assert run_prepare(*options) == data_bin and "up to date" in capsys.readouterr().out
    upgraded = json.loads((data_bin / prepare_data.MANIFEST).read_text())["fingerprint"]
    assert upgraded == prepare_data.fingerprint(files, args) != legacy
    assert (data_bin / "train.bin").stat().st_mtime_ns == stamp

    # Reusing the SentencePiece model reproduces the dictionary and the binarized split.
    reused = run_prepare("--source-dir", corpus, "--name", "reused", "--dest-dir", tmp_path, "--splits", "valid",
                         "--spm-model", data_bin / "spm.model")
    assert filecmp.cmp(reused / "dict.txt", data_bin / "dict.txt", shallow=False)
    assert filecmp.cmp(reused / "valid.bin", data_bin / "valid.bin", shallow=False)


def test_fingerprint_changes_with_inputs_and_options(corpus, tmp_path):
    args = prepare_data.build_parser().parse_args(["--source-dir", str(corpus), "--name", "x"])
    args.splits = ["train", "valid", "test"]
    files = prepare_data.split_files(args)
    before = prepare_data.fingerprint(files, args)
    assert prepare_data.fingerprint(files, args) == before
    args.vocab_size += 1
    assert prepare_data.fingerprint(files, args) != before
    args.vocab_size -= 1
    target = corpus / "test" / SOURCES[5]
    target.write_text(target.read_text() + "# changed\n")
    assert prepare_data.fingerprint(files, args) != before


def test_missing_split_is_a_clear_error(tmp_path):
    (tmp_path / "books" / "train").mkdir(parents=True)
    (tmp_path / "books" / "train" / "a.txt").write_text("some text\n")
    with pytest.raises(MemtrmUserError, match="split 'valid' is missing"):
        run_prepare("--source-dir", tmp_path / "books", "--name", "x", "--dest-dir", tmp_path)
    with pytest.raises(MemtrmUserError, match="no file matches"):
        run_prepare("--train", tmp_path / "nothing*.txt", "--valid", tmp_path / "books/train/a.txt",
                    "--splits", "train,valid", "--name", "x", "--dest-dir", tmp_path)
    present = tmp_path / "books/train/a.txt"  # exists: only the other flag's file is missing
    for flag, other in (("--spm-model", "--dict"), ("--dict", "--spm-model")):
        with pytest.raises(MemtrmUserError, match=f"{flag} .*missing.model: no such file"):
            run_prepare("--train", present, "--splits", "train", "--name", "y", "--dest-dir", tmp_path,
                        flag, tmp_path / "missing.model", other, present)
    # From the shell: one sentence, no traceback.
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--source-dir",
                             str(tmp_path / "books"), "--name", "x", "--dest-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "split 'valid' is missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_prepared_data_bin_matches_its_stats(prepared_data_bin):
    stats = json.loads((prepared_data_bin / "stats.json").read_text())
    assert (prepared_data_bin / "spm.model").is_file()
    for split in ("train", "valid", "test"):
        documents, dictionary = load_split(prepared_data_bin, split)
        lines = documents.lines
        assert len(documents) == stats[split]["documents"] > 0
        # every binarized token is in a document except the separators between documents
        assert int(lines.sizes.sum()) - documents.num_separators == documents.total_tokens() == stats[split]["tokens"]
        assert documents.num_separators == len(documents) - 1


# ------------------------------------------------ files that are not text, interrupted and atomic rebuilds
def tiny_png() -> bytes:
    """A real 24x24 RGB PNG with noisy pixels."""
    import random
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    noise = random.Random(0)
    rows = b"".join(b"\0" + bytes(noise.randrange(256) for _ in range(24 * 3)) for _ in range(24))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 24, 24, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small_corpus")
    for split, names in (("train", SOURCES[:3]), ("valid", SOURCES[3:4]), ("test", SOURCES[5:6])):
        (root / split).mkdir()
        for name in names:
            (root / split / name).write_text((STDLIB / name).read_text())
    return root


@pytest.fixture(scope="module")
def old_data_bin(small_corpus, tmp_path_factory) -> Path:
    """A complete data-bin, to be copied by tests that rebuild or interrupt a rebuild of it."""
    return run_prepare("--source-dir", small_corpus, "--name", "code", "--dest-dir",
                       tmp_path_factory.mktemp("old"), "--vocab-size", "300", "--character-coverage", "1.0")


def snapshot(folder: Path):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_files_that_are_not_text_are_skipped_named_and_counted(small_corpus, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    (corpus / "train" / "photo.txt").write_bytes(tiny_png())  # a PNG renamed .txt: NUL bytes
    noise = random.Random(1)
    (corpus / "train" / "noise.txt").write_bytes(bytes(noise.randrange(1, 256) for _ in range(4000)))  # no NUL
    # Latin-1 text: a few undecodable bytes (one per accented letter) is still text, replaced and counted
    (corpus / "valid" / "latin1.txt").write_bytes("Un café crème, déjà servi à l'hôtel.\n".encode("latin-1") * 20)
    capsys.readouterr()
    data_bin = run_prepare("--source-dir", corpus, "--name", "code", "--dest-dir", tmp_path / "bin",
                           "--vocab-size", "300", "--character-coverage", "1.0")
    out = capsys.readouterr().out
    assert re.search(r"photo\.txt: not text \(NUL bytes\), skipped", out), out
    assert re.search(r"noise\.txt: not text \(\d+% of its bytes are not UTF-8\), skipped", out), out
    assert "latin1.txt: not text" not in out and re.search(r"latin1\.txt: \d+ undecodable byte", out)
    assert re.search(r"split +docs +tokens +skipped +binary +replaced", out)  # the summary table's column

    stats = json.loads((data_bin / "stats.json").read_text())
    assert stats["train"]["files"] == 5 and stats["train"]["skipped_binary"] == 2
    assert stats["train"]["documents"] == 3 and stats["train"]["replaced_bytes"] == 0
    assert stats["valid"]["skipped_binary"] == 0 and stats["valid"]["documents"] == 2
    assert stats["valid"]["replaced_bytes"] == 20 * 6
    # nothing of the binaries reached SentencePiece (with coverage 1.0, U+FFFD would be a piece)
    # nor the binarized train split: its documents are exactly the three text files
    processor = spm.SentencePieceProcessor(model_file=str(data_bin / "spm.model"))
    assert not any(prepare_data.REPLACEMENT in processor.id_to_piece(i) for i in range(processor.get_piece_size()))
    documents, dictionary = load_split(data_bin, "train")
    assert len(documents) == 3 and documents.total_tokens() == stats["train"]["tokens"]
    for doc, name in enumerate(sorted(SOURCES[:3])):
        assert decode(documents[doc], dictionary, processor) == expected_lines(STDLIB / name)


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_successful_rebuild_replaces_the_data_bin_whole_and_keeps_other_splits(old_data_bin, small_corpus,
                                                                               tmp_path, monkeypatch, swap):
    if swap == "two renames":  # where the system has no atomic exchange (not Linux, some file systems)
        monkeypatch.setattr(prepare_data, "exchange_paths", lambda a, b: False)
    dest_dir = tmp_path / "bins"
    dest = dest_dir / "code"
    shutil.copytree(old_data_bin, dest)
    before, inode = snapshot(dest), dest.stat().st_ino
    old_stats = json.loads((dest / "stats.json").read_text())
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    (corpus / "valid" / "extra.py").write_text((STDLIB / SOURCES[4]).read_text())
    # a valid-only rebuild, reusing the SentencePiece model and dictionary of the data-bin it replaces
    run_prepare("--source-dir", corpus, "--name", "code", "--dest-dir", dest_dir, "--splits", "valid",
                "--spm-model", dest / "spm.model", "--dict", dest / "dict.txt", "--force")

    assert dest.stat().st_ino != inode  # a new folder swapped in, not the old one written over
    assert sorted(os.listdir(dest_dir)) == ["code"]  # no temporary folder left beside it
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]
    after = snapshot(dest)
    for name in ("train.bin", "train.idx", "test.bin", "test.idx", "spm.model", "dict.txt"):
        assert after[name] == before[name], name  # the other splits' files are kept
    assert after["valid.bin"] != before["valid.bin"]
    stats = json.loads((dest / "stats.json").read_text())
    assert stats["train"] == old_stats["train"] and stats["test"] == old_stats["test"]
    assert stats["valid"]["documents"] == 2
    for split in ("train", "valid", "test"):
        documents, _ = load_split(dest, split)
        assert len(documents) == stats[split]["documents"]
        assert documents.total_tokens() == stats[split]["tokens"]


def matching_processes(pattern: str) -> List[str]:
    result = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
    return result.stdout.splitlines()


@pytest.mark.parametrize("signum, stage", [(signal.SIGTERM, "binarizing"), (signal.SIGINT, "encoding")])
def test_interrupted_rebuild_leaves_the_old_data_bin_and_nothing_else(old_data_bin, small_corpus, tmp_path,
                                                                      signum, stage):
    """The process group of a --force rebuild gets SIGTERM while fairseq-preprocess runs (its own
    process group: only prepare_data.py can stop it), or SIGINT as soon as the text is being written."""
    dest_dir = tmp_path / "bins"
    dest = dest_dir / "code"
    shutil.copytree(old_data_bin, dest)
    before, inode = snapshot(dest), dest.stat().st_ino
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    command = [sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--source-dir", str(small_corpus),
               "--name", "code", "--dest-dir", str(dest_dir), "--vocab-size", "200", "--force", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(private_tmp)}
    preprocess = f"fairseq_cli.preprocess.*{dest_dir}"

    def reached() -> bool:
        if stage == "binarizing":
            return bool(matching_processes(preprocess))
        return bool(list(dest_dir.glob(".code.tmp-*/.text-*")))

    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not reached():
                assert process.poll() is None, (
                    f"prepare_data.py ended (exit {process.returncode}) before it reached {stage}; "
                    f"the test could not interrupt it:\n{(tmp_path / 'out').read_text()[-2000:]}")
                assert time.monotonic() < deadline, f"prepare_data.py did not reach {stage} in 240 s"
                time.sleep(0.02)
            os.killpg(process.pid, signum)
            returncode = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    stderr = (tmp_path / "err").read_text()

    assert returncode == 128 + signum, stderr
    name = signal.Signals(signum).name
    assert f"stopped by {name}: {dest} is as it was" in stderr and "Traceback" not in stderr, stderr
    assert snapshot(dest) == before and dest.stat().st_ino == inode  # the old data-bin, byte for byte
    assert sorted(os.listdir(dest_dir)) == ["code"]  # no .code.tmp-* build folder, no .text-* inside it
    assert os.listdir(private_tmp) == []  # no temporary text file
    assert matching_processes(str(dest_dir)) == []  # no orphaned fairseq_cli.preprocess (or other child)
    documents, _ = load_split(dest, "train")
    assert len(documents) == json.loads((dest / "stats.json").read_text())["train"]["documents"]


def test_temporary_folders_of_a_killed_run_are_cleaned_up(tmp_path):
    """After a SIGKILL nothing runs to clean up: the next run removes the build folder and puts back an
    old data-bin that a swap had set aside; a live run's folder is left alone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    dest = tmp_path / "code"
    (tmp_path / f".code.tmp-{dead.pid}-abc").mkdir()
    (tmp_path / f".code.old-{dead.pid}-abc").mkdir()
    (tmp_path / f".code.old-{dead.pid}-abc" / "train.bin").write_bytes(b"old")
    (tmp_path / f".code.tmp-{os.getpid()}-xyz").mkdir()
    (tmp_path / ".other.tmp-1-abc").mkdir()
    prepare_data.clean_stale_staging(str(dest))
    assert sorted(os.listdir(tmp_path)) == [f".code.tmp-{os.getpid()}-xyz", ".other.tmp-1-abc", "code"]
    assert (dest / "train.bin").read_bytes() == b"old"
