"""scripts/prepare_data.py: documents in, a document_lm data-bin out; the text
survives the round trip, bad inputs are skipped or counted, and a second run
with the same inputs does nothing."""

import filecmp
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

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
