"""Distant repeats: training segments that copy a span from far back in their own document.

A kNN memory can only learn to copy from what lies beyond the local context if
training rewards that, and natural text rarely repeats a passage verbatim
thousands of tokens later. This curriculum (``document_lm --distant-repeat-prob``)
gives it a reason: in a fraction of the training segments, a span of
``min_len``..``max_len`` tokens is replaced by the same number of tokens copied
from at least ``min_distance`` tokens earlier in the same document, so that
only the memory holds the original when the copy is read.

Plan of segment ``s`` of document ``d`` (deterministic in (seed, epoch, d, s),
so a resumed run reads the same data): with probability ``prob``, a span of
length ``L`` at document position ``p`` (inside the segment, never on its last
token) becomes a copy of positions ``a .. a + L - 1``, with
``a + L + min_distance <= p`` and, when ``max_distance`` is set (e.g. the memory
size, beyond which a copy could not be found), ``p - a <= max_distance``. Two rules keep the stream exact:

- the last token of a segment is never replaced, so the next segment's first
  source token (the previous segment's last target) stays what it was;
- a copy's origin never overlaps another segment's replaced span, so what is
  copied is exactly what the stream showed (and the memory stored) earlier.

The first segment of a document has nothing far enough back and is never changed.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from fairseq.data import data_utils

from fairseq_memtrm.errors import MemtrmUserError, check_repeat_flags


@dataclass(frozen=True)
class DistantRepeats:
    prob: float
    min_len: int
    max_len: int
    min_distance: int
    max_distance: Optional[int] = None
    seed: int = 1

    def __post_init__(self):
        check_repeat_flags("distant-repeat", self.prob, self.min_len, self.max_len)
        if self.min_distance < 0:
            raise MemtrmUserError(f"--distant-repeat-min-distance must be >= 0, got {self.min_distance}")
        if self.max_distance is not None and self.max_distance < self.min_distance + self.max_len:
            raise MemtrmUserError(
                f"--distant-repeat-max-distance {self.max_distance} leaves no room for a copy: make it at least "
                f"--distant-repeat-min-distance + --distant-repeat-max-len = {self.min_distance + self.max_len}"
            )

    def _proposal(self, doc: int, segment: int, tokens_per_sample: int, doc_len: int,
                  epoch: int) -> Optional[Tuple[int, int, int]]:
        """(copy position p, origin a, length L) drawn for a segment, before the overlap rule."""
        if segment == 0 or self.prob <= 0:
            return None
        segment_start = segment * tokens_per_sample
        segment_len = min(tokens_per_sample, doc_len - segment_start)
        with data_utils.numpy_seed(self.seed, epoch, doc, segment):
            if np.random.rand() >= self.prob:
                return None
            length = min(int(np.random.randint(self.min_len, self.max_len + 1)), segment_len - 1)
            if length < 2:
                return None
            position = segment_start + int(np.random.randint(0, segment_len - length))  # p + L <= end - 1
            latest_origin = position - self.min_distance - length
            earliest_origin = 0 if self.max_distance is None else max(0, position - self.max_distance)
            if latest_origin < earliest_origin:
                return None
            return position, int(np.random.randint(earliest_origin, latest_origin + 1)), length

    def plan(self, doc: int, segment: int, tokens_per_sample: int, doc_len: int,
             epoch: int) -> Optional[Tuple[int, int, int]]:
        """(p, a, L) for segment ``segment`` of a document of ``doc_len`` tokens, or None."""
        proposal = self._proposal(doc, segment, tokens_per_sample, doc_len, epoch)
        if proposal is None:
            return None
        _, origin, length = proposal
        first, last = origin // tokens_per_sample, (origin + length - 1) // tokens_per_sample
        for earlier in range(first, last + 1):
            other = self._proposal(doc, earlier, tokens_per_sample, doc_len, epoch)
            if other is not None and other[0] < origin + length and origin < other[0] + other[2]:
                return None  # the origin was itself replaced (or may have been): skip this one
        return proposal

    def apply(self, documents, doc: int, segment: int, tokens_per_sample: int, epoch: int,
              source: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The segment's (source, target) with its planned copy written in."""
        plan = self.plan(doc, segment, tokens_per_sample, int(documents.sizes[doc]), epoch)
        if plan is None:
            return source, target
        position, origin, length = plan
        offset = position - segment * tokens_per_sample
        target = target.clone()
        target[offset : offset + length] = documents.tokens(doc, origin, origin + length)
        return torch.cat([source[:1], target[:-1]]), target
