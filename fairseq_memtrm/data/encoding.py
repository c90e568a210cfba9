"""How a document's text becomes the pieces the models read: written once, for
``scripts/prepare_data.py`` (training data) and the demo (``demo/checkpoint.py``).

A document is its non-blank lines (a blank line is the data-bin's document
separator), tabs expanded to 4 spaces and trailing spaces dropped. Each line is
encoded by SentencePiece into pieces; a piece that holds exotic whitespace is
split on it (fairseq splits its text lines on whitespace). ``fairseq-preprocess``
then ends every line with ``</s>``, so a line break is an end-of-sentence token,
and ``document_lm`` puts ``</s>`` before a document's first token.

Worked example (a code SentencePiece model)::

    "def f(x):\\n\\treturn x  \\n\\n"
    document_lines -> ["def f(x):", "    return x"]
    line_pieces    -> [["▁def", "▁f", "(", "x", "):"], ["▁", "▁", "▁", "▁return", "▁x"]]   (pieces vary)
    document ids   -> </s> def f ( x ): </s> ▁ ▁ ▁ ▁return ▁x </s>

``tests/test_prepare_data.py`` holds prepare_data's output and the demo's ids to agreement.
"""

from typing import Iterable, List

TAB_WIDTH = 4


def document_lines(text: str) -> List[str]:
    """The lines of ``text`` as the models read them: non-blank, tabs expanded, right-stripped."""
    lines = [line.expandtabs(TAB_WIDTH).rstrip() for line in text.splitlines()]
    return [line for line in lines if line.strip()]


def line_pieces(processor, lines: Iterable[str]) -> List[List[str]]:
    """SentencePiece pieces of every line (``processor``: a SentencePieceProcessor)."""
    return [[p for piece in pieces for p in piece.split()] for pieces in processor.encode(list(lines), out_type=str)]


def document_ids(processor, dictionary, text: str) -> List[int]:
    """Token ids of a document as ``document_lm`` reads it: ``</s>``, then per line its pieces and ``</s>``."""
    ids: List[int] = [dictionary.eos()]
    for pieces in line_pieces(processor, document_lines(text)):
        ids.extend(dictionary.index(piece) for piece in pieces)
        ids.append(dictionary.eos())
    return ids
