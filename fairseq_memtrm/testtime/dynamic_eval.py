"""Dynamic evaluation (Krause et al. 2018, "Dynamic Evaluation of Neural Sequence
Models"; 2019, "Dynamic Evaluation of Transformer Language Models").

After a segment is scored, one gradient step is taken on that segment's loss, so
the next segment of the same document is scored by the adapted weights:

* ``sgd``: ``theta <- theta - lr * g + decay * (theta0 - theta)`` (``decay`` 0: plain SGD);
* ``rms`` (the papers' update): ``theta <- theta - lr * g / (rms + eps)
  + decay * r * (theta0 - theta)``, where ``rms`` is the root mean square of each
  weight's gradient over a few *training* batches (:func:`gradient_rms`, done once
  before evaluation) and ``r = rms / mean(rms)`` (the mean taken per tensor, then
  over tensors), clipped at ``1 / decay`` so that the decay never overshoots
  ``theta0``. Weights whose gradient is large on training data move slowly and
  return fast.

``g`` is the gradient of the segment's mean token loss (the loss it was scored
with), ``theta0`` the checkpoint's weights. Every parameter adapts; buffers do not.

**Streams.** Each batch row (stream) adapts on its own document only: rows are
scored one at a time ("batch size 1 per stream") with that stream's own weights,
through ``torch.func.functional_call``. Per-stream weights are a dict of tensors
beside the model (the model's own parameters are never written), so

* a stream's weights can depend only on its own earlier segments; no gradient of
  another row's text ever reaches them (a batched backward would mix rows through
  the shared weights, and per-stream deltas in one batched forward would need a
  B-fold expanded weight matrix per layer: the same memory, far more code);
* at a document start the stream drops its weights and reads the checkpoint's
  again (nothing learned on one document reaches the next);
* a memorizing model keeps its kNN memory per stream: each stream is its own
  stream set of one row (``<stream_id>/stream<b>``).

The price is B forward/backward passes of one row instead of one batched pass.
"""

import logging
from typing import Dict, Iterable, Optional

import torch
from torch import Tensor
from torch.func import functional_call

from fairseq_memtrm.errors import MemtrmUserError

from .scoring import target_nll

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "rms")


def adaptable_parameters(model) -> Dict[str, Tensor]:
    """{name: parameter} of every trainable parameter (tied weights once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def segment_loss(model, sample, params: Optional[Dict[str, Tensor]] = None):
    """(mean token loss, (B, T) per-token loss) of ``sample`` under ``params``
    (None: the model's own weights)."""
    if params is None:
        net_output = model(**sample["net_input"])
    else:
        net_output = functional_call(model, params, args=(), kwargs=sample["net_input"])
    nll = target_nll(model, net_output, sample)
    real = sample["target"].ne(model.decoder.padding_idx)
    return nll.sum() / real.sum().clamp(min=1), nll


def gradient_rms(model, batches: Iterable, max_batches: int) -> Dict[str, Tensor]:
    """sqrt(mean over ``max_batches`` training batches of g ** 2), per weight, where g
    is the gradient of a batch's mean token loss (Krause et al.'s ``MS_g``)."""
    params = adaptable_parameters(model)
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    count = 0
    for sample in batches:
        if count >= max_batches:
            break
        if not bool(sample["target"].ne(model.decoder.padding_idx).any()):
            continue
        loss, _ = segment_loss(model, sample)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads):
            if grad is not None:
                sums[name] += grad.detach() ** 2
        count += 1
    if count == 0:
        raise MemtrmUserError("no training batch to estimate the gradient statistics of --dyneval-optimizer rms on; "
                              "use --dyneval-optimizer sgd or a data-bin with a train split")
    logger.info("dynamic evaluation: gradient statistics over %d training batches", count)
    return {name: (total / count).sqrt() for name, total in sums.items()}


class DynamicEvaluator:
    """Scores batches with per-stream adapted weights (see the module's docstring).

    Args:
        model: the checkpoint's model, in eval mode (no dropout).
        lr: learning rate (``--dyneval-lr``).
        decay: decay rate toward the checkpoint's weights (``--dyneval-decay``).
        optimizer: ``sgd`` or ``rms``.
        rms: :func:`gradient_rms`'s statistics (``rms`` only).
        eps: added to ``rms`` before dividing (``--dyneval-eps``).
        name: the run's name in reports.
    """

    def __init__(self, model, lr: float, decay: float = 0.0, optimizer: str = "rms",
                 rms: Optional[Dict[str, Tensor]] = None, eps: float = 1e-5, name: str = "dyneval"):
        if optimizer not in OPTIMIZERS:
            raise MemtrmUserError(f"--dyneval-optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if lr < 0 or decay < 0 or eps <= 0:
            raise MemtrmUserError(f"--dyneval-lr and --dyneval-decay must be >= 0 and --dyneval-eps > 0, "
                                  f"got {lr}, {decay}, {eps}")
        if decay > 1:
            raise MemtrmUserError(f"--dyneval-decay must be at most 1 (1 returns to the checkpoint's weights at "
                                  f"every step), got {decay}")
        self.model = model
        self.lr, self.decay, self.optimizer, self.eps = lr, decay, optimizer, eps
        self.name = name
        self.original = {name: p.detach() for name, p in adaptable_parameters(model).items()}
        self.rms = self.decay_rates = None
        if optimizer == "rms":
            if rms is None or set(rms) != set(self.original):
                raise ValueError("the rms update needs gradient_rms() of this model")
            self.rms = {name: r.detach() for name, r in rms.items()}
            mean = torch.stack([r.mean() for r in self.rms.values()]).mean().clamp(min=1e-30)
            ceiling = 1.0 / decay if decay > 0 else float("inf")
            self.decay_rates = {name: (r / mean).clamp(max=ceiling) for name, r in self.rms.items()}
        self.streams: Dict[int, Dict[str, Tensor]] = {}  # stream -> its adapted weights; absent = the checkpoint's
        self.updates = 0

    # ------------------------------------------------------------------ state
    def weights(self, stream: int) -> Dict[str, Tensor]:
        """The weights ``stream`` reads now (the checkpoint's until its first update)."""
        return self.streams.get(stream, self.original)

    def reset(self, stream: int) -> None:
        """``stream`` starts a document: back to the checkpoint's weights."""
        self.streams.pop(stream, None)

    def extra_bytes(self, num_streams: Optional[int] = None) -> int:
        """Adapted weights per stream, plus the rms statistics and decay rates."""
        size = sum(p.numel() * p.element_size() for p in self.original.values())
        streams = num_streams if num_streams is not None else max(len(self.streams), 1)
        return size * streams + (2 * size if self.optimizer == "rms" else 0)

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def step(self, params: Dict[str, Tensor], grads: Dict[str, Optional[Tensor]]) -> Dict[str, Tensor]:
        """The adapted weights after one update with gradients ``grads`` (None: zero)."""
        new = {}
        for name, theta in params.items():
            grad = grads.get(name)
            pull = self.original[name] - theta
            if self.optimizer == "sgd":
                update = pull * self.decay
                if grad is not None:
                    update = update - self.lr * grad
            else:
                update = pull * (self.decay * self.decay_rates[name])
                if grad is not None:
                    update = update - self.lr * grad / (self.rms[name] + self.eps)
            new[name] = theta + update
        return new

    def score(self, sample) -> Dict[str, Tensor]:
        """Score every row with its stream's weights, then update those weights on it."""
        net_input = sample["net_input"]
        target = sample["target"]
        pad = self.model.decoder.padding_idx
        doc_start = net_input.get("doc_start")
        stream_set = net_input.get("stream_id") or "default"
        nll = target.new_zeros(target.shape, dtype=torch.float)
        for row in range(target.size(0)):
            if doc_start is None or bool(doc_start[row]):
                self.reset(row)
            real = target[row].ne(pad)
            if not bool(real.any()):
                continue  # an exhausted stream: nothing to score or learn
            length = int(net_input["src_tokens"][row].ne(pad).sum())
            one = {
                "net_input": {
                    **net_input,
                    "src_tokens": net_input["src_tokens"][row : row + 1, :length],
                    "src_lengths": net_input["src_lengths"][row : row + 1],
                    "doc_start": (doc_start[row : row + 1] if doc_start is not None
                                  else torch.ones(1, dtype=torch.bool)),
                    "stream_id": f"{stream_set}/stream{row}",
                },
                "target": target[row : row + 1, :length],
            }
            params = {name: t.detach().requires_grad_(True) for name, t in self.weights(row).items()}
            with torch.enable_grad():
                loss, row_nll = segment_loss(self.model, one, params)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            nll[row, :length] = row_nll[0].detach().float()
            if self.lr > 0 or self.decay > 0:
                self.streams[row] = self.step(params, dict(zip(params, grads)))
                self.updates += 1
        return {self.name: nll}
