"""The recency benefit during training: does the update on a stream's current
segment help its next segment more than an unrelated one?

Issue #19's training-time question. A ``document_lm`` batch holds, per stream,
segment ``A1`` of a document; the next batch holds ``A2``, the segment that
follows it. If the weights learn from recent text, the update on ``A1`` lowers
the loss on ``A2`` more than on a segment ``U`` of a document that no row of
the batch reads. Per measured update and row::

    benefit = (loss_before(A2) - loss_after(A2)) - (loss_before(U) - loss_after(U))

in nats per token, averaged over the rows that have an ``A2``; ``before`` and
``after`` are the same model just before and just after the optimizer step
(evaluation mode). The second term removes what the update does for any text.

Two orders of the *same* segments, from the *same* initial weights, with the
same updates: ``documents`` (``document_lm``'s streams, each row reading its
document segment after segment, so ``A2`` is trained on at the very next update)
and ``shuffled`` (the same segments permuted across batches). The measurement is
the same in both, so their curves compare the model's *capacity* to use recent
text (shuffled) with what document order makes of it (documents).
"""

import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from fairseq.data import data_utils

from fairseq_memtrm.data.document_streams import DocumentStreamDataset

logger = logging.getLogger(__name__)

Segment = Tuple[int, int]  # (document, segment index)
ORDERS = ("documents", "shuffled")


def training_segments(streams: DocumentStreamDataset, updates: int) -> List[List[Optional[Segment]]]:
    """The (document, segment) every row reads at each of the first ``updates``
    batches of ``streams`` (None: an exhausted row)."""
    layout = streams.layout()
    if layout.num_batches < updates:
        raise ValueError(f"the split has {layout.num_batches} batches of {streams.batch_size} streams, "
                         f"fewer than {updates} updates")
    return [[layout.locate(row, batch) for row in streams.my_streams()] for batch in range(updates)]


def shuffled(batches: List[List[Optional[Segment]]], seed: int) -> List[List[Optional[Segment]]]:
    """The same segments permuted across batches, regrouped in batches of the same size
    (the exhausted rows stay at the end)."""
    size = len(batches[0])
    real = [segment for batch in batches for segment in batch if segment is not None]
    with data_utils.numpy_seed(seed):
        order = np.random.permutation(len(real))
    flat = [real[i] for i in order] + [None] * (len(batches) * size - len(real))
    return [flat[i : i + size] for i in range(0, len(flat), size)]


def collate(streams: DocumentStreamDataset, rows: Sequence[Optional[Segment]]):
    """(source (B, T'), target (B, T')) of the given segments, padded; an exhausted row
    is ``</s>`` then padding (no target)."""
    sources, targets = [], []
    for row in rows:
        if row is None:
            sources.append(torch.tensor([streams.eos]))
            targets.append(torch.tensor([streams.pad]))
        else:
            source, target = streams.segment_tokens(*row)
            sources.append(source)
            targets.append(target)
    return data_utils.collate_tokens(sources, streams.pad), data_utils.collate_tokens(targets, streams.pad)


def row_losses(model, source, target, pad: int) -> torch.Tensor:
    """(B,) mean loss in nats per real target token of every row (nan for a row without any)."""
    logits = model(source)[0].float()
    nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=pad, reduction="none")
    real = target.ne(pad)
    return nll.sum(dim=1) / real.sum(dim=1).clamp(min=1).float().masked_fill(~real.any(dim=1), float("nan"))


def next_segment(streams: DocumentStreamDataset, row: Optional[Segment]) -> Optional[Segment]:
    if row is None:
        return None
    doc, segment = row
    return (doc, segment + 1) if segment + 1 < streams.doc_segments[doc] else None


def unrelated_segments(streams: DocumentStreamDataset, rows: Sequence[Optional[Segment]],
                       generator: np.random.Generator) -> List[Segment]:
    """One random segment per row, of a document no row of the batch reads."""
    busy = {row[0] for row in rows if row is not None}
    free = [doc for doc in range(len(streams.doc_segments)) if doc not in busy]
    if not free:
        raise ValueError("every document of the split is in the batch: no unrelated segment to measure on")
    picked = []
    for _ in rows:
        doc = int(free[generator.integers(len(free))])
        picked.append((doc, int(generator.integers(streams.doc_segments[doc]))))
    return picked


@dataclass
class Measure:
    """One measured update: per-row losses before and after it (nats/token)."""

    update: int
    a2_before: List[float]
    a2_after: List[float]
    u_before: List[float]
    u_after: List[float]

    def benefit(self) -> Optional[float]:
        """Mean over the rows with an A2 of the recency benefit (module docstring)."""
        values = [(b2 - a2) - (bu - au) for b2, a2, bu, au in
                  zip(self.a2_before, self.a2_after, self.u_before, self.u_after) if not math.isnan(b2)]
        return float(np.mean(values)) if values else None


def train_and_measure(model, streams: DocumentStreamDataset, batches, optimizer, lr_at, measure_every: int,
                      seed: int = 1, log_every: int = 50) -> Dict:
    """Train ``model`` on ``batches`` (lists of segments), one update each; every
    ``measure_every`` updates, measure the recency benefit of that update. Returns
    {"train_loss": [per update], "measures": [Measure as dict], "benefit": [per measure]}."""
    generator = np.random.default_rng(seed)
    pad = streams.pad
    train_loss, measures = [], []
    start = time.perf_counter()
    for update, rows in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(update)
        measure = measure_every > 0 and update % measure_every == 0
        if measure:
            follow = [next_segment(streams, row) for row in rows]
            a2 = collate(streams, follow)
            u = collate(streams, unrelated_segments(streams, rows, generator))
            model.eval()
            with torch.no_grad():
                before = row_losses(model, *a2, pad), row_losses(model, *u, pad)
        model.train()
        source, target = collate(streams, rows)
        logits = model(source)[0].float()
        loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=pad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_loss.append(float(loss))
        if measure:
            model.eval()
            with torch.no_grad():
                after = row_losses(model, *a2, pad), row_losses(model, *u, pad)
            measures.append(Measure(update, before[0].tolist(), after[0].tolist(), before[1].tolist(),
                                    after[1].tolist()))
        if log_every and (update + 1) % log_every == 0:
            recent = [m.benefit() for m in measures[-10:] if m.benefit() is not None]
            logger.info("update %d/%d: train loss %.3f, recency benefit (last %d measures) %s, %.0f s",
                        update + 1, len(batches), np.mean(train_loss[-log_every:]), len(recent),
                        f"{np.mean(recent):+.4f}" if recent else "-", time.perf_counter() - start)
    model.eval()
    return {"train_loss": train_loss, "measures": [m.__dict__ for m in measures],
            "benefit": [m.benefit() for m in measures]}


@torch.no_grad()
def mean_loss(model, streams: DocumentStreamDataset, batches: int) -> float:
    """Mean loss (nats per token) over the first ``batches`` batches of ``streams``."""
    model.eval()
    total, count = 0.0, 0
    for batch in range(min(batches, len(streams))):
        sample = streams[batch]
        logits = model(sample["net_input"]["src_tokens"])[0].float()
        target = sample["target"]
        total += float(F.cross_entropy(logits.transpose(1, 2), target, ignore_index=streams.pad, reduction="sum"))
        count += int(target.ne(streams.pad).sum())
    return total / max(count, 1)
