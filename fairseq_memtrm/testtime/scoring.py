"""The scoring loop every test-time method shares, and the static (vanilla) scorer.

The loop reads a split through ``task.eval_lm_dataloader`` exactly as
``scripts/eval_memory_sweep.py`` and ``fairseq-eval-lm --task document_lm`` do
(same streams, same segments, same padding), and keeps every real target
token's loss, document and position in its document, so that a report can give
the perplexity past position 8K as the sweep does.
"""

import logging
from typing import Callable, Dict, Optional, Tuple

import torch
from fairseq import progress_bar, utils
from torch import Tensor

from fairseq_memtrm.diagnostics import model_device

logger = logging.getLogger(__name__)


def target_nll(model, net_output, sample) -> Tensor:
    """(B, T) loss in nats of every target token (0 at padding), from the model's
    normalised log-probabilities (adaptive softmax included)."""
    lprobs = model.get_normalized_probs(net_output, log_probs=True, sample=sample)
    target = sample["target"]
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return nll.masked_fill(target.eq(model.decoder.padding_idx), 0.0)


def features_and_nll(model, sample) -> Tuple[Tensor, Tensor]:
    """One forward pass: the final hidden states (B, T, C) and every target's loss (B, T)."""
    features, extra = model(**sample["net_input"], features_only=True)
    return features, target_nll(model, (model.decoder.output_layer(features), extra), sample).float()


def target_positions(sample, tokens_per_sample: int) -> Tensor:
    """(B, T) position in its document of every target token (segment s starts at s * T)."""
    target = sample["target"]
    offset = (sample["segment"].clamp(min=0) * tokens_per_sample).unsqueeze(1)
    return offset + torch.arange(target.size(1), device=target.device).unsqueeze(0)


class StaticScorer:
    """The model as it is: one forward per batch, no state beside the model's own
    (a memorizing model keeps its kNN memory, as in ``fairseq-eval-lm``)."""

    def __init__(self, model, name: str = "vanilla"):
        self.model = model
        self.name = name

    @torch.no_grad()
    def score(self, sample) -> Dict[str, Tensor]:
        net_output = self.model(**sample["net_input"])
        return {self.name: target_nll(self.model, net_output, sample).float()}

    def extra_bytes(self) -> int:
        return 0


def score_streams(scorer, task, subset: str, batch_size: int, tokens_per_sample: int, max_positions,
                  max_batches: Optional[int] = None, log_format: Optional[str] = None,
                  on_batch: Optional[Callable] = None) -> Dict[str, Dict[str, Tensor]]:
    """Run ``scorer`` over the split's streams, batch after batch (at most
    ``max_batches``: the first segments of every stream).

    Returns ``{run name: {"loss", "doc", "position", "type"}}``, numpy arrays over
    the real target tokens, in the order the sweep keeps them.
    """
    itr = task.eval_lm_dataloader(task.dataset(subset), batch_size=batch_size, max_positions=max_positions)
    total = len(itr) if max_batches is None else min(len(itr), max_batches)
    progress = progress_bar.progress_bar(itr, log_format=log_format, log_interval=10,
                                         prefix=f"{subset} ({total} batches)", default_log_format="tqdm")
    pad = task.target_dictionary.pad()
    kept: Dict[str, Dict[str, list]] = {}
    device = model_device(getattr(scorer, "model", None))
    scored = 0
    for index, sample in enumerate(progress):
        if max_batches is not None and index >= max_batches:
            break
        sample = utils.move_to_cuda(sample, device) if device.type == "cuda" else sample
        target = sample["target"]
        mask = target.ne(pad)
        position = target_positions(sample, tokens_per_sample)
        docs = sample["doc_id"].unsqueeze(1).expand_as(target)
        for name, nll in scorer.score(sample).items():
            runs = kept.setdefault(name, {"loss": [], "doc": [], "position": [], "type": []})
            runs["loss"].append(nll[mask].float().cpu())
            runs["doc"].append(docs[mask].cpu())
            runs["position"].append(position[mask].cpu())
            runs["type"].append(target[mask].cpu())
        if on_batch is not None:
            on_batch(index, sample)
        scored += int(mask.sum())
        progress.log({"tokens": scored}, step=index + 1)  # simple/json: every 10th batch
    return {name: {key: torch.cat(values).numpy() for key, values in runs.items()} for name, runs in kept.items()}


def planted_samples(documents: Tensor, tokens_per_sample: int, batch_size: int, pad: int,
                    stream_id: str = "planted"):
    """``document_lm``-shaped batches over ``documents`` (D, N), one document per
    stream, ``batch_size`` streams at a time (rows beyond the last document are
    exhausted streams: all padding, ``doc_start`` True), each read from its start
    in segments of ``tokens_per_sample``. Yields ``(first_row, sample)``."""
    count, total = documents.shape
    for first_row in range(0, count, batch_size):
        rows = documents[first_row : first_row + batch_size]
        real_rows = rows.size(0)
        if real_rows < batch_size:
            rows = torch.cat([rows, rows.new_full((batch_size - real_rows, total), pad)])
        real = torch.arange(batch_size) < real_rows
        for segment, start in enumerate(range(0, total - 1, tokens_per_sample)):
            source = rows[:, start : min(start + tokens_per_sample, total - 1)]
            target = rows[:, start + 1 : start + 1 + source.size(1)]
            yield first_row, {
                "net_input": {
                    "src_tokens": source,
                    "src_lengths": source.ne(pad).sum(dim=1),
                    "doc_start": torch.full((batch_size,), segment == 0) | ~real,
                    "stream_id": stream_id,
                },
                "target": target,
                "doc_id": torch.where(real, torch.arange(first_row, first_row + batch_size), -1),
                "segment": torch.where(real, torch.tensor(segment), -1),
            }


def planted_passage_losses(scorer, documents: Tensor, first_at: int, gap: int, length: int,
                           tokens_per_sample: int, batch_size: int, pad: int) -> Dict[str, Dict[str, float]]:
    """The planted-passage probe (:func:`fairseq_memtrm.diagnostics.planted_passage_loss`)
    for any scorer: ``documents`` from :func:`~fairseq_memtrm.diagnostics.planted_documents`
    read as streams from their start (every scorer resets at ``doc_start``). Returns
    ``{run name: {"first_copy_loss", "second_copy_loss"}}``, mean nats over the tokens
    of each copy, the first token of each copy excluded."""
    device = model_device(getattr(scorer, "model", None))
    count, total = documents.shape
    losses: Dict[str, Tensor] = {}
    for first_row, sample in planted_samples(documents, tokens_per_sample, batch_size, pad):
        sample = utils.move_to_cuda(sample, device) if device.type == "cuda" else sample
        start = int(sample["segment"].max()) * tokens_per_sample
        for name, nll in scorer.score(sample).items():
            kept = losses.setdefault(name, torch.zeros(count, total))  # [:, i]: the loss of token i
            rows = min(batch_size, count - first_row)
            kept[first_row : first_row + rows, start + 1 : start + 1 + nll.size(1)] = nll[:rows].float().cpu()
    second = first_at + gap
    return {name: {"first_copy_loss": nll[:, first_at + 1 : first_at + length].mean().item(),
                   "second_copy_loss": nll[:, second + 1 : second + length].mean().item()}
            for name, nll in losses.items()}
