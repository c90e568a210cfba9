"""The neural cache (Grave, Joulin & Usunier 2017, "Improving Neural Language
Models with a Continuous Cache"), over this project's kNN memory.

For the token at document position ``t`` with final hidden state ``h_t`` (the
vector the output layer reads)::

    p(w) = (1 - lambda) * p_model(w) + lambda * p_cache(w)
    p_cache(w) = sum_{i < t, y_i = w} exp(theta * h_t . h_i) / sum_{i < t} exp(theta * h_t . h_i)

where ``i`` runs over the earlier positions of the same document and ``y_i`` is
the token that followed position ``i`` (its target). A document's first token
has no cache: it is scored by the model alone.

**Store and search.** Entries ``(h_i, y_i)`` of earlier segments live in a
:class:`~fairseq_memtrm.memory.KNNMemory` (one stream per batch row, one "head"
of the model's output width, ``--cache-size`` entries per stream, a ring buffer
that evicts the oldest, reset at every document start, any search backend). A
segment searches the memory, then is added to it, so it never finds itself.
Positions of the *same* segment before ``t`` are scored exactly (a causal
``T x T`` product, as attention does). The memory returns the ``--cache-k``
entries with the largest ``h_t . h_i``, the standard approximation at 65K+
entries (kNN-LM does the same); the sum is exact while a stream holds at most
``k`` entries. The token of an entry is read back by its document position
(the memory records it), from a per-stream ring of tokens beside the memory.
"""

import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fairseq_memtrm.errors import MemtrmUserError
from fairseq_memtrm.memory import KNNMemory, memory_bytes

from .scoring import features_and_nll, target_positions

logger = logging.getLogger(__name__)

QUERY_BUDGET = 1 << 20  # (queries x k) results one memory search returns at most


@dataclass
class CacheScores:
    """What the cache gives one segment; (B, T) unless said otherwise."""

    model_nll: Tensor  # -log p_model(target)
    cache_logp: Tensor  # log p_cache(target); -inf where the cache holds no such token (or nothing)
    has_cache: Tensor  # bool: the cache held at least one entry for this query
    query_positions: Tensor  # document position of each target
    entry_positions: Tensor  # (B, T, k + T) document positions of the entries summed over; -1 = none


def log_weight(weight: float) -> float:
    """log of a mixture weight, -inf for 0 (a component with no weight adds nothing)."""
    return math.log(weight) if weight > 0 else float("-inf")


def mix(model_nll: Tensor, cache_logp: Tensor, has_cache: Tensor, lam: float) -> Tensor:
    """-log((1 - lam) p_model + lam p_cache), and -log p_model where there is no cache."""
    mixed = torch.logaddexp(math.log1p(-lam) - model_nll, log_weight(lam) + cache_logp)
    return torch.where(has_cache, -mixed, model_nll)


class NeuralCache:
    """Scores batches with the cache mixture, one run per ``lambdas`` value (the
    mixture is computed once per batch; every lambda reuses it)."""

    def __init__(self, model, num_streams: int, lambdas: Sequence[float], theta: float, size: int, k: int,
                 tokens_per_sample: int, backend: str = "exact", dtype: str = "fp32", name: str = "cache"):
        bad = [lam for lam in lambdas if not 0 <= lam < 1]
        if not lambdas or bad:
            raise MemtrmUserError(f"--cache-lambda takes values in [0, 1), got {list(lambdas)}")
        if size < 1 or k < 1:
            raise MemtrmUserError(f"--cache-size and --cache-k must be >= 1, got {size} and {k}")
        self.model = model
        self.lambdas = list(lambdas)
        self.theta = theta
        self.size, self.k = size, k
        self.tokens_per_sample = tokens_per_sample
        self.name = name
        self.dim = model.decoder.output_embed_dim if hasattr(model.decoder, "output_embed_dim") else None
        self.num_streams = num_streams
        self.backend, self.dtype = backend, dtype
        self.memory = None  # built on the first batch, on the features' device and width
        self.tokens = None  # (B, size) the target of the entry at document position p sits at p % size
        self.written = torch.zeros(num_streams, dtype=torch.long)

    def run_names(self) -> List[str]:
        return [f"{self.name} lambda={lam:g}" for lam in self.lambdas]

    def extra_bytes(self) -> int:
        dim = self.dim or 0
        return self.num_streams * (memory_bytes(self.size, 1, dim, self.dtype, self.backend) + 8 * self.size)

    def _build(self, features: Tensor) -> None:
        self.dim = features.size(-1)
        self.memory = KNNMemory(self.num_streams, 1, self.dim, self.size, self.dtype, self.backend)
        self.tokens = torch.full((self.num_streams, self.size), -1, dtype=torch.long, device=features.device)

    def reset(self, streams: Tensor) -> None:
        streams = streams.to("cpu", torch.bool)
        self.memory.reset(streams)
        self.written[streams] = 0
        self.tokens[streams.to(self.tokens.device)] = -1

    # ------------------------------------------------------------------ core
    @torch.no_grad()
    def cache_scores(self, sample, forward: Optional[Tuple[Tensor, Tensor]] = None) -> CacheScores:
        """Score one batch against the cache, then add it to the cache. ``forward``:
        the batch's ``features_and_nll`` where another scorer has run it already."""
        net_input = sample["net_input"]
        features, model_nll = forward if forward is not None else features_and_nll(self.model, sample)
        target = sample["target"]
        bsz, seq_len = target.shape
        if features.size(0) != self.num_streams:
            raise MemtrmUserError(f"the cache was built for {self.num_streams} streams, a batch has {bsz}; "
                                  "keep --batch-size fixed")
        if self.memory is None:
            self._build(features)
        doc_start = net_input.get("doc_start")
        self.reset(doc_start if doc_start is not None else torch.ones(bsz, dtype=torch.bool))
        real = target.ne(self.model.decoder.padding_idx)
        h = features.float()
        query_positions = target_positions(sample, self.tokens_per_sample)

        # earlier segments: top-k from the memory, in chunks of queries
        queries = h.unsqueeze(1)  # (B, 1, T, C)
        most = max(self.memory.num_valid(b) for b in range(bsz))
        k = max(1, min(self.k, most))
        chunk = max(1, QUERY_BUDGET // k)
        mem_scores, mem_positions = [], []
        for start in range(0, seq_len, chunk):
            found = self.memory.search(queries[:, :, start : start + chunk], k, vectors=False)
            mem_scores.append(found.scores[:, 0].float())  # (B, t, k') inner products; -inf = none
            mem_positions.append(found.positions[:, 0])
        mem_scores = torch.cat(mem_scores, dim=1)
        mem_positions = torch.cat(mem_positions, dim=1)
        mem_tokens = self.tokens.gather(1, (mem_positions.clamp(min=0) % self.size).view(bsz, -1)).view_as(
            mem_positions)

        # this segment: every earlier real position, exactly
        local_scores = torch.bmm(h, h.transpose(1, 2))  # (B, T, T): query t, entry i
        earlier = torch.ones(seq_len, seq_len, dtype=torch.bool, device=h.device).tril(-1)
        local_valid = earlier.unsqueeze(0) & real.unsqueeze(1)
        local_scores = local_scores.masked_fill(~local_valid, float("-inf"))
        local_positions = query_positions.unsqueeze(1).expand(bsz, seq_len, seq_len).masked_fill(~local_valid, -1)
        local_tokens = target.unsqueeze(1).expand(bsz, seq_len, seq_len)

        scores = self.theta * torch.cat([mem_scores, local_scores], dim=-1)  # (B, T, k + T)
        positions = torch.cat([mem_positions, local_positions], dim=-1)
        tokens = torch.cat([mem_tokens, local_tokens], dim=-1)
        valid = positions >= 0
        scores = scores.masked_fill(~valid, float("-inf"))
        log_z = torch.logsumexp(scores, dim=-1)
        hit = scores.masked_fill(tokens.ne(target.unsqueeze(-1)), float("-inf"))
        has_cache = valid.any(dim=-1)
        cache_logp = torch.where(has_cache, torch.logsumexp(hit, dim=-1) - log_z,
                                 torch.full_like(log_z, float("-inf")))

        # then remember this segment
        self.memory.add(queries, queries, token_mask=real)
        for b in range(bsz):
            count = int(real[b].sum())
            if count == 0:
                continue
            slots = (self.written[b] + torch.arange(count)) % self.size
            self.tokens[b, slots.to(self.tokens.device)] = target[b][real[b]]
            self.written[b] += count
        return CacheScores(model_nll, cache_logp, has_cache & real, query_positions,
                           positions.masked_fill(~valid, -1))

    def score(self, sample) -> Dict[str, Tensor]:
        result = self.cache_scores(sample)
        real = sample["target"].ne(self.model.decoder.padding_idx)
        return {name: mix(result.model_nll, result.cache_logp, result.has_cache, lam).masked_fill(~real, 0.0)
                for name, lam in zip(self.run_names(), self.lambdas)}
