"""The documents of one binarized split.

``scripts/prepare_data.py`` writes one line of SentencePiece pieces per text
line and an empty line between documents, and ``fairseq-preprocess`` turns
every line into ``pieces + </s>``. An empty line therefore becomes an item of
size 1 (``</s>`` alone), and no text line can (it has at least one piece):
documents are the maximal runs of items longer than one token.

A document's tokens are its lines' tokens, end to end, ``</s>`` included (it
stands for the line break). The separators belong to no document and are
never scored.
"""

import logging
from typing import List

import numpy as np
import torch
from fairseq.data import FairseqDataset

from fairseq_memtrm.errors import MemtrmUserError

logger = logging.getLogger(__name__)


class DocumentDataset(FairseqDataset):
    """Item ``i`` is document ``i`` as a 1-D LongTensor of ``sizes[i]`` tokens.

    ``lines`` is fairseq's indexed dataset of the split (one item per line)
    and ``split`` the split's name, which becomes the batches' ``stream_id``.
    """

    def __init__(self, lines, split: str):
        self.lines = lines
        self.split = split
        line_sizes = np.asarray(lines.sizes, dtype=np.int64)
        # Token offset of every line in the split, so a document's span
        # [doc_offsets[d], doc_offsets[d] + sizes[d]) can be cut anywhere.
        self.line_offsets = np.concatenate([[0], np.cumsum(line_sizes)])
        is_text = line_sizes > 1
        # Runs of text lines: a run starts where a text line follows a separator.
        edges = np.diff(np.concatenate([[0], is_text.astype(np.int8), [0]]))
        self.first_line = np.flatnonzero(edges == 1)
        self.end_line = np.flatnonzero(edges == -1)  # exclusive
        self.doc_offsets = self.line_offsets[self.first_line]
        self.sizes = self.line_offsets[self.end_line] - self.doc_offsets
        self.num_separators = int((~is_text).sum())
        if len(self.sizes) == 0:
            raise MemtrmUserError(
                f"split {split!r} holds no document (only empty lines); "
                "rebuild it with scripts/prepare_data.py"
            )

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, doc: int) -> torch.Tensor:
        return self.tokens(doc, 0, int(self.sizes[doc]))

    def num_tokens(self, doc: int) -> int:
        return int(self.sizes[doc])

    def size(self, doc: int) -> int:
        return int(self.sizes[doc])

    def total_tokens(self) -> int:
        return int(self.sizes.sum())

    def tokens(self, doc: int, start: int, end: int) -> torch.Tensor:
        """Tokens ``start:end`` of document ``doc``, shape (end - start,)."""
        if not 0 <= start <= end <= self.sizes[doc]:
            raise IndexError(f"tokens {start}:{end} outside document {doc} of {self.sizes[doc]} tokens")
        if start == end:
            return torch.empty(0, dtype=torch.long)
        begin = int(self.doc_offsets[doc]) + start
        stop = int(self.doc_offsets[doc]) + end
        # Only the few lines overlapping the span are read from the mmap.
        first = int(np.searchsorted(self.line_offsets, begin, side="right")) - 1
        last = int(np.searchsorted(self.line_offsets, stop, side="left"))
        pieces: List[torch.Tensor] = [self.lines[i] for i in range(first, last)]
        joined = torch.cat(pieces).long()
        skip = begin - int(self.line_offsets[first])
        return joined[skip : skip + (stop - begin)]
