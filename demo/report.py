"""The retrieval report: what the kNN memory retrieved for every token of a document.

``build_report`` reads one document through a memorizing model the way the
``document_lm`` task feeds it: segment by segment, one stream, ``doc_start``
True on the first segment only, a ``stream_id`` of its own. It reads the
document twice:

* with memory (a fresh :class:`MemoryBank` of ``memory_size`` tokens, top
  ``knn_k``), recording what the report layer retrieved for every query;
* without memory (a bank of size 0, so every memory layer is plain local
  attention), for the per-token loss difference "how much the memory helped".

Alignment. Token ``t`` is predicted by the query at position ``t - 1``; the
report for token ``t`` is that query's retrieval and the loss of ``t``. A
memory entry at document position ``p`` holds the key/value computed while
reading token ``p``; its *distance* is ``(t - 1) - p`` tokens back.

Entries are merged over heads (``fairseq_memtrm.analysis.merge_heads``): an
entry's *weight* is the share of the layer's attention output that came from
it, ``sum_h gate_h * p_h(entry) / H``, where ``p_h`` is head h's softmax weight
over its top-k and ``gate_h`` its memory gate; its *score* is the best cosine
similarity any head gave it.
"""

import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from fairseq_memtrm.analysis import TokenTypeGain, entries_hold_token, gains_by_token_type, merge_heads
from fairseq_memtrm.errors import MemtrmUserError
from fairseq_memtrm.memory import MemoryBank

#: Longest document the demo reads. At k=32 its report takes ~12 bytes x 32 per token
#: (115 MB at 300K tokens) and reading it a few minutes of CPU for a tiny model.
MAX_DOCUMENT_TOKENS = 300_000

#: Top predictions kept per token and pass (with and without memory).
TOP_PREDICTIONS = 5

ProgressCallback = Callable[[int, int], None]


class ReadCancelled(Exception):
    """The reader asked to stop (``build_report``'s ``should_stop``)."""


@dataclass
class DocumentReport:
    """Per-token results for a document of ``N`` tokens; ``K`` = knn_k, ``H`` = heads."""

    token_ids: np.ndarray  # (N,) int64
    loss_with_memory: np.ndarray  # (N,) float32 nats; NaN at 0 (nothing predicts it)
    loss_without_memory: np.ndarray  # (N,) float32 nats
    entry_positions: np.ndarray  # (N, K) int32 document position, -1 = no entry
    entry_scores: np.ndarray  # (N, K) float16 cosine similarity (best head)
    entry_weights: np.ndarray  # (N, K) float16 share of the layer output, sorted descending
    entry_heads: np.ndarray  # (N, K) int32 (int64 past 31 heads): bit h set when head h retrieved it
    memory_share: np.ndarray  # (N,) float32 share of the layer's output from memory (mean over heads)
    predictions_with_memory: np.ndarray  # (N, P) int32 the P most probable tokens, most probable first
    prediction_probs_with_memory: np.ndarray  # (N, P) float16 their probabilities
    predictions_without_memory: np.ndarray  # (N, P) int32
    prediction_probs_without_memory: np.ndarray  # (N, P) float16
    head_gates: np.ndarray  # (H,) float32 the learned gates sigmoid(b_h): one constant per head
    segment_starts: np.ndarray  # (S,) int64 first token of each segment
    layer: int  # decoder layer the retrievals come from
    memory_size: int
    knn_k: int
    shift_keys: bool  # entries keyed by the token before them: a retrieved token is a proposal
    stream_id: str = ""

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def memory_gain(self) -> np.ndarray:
        """(N,) loss without memory minus loss with memory: > 0 where memory helped."""
        return self.loss_without_memory - self.loss_with_memory

    def segment_of(self, index: int) -> int:
        """The segment token ``index`` was predicted in (token 0: segment 0)."""
        return int(np.searchsorted(self.segment_starts, max(index - 1, 0), side="right") - 1)

    def segment_gains(self) -> np.ndarray:
        """(S,) mean memory gain per segment (nats/token): loss without minus with memory."""
        with_memory, without_memory = self.segment_losses()
        return without_memory - with_memory

    def token_types_helped_most(self, top: int = 20, min_count: int = 2) -> List[TokenTypeGain]:
        """The token types whose summed memory gain over the document is largest."""
        scored = np.isfinite(self.memory_gain)
        return gains_by_token_type(self.token_ids[scored].tolist(), self.memory_gain[scored].tolist(), top, min_count)

    def segment_losses(self) -> tuple:
        """Mean loss per segment: (with memory (S,), without memory (S,))."""
        bounds = list(self.segment_starts) + [self.num_tokens]
        with_memory, without_memory = [], []
        for start, end in zip(bounds[:-1], bounds[1:]):
            start = max(start, 1)  # token 0 has no loss
            with_memory.append(np.nanmean(self.loss_with_memory[start:end]) if end > start else np.nan)
            without_memory.append(np.nanmean(self.loss_without_memory[start:end]) if end > start else np.nan)
        return np.array(with_memory), np.array(without_memory)

    def retrieval_distances(self) -> tuple:
        """Distances (tokens back) of all retrieved entries and their weights, flat."""
        valid = self.entry_positions >= 0
        query_positions = np.arange(self.num_tokens)[:, None] - 1
        distances = (query_positions - self.entry_positions)[valid]
        return distances, self.entry_weights[valid].astype(np.float32)


@dataclass
class MemoryEntry:
    """One retrieved entry, ready to display."""

    position: int  # document position of the retrieved token
    distance: int  # tokens back from the query
    score: float
    weight: float
    heads: List[int]
    token: str  # the retrieved token
    left_context: str
    right_context: str  # starts with the token that followed it (what a copy would predict; with
    # --memory-shift-keys the entry was matched on the token before it and proposes `token` itself)
    holds_token: bool  # the retrieved token is the clicked token (the one its query predicts)


@dataclass
class Prediction:
    token: str
    probability: float


@dataclass
class TokenDetails:
    index: int
    token: str
    loss_with_memory: float
    loss_without_memory: float
    entries: List[MemoryEntry] = field(default_factory=list)
    memory_share: float = 0.0  # share of the layer's output that came from memory for this token
    predictions_with_memory: List[Prediction] = field(default_factory=list)
    predictions_without_memory: List[Prediction] = field(default_factory=list)

    @property
    def probability_with_memory(self) -> float:
        """The model's probability of this token, reading its memory."""
        return float(np.exp(-self.loss_with_memory))

    @property
    def probability_without_memory(self) -> float:
        return float(np.exp(-self.loss_without_memory))


def check_document(token_ids: Sequence[int], max_tokens: int = MAX_DOCUMENT_TOKENS) -> None:
    """Refuse documents the demo cannot read, with a message that names the fix."""
    if len(token_ids) < 2:
        raise MemtrmUserError("the document is empty: paste some text, upload a .txt/.py file or pick a sample")
    if len(token_ids) > max_tokens:
        raise MemtrmUserError(
            f"the document has {len(token_ids):,} tokens; the demo reads at most {max_tokens:,}: "
            "cut it or upload a part of it"
        )


def _losses_and_predictions(model, logits: torch.Tensor, target: torch.Tensor):
    """(1, T, V) logits and (1, T) targets -> (T,) negative log-likelihoods in nats,
    and the (T, P) most probable tokens with their (T, P) probabilities."""
    log_probs = model.get_normalized_probs((logits, None), log_probs=True).float()[0]
    losses = -log_probs.gather(-1, target[0].unsqueeze(-1)).squeeze(-1)
    top = log_probs.topk(TOP_PREDICTIONS, dim=-1)
    return losses.cpu().numpy(), top.indices.int().cpu().numpy(), top.values.exp().half().cpu().numpy()


def _store_retrievals(record, knn_k: int, first_token: int, arrays) -> None:
    """Merge a segment's retrievals over heads into ``arrays`` (positions,
    scores, weights, heads), rows from ``first_token`` on, a few queries at a
    time: the merge compares every pair of a token's H*k candidates."""
    retrieval = record.retrieval
    heads, seq_len, k = retrieval.positions[0].shape
    chunk = max(1, (1 << 22) // (heads * k) ** 2)
    for lo in range(0, seq_len, chunk):
        hi = min(lo + chunk, seq_len)
        merged = merge_heads(
            retrieval.positions[0, :, lo:hi], retrieval.scores[0, :, lo:hi],
            record.memory_probs[0, :, lo:hi], record.gate[0, :, lo:hi], knn_k,
        )
        for array, values in zip(arrays, merged):
            array[first_token + lo : first_token + hi, : values.size(1)] = values.cpu().numpy()


@torch.no_grad()
def build_report(
    model,
    token_ids: Sequence[int],
    *,
    segment_length: int,
    memory_size: int,
    knn_k: int,
    stream_id: str,
    layer: Optional[int] = None,
    lock: Optional[threading.Lock] = None,
    progress: Optional[ProgressCallback] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    max_tokens: int = MAX_DOCUMENT_TOKENS,
) -> DocumentReport:
    """Read ``token_ids`` (N,) through ``model`` with and without memory.

    ``layer``: the memory layer to report (default: the first one). ``lock``
    serialises forward passes when several sessions share ``model``; it is
    taken per segment, so concurrent sessions take turns. Each segment is read
    with memory, then without; ``progress(done, total)`` is called after each
    of the document's ``total`` segments, and ``should_stop()``, when it returns
    True before a segment, stops the read with :class:`ReadCancelled`.
    """
    check_document(token_ids, max_tokens)
    if segment_length < 1:
        raise MemtrmUserError(f"the segment length must be >= 1, got {segment_length}")
    if memory_size < 0 or knn_k < 1:
        raise MemtrmUserError(f"memory size must be >= 0 and k >= 1, got {memory_size} and {knn_k}")
    layer = model.memory_layer_ids[0] if layer is None else layer
    if layer not in model.memory_layer_ids:
        raise MemtrmUserError(f"layer {layer} has no memory; memory layers: {model.memory_layer_ids}")
    attention = model.memory_attentions()[model.memory_layer_ids.index(layer)]
    heads = attention.num_heads
    lock = lock or threading.Lock()
    device = next(model.parameters()).device
    tokens = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)
    num_tokens = tokens.numel()
    starts = list(range(0, num_tokens - 1, segment_length))

    loss = {run: np.full(num_tokens, np.nan, dtype=np.float32) for run in ("memory", "no memory")}
    predictions = {run: np.zeros((num_tokens, TOP_PREDICTIONS), dtype=np.int32) for run in loss}
    prediction_probs = {run: np.zeros((num_tokens, TOP_PREDICTIONS), dtype=np.float16) for run in loss}
    positions = np.full((num_tokens, knn_k), -1, dtype=np.int32)
    # compact storage: a long document's report must fit several sessions in RAM
    scores = np.full((num_tokens, knn_k), np.nan, dtype=np.float16)
    weights = np.zeros((num_tokens, knn_k), dtype=np.float16)
    head_bits = np.zeros((num_tokens, knn_k), dtype=np.int32 if heads <= 31 else np.int64)
    memory_share = np.zeros(num_tokens, dtype=np.float32)

    model.eval()
    banks: Dict[str, MemoryBank] = {  # this report's own: the model's bank stays untouched
        "memory": model.memory_bank.resized(memory_size),
        "no memory": model.memory_bank.resized(0),
    }
    for index, start in enumerate(starts):
        if should_stop is not None and should_stop():
            raise ReadCancelled(f"stopped after {index} of {len(starts)} segments")
        source = tokens[start : start + segment_length].unsqueeze(0).to(device)
        target = tokens[start + 1 : start + segment_length + 1].unsqueeze(0).to(device)
        source = source[:, : target.size(1)]  # the last segment stops at the last prediction
        doc_start = torch.tensor([index == 0], device=device)
        predicted = slice(start + 1, start + 1 + source.size(1))  # query at t predicts token t + 1
        for run, bank in banks.items():
            with lock:  # the model's layers are bound to one bank at a time; sessions share the model
                logits, extra = model(source, doc_start=doc_start, stream_id=f"{stream_id}/{run}",
                                      memory_bank=bank, knn_k=knn_k, record_retrievals=run == "memory")
            loss[run][predicted], predictions[run][predicted], prediction_probs[run][predicted] = (
                _losses_and_predictions(model, logits, target))
            record = extra.get("retrievals", {}).get(layer)
            if run == "memory" and record is not None:
                _store_retrievals(record, knn_k, start + 1, (positions, scores, weights, head_bits))
                memory_share[predicted] = record.memory_share[0].float().mean(0).cpu().numpy()
        if progress is not None:
            progress(index + 1, len(starts))
    return DocumentReport(
        token_ids=tokens.numpy(),
        loss_with_memory=loss["memory"],
        loss_without_memory=loss["no memory"],
        entry_positions=positions,
        entry_scores=scores,
        entry_weights=weights,
        entry_heads=head_bits,
        memory_share=memory_share,
        predictions_with_memory=predictions["memory"],
        prediction_probs_with_memory=prediction_probs["memory"],
        predictions_without_memory=predictions["no memory"],
        prediction_probs_without_memory=prediction_probs["no memory"],
        head_gates=attention.gate_values().detach().float().cpu().numpy(),
        segment_starts=np.array(starts, dtype=np.int64),
        layer=layer,
        memory_size=memory_size,
        knn_k=knn_k,
        shift_keys=bool(model.memory_bank.shift_keys),
        stream_id=stream_id,
    )


def token_details(
    report: DocumentReport, index: int, token_texts: Sequence[str], context: int = 5,
    token_text: Optional[Callable[[int], str]] = None,
) -> TokenDetails:
    """What the memory gave token ``index``: its entries with ``context`` tokens
    either side (``token_texts``: the display text of every token, (N,)), and
    what the model predicted for it with and without memory (``token_text``:
    the display text of a token id; default: the id)."""
    if not 0 <= index < report.num_tokens:
        raise MemtrmUserError(f"token {index} is outside the document (0..{report.num_tokens - 1})")
    token_text = token_text or str

    def text(lo: int, hi: int) -> str:
        return "".join(token_texts[max(lo, 0) : min(hi, report.num_tokens)])

    row = report.entry_positions[index]
    holds = entries_hold_token(report.token_ids, row, report.token_ids[index])
    entries = []
    for slot in np.flatnonzero(row >= 0):
        position = int(row[slot])
        bits = int(report.entry_heads[index, slot])
        entries.append(
            MemoryEntry(
                position=position,
                distance=(index - 1) - position,
                score=float(report.entry_scores[index, slot]),
                weight=float(report.entry_weights[index, slot]),
                heads=[h for h in range(len(report.head_gates)) if bits >> h & 1],
                token=text(position, position + 1),
                left_context=text(position - context, position),
                right_context=text(position + 1, position + 1 + context),
                holds_token=bool(holds[slot]),
            )
        )

    def predictions(ids, probs):
        if index == 0:  # nothing predicts the first token
            return []
        return [Prediction(token_text(int(i)), float(p)) for i, p in zip(ids[index], probs[index])]

    return TokenDetails(
        index=index,
        token=text(index, index + 1),
        loss_with_memory=float(report.loss_with_memory[index]),
        loss_without_memory=float(report.loss_without_memory[index]),
        entries=entries,
        memory_share=float(report.memory_share[index]),
        predictions_with_memory=predictions(report.predictions_with_memory, report.prediction_probs_with_memory),
        predictions_without_memory=predictions(report.predictions_without_memory,
                                               report.prediction_probs_without_memory),
    )
