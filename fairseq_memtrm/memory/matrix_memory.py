"""GPTm's memory: a matrix ``M`` (m slots x f) per stream, written once per segment
and read through a fixed random sketch (``models/gptm_lm.py`` runs it; ``docs/gptm.md``).

Shapes: ``B`` streams, ``m`` slots, ``f`` the model width, ``s`` sketch rows.

* :func:`matrix_write` is the write rule. With ``c`` (B, f) the segment's summary
  (unit length) and ``A`` (m, f) the slot addresses (zero: the rule as sketched)::

      v = (M + A) c                       (B, m)
      M <- decay * M + sigmoid(0.5 v) c^T (B, m, f)

  The sketch wrote ``sigmoid(0.5 v) v^T``, which is m x m and cannot be added to
  an m x f matrix; ``sigmoid(0.5 v) c^T`` is the dimensionally consistent reading.
* :func:`matrix_read` is the read: ``S M`` (B, s, f), ``S`` (s, m) a CountSketch
  (:func:`count_sketch`), each row scaled to the norm ``sqrt(f)`` of a hidden state.
* :class:`MatrixMemory` is one stream set's state: ``M`` after the last segment
  (detached), which rows hold a write, and, for truncated backpropagation through
  time, the matrix before the last ``bptt_segments`` segments and those segments'
  tokens, so that the model can recompute them with gradients.
* :class:`MatrixMemoryBank` keeps one :class:`MatrixMemory` per stream set
  (``"train"``, ``"valid"``, ...), built on first use and reset per stream at
  ``doc_start`` by the shared :class:`~fairseq_memtrm.memory.bank.StreamSetBank`.

Invariants (``tests/test_gptm.py``): a write and a read equal the formulas above;
``reset`` clears only the named streams; stream sets never share state.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .bank import StreamSetBank


def count_sketch(sketch_size: int, slots: int, seed: int = 0) -> Tensor:
    """(s, m) a Clarkson-Woodruff / CountSketch matrix: column j has a single
    entry, +1 or -1, in a random row. Deterministic in ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, sketch_size, (slots,), generator=generator)
    signs = torch.randint(0, 2, (slots,), generator=generator).float() * 2 - 1
    sketch = torch.zeros(sketch_size, slots)
    sketch[rows, torch.arange(slots)] = signs
    return sketch


def write_strength(matrix: Tensor, summary: Tensor, addresses: Optional[Tensor] = None) -> Tensor:
    """(B, m) sigmoid(0.5 v), v = (M + A) c: how much of ``summary`` each slot takes."""
    match = torch.einsum("bmf,bf->bm", matrix, summary)
    if addresses is not None:
        match = match + summary @ addresses.t()
    return torch.sigmoid(0.5 * match)  # slots that match strengthen, the others barely change


def matrix_write(matrix: Tensor, summary: Tensor, addresses: Optional[Tensor] = None, decay: float = 1.0) -> Tensor:
    """``matrix`` (B, m, f), ``summary`` c (B, f), ``addresses`` A (m, f) or None ->
    the new matrix ``decay * M + sigmoid(0.5 (M + A) c) c^T`` (B, m, f), differentiable."""
    strength = write_strength(matrix, summary, addresses)
    kept = matrix if decay == 1.0 else decay * matrix
    return kept + strength.unsqueeze(-1) * summary.unsqueeze(1)


def matrix_read(matrix: Tensor, sketch: Tensor) -> Tensor:
    """``matrix`` (B, m, f), ``sketch`` S (s, m) -> the s memory slots ``S M`` (B, s, f),
    each row scaled to norm ``sqrt(f)`` (a hidden state's), whatever ``M``'s size."""
    rows = torch.einsum("sm,bmf->bsf", sketch.to(matrix.dtype), matrix)
    return F.normalize(rows, dim=-1, eps=1e-6) * matrix.size(-1) ** 0.5


def keep_rows(matrix: Tensor, written: Tensor, reset: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(matrix, written) with the rows where ``reset`` (bool (B,); None: all) zeroed;
    ``torch.where`` so that no gradient crosses into a new document."""
    if reset is None:
        return torch.zeros_like(matrix), torch.zeros_like(written)
    reset = reset.to(device=matrix.device, dtype=torch.bool)
    return torch.where(reset.view(-1, 1, 1), torch.zeros_like(matrix), matrix), written & ~reset


class MatrixMemory:
    """One stream set's GPTm state: B streams of an (m, f) matrix.

    ``matrix`` (B, m, f) is ``M`` after the last segment, detached; ``written`` (B,)
    is True where a row holds a write of its current document. For BPTT over the
    last ``bptt_segments`` segments, ``window`` holds their (src_tokens (B, T),
    doc_start (B,)) and ``base`` (B, m, f) / ``base_written`` the state before them:
    replaying the window from ``base`` gives ``matrix`` again, with gradients.
    """

    def __init__(self, num_streams: int, slots: int, dim: int, device: torch.device):
        self.num_streams, self.slots, self.dim = num_streams, slots, dim
        self.matrix = torch.zeros(num_streams, slots, dim, device=device)
        self.written = torch.zeros(num_streams, dtype=torch.bool, device=device)
        self.base, self.base_written = self.matrix, self.written
        self.window: List[Tuple[Tensor, Tensor]] = []

    def reset(self, streams: Optional[Tensor] = None) -> None:
        """Forget what ``streams`` (bool (B,); None: all) hold: a document starts there.
        The other streams keep theirs. (The window's rows are reset when it is replayed:
        the model applies this segment's ``doc_start`` after the replay.)"""
        self.matrix, self.written = keep_rows(self.matrix, self.written, streams)
        if streams is None or bool(streams.all()):
            self.base, self.base_written, self.window = self.matrix, self.written, []

    def commit(self, matrix: Tensor, written: Tensor, src_tokens: Tensor, doc_start: Tensor,
               bptt_segments: int, replayed: List[Tuple[Tensor, Tensor]]) -> None:
        """Keep ``matrix``/``written`` after a segment (``src_tokens``, ``doc_start``).
        ``bptt_segments`` 0: no window; else the segment joins the window and, when the
        window is full, its oldest segment leaves it: ``base`` becomes ``replayed[0]``,
        the state after that segment as the replay recomputed it."""
        self.matrix, self.written = matrix.detach(), written
        if bptt_segments <= 0:
            self.base, self.base_written, self.window = self.matrix, self.written, []
            return
        self.window.append((src_tokens.detach(), doc_start))
        if len(self.window) > bptt_segments:
            self.window.pop(0)
            self.base, self.base_written = replayed[0][0].detach(), replayed[0][1]

    def norms(self) -> Tensor:
        """(B,) the Frobenius norm of each stream's matrix."""
        return self.matrix.flatten(1).norm(dim=1)


class MatrixMemoryBank(StreamSetBank):
    """GPTm's state per stream set: one :class:`MatrixMemory` of ``slots`` x ``dim`` each.
    ``memory_size`` is ``slots`` (what the evaluation scripts report as the memory's size)."""

    memory_name = "GPTm memory"

    def __init__(self, slots: int, dim: int, bptt_segments: int):
        super().__init__()
        self.slots, self.dim, self.bptt_segments = slots, dim, bptt_segments

    @property
    def memory_size(self) -> int:
        return self.slots

    def bytes_per_stream(self) -> int:
        """The matrix (fp32). Training with BPTT holds one more: the matrix before the window."""
        return self.slots * self.dim * 4

    def _build_stream_set(self, num_streams: int, device: torch.device) -> Dict[int, MatrixMemory]:
        return {0: MatrixMemory(num_streams, self.slots, self.dim, device)}

    def _size_terms(self) -> str:
        return f"--gptm-slots {self.slots} x {self.dim} dims, fp32"

    def _smaller(self) -> str:
        return "lower --gptm-slots or --batch-size"
