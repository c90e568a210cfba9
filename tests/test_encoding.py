"""One document encoder (fairseq_memtrm/data/encoding.py): the pieces
scripts/prepare_data.py writes for training are the ids the demo reads."""

import importlib.util
from argparse import Namespace
from pathlib import Path

import sentencepiece
from fairseq.data import Dictionary

from demo.checkpoint import DEMO_CHECKPOINTS, DemoModel
from fairseq_memtrm.data.encoding import document_ids, document_lines

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("prepare_data", REPO / "scripts" / "prepare_data.py")
prepare_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_data)

ASSETS = Path(DEMO_CHECKPOINTS["code"]).parent
# tabs, trailing spaces, blank and whitespace-only lines, an ideographic space inside a line, a letter
# the code model never saw, a line of spaces only
DOCUMENT = "def f(x):\n\treturn x  \n\n   \nclass Caf\u00e9:\n    s = 'a\u3000b'\n\n\n        pass\n"


def test_document_lines_drop_blanks_and_expand_tabs():
    assert document_lines(DOCUMENT) == ["def f(x):", "    return x", "class Caf\u00e9:", "    s = 'a\u3000b'",
                                        "        pass"]
    assert document_lines("\n \n\t\n") == []


def test_prepare_data_and_the_demo_encode_a_document_alike(tmp_path):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(ASSETS / "spm.model"))
    dictionary = Dictionary.load(str(ASSETS / "dict.txt"))
    source = tmp_path / "doc.py"
    source.write_text(DOCUMENT, encoding="utf-8")
    written = tmp_path / "train.txt"
    stats = prepare_data.encode_split(processor, "train", [str(source)], str(written),
                                      Namespace(max_chars_per_doc=None, quiet=True))
    # fairseq-preprocess: every written line becomes its whitespace-split pieces + </s>
    lines = written.read_text(encoding="utf-8").splitlines()
    preprocessed = [dictionary.eos()] + [i for line in lines for i in
                                         [dictionary.index(p) for p in line.split()] + [dictionary.eos()]]
    demo = DemoModel(model=None, dictionary=dictionary, spm=processor, segment_length=512, checkpoint="none")
    assert demo.encode(DOCUMENT) == preprocessed == document_ids(processor, dictionary, DOCUMENT)
    assert stats.tokens == len(preprocessed) - 1  # the leading </s> is document_lm's, not the file's
    assert len(lines) == 5 and "\u3000" not in written.read_text(encoding="utf-8")
