"""Top-k inner-product search backends for :class:`KNNMemory`.

A backend answers one question: given the keys that one stream holds for every
head, which ``k`` of them have the largest inner product with each query? The
memory owns the keys (a ring buffer); a backend only searches them, and may
keep an index of its own in step with the ring through ``on_add``/``on_reset``.
The attention layer never sees which backend it talks to.
"""

from typing import Dict, Tuple, Type

import torch
from torch import Tensor


class SearchBackend:
    """Interface. Shapes: ``H`` heads, ``T`` queries, ``N`` valid keys, ``D`` dims."""

    name = "abstract"
    #: True when results may differ from exact search (recall < 1).
    approximate = False

    def __init__(self, num_streams: int, num_heads: int, head_dim: int, memory_size: int):
        self.num_streams = num_streams
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.memory_size = memory_size

    def on_reset(self, stream: int) -> None:
        """Stream ``stream`` starts a new document: forget everything it held."""

    def on_add(self, stream: int, slots: Tensor, keys: Tensor) -> None:
        """``keys`` (H, n, D) were written to ring ``slots`` (n,) of ``stream``."""

    def search(self, stream: int, queries: Tensor, keys: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """Top-``k`` search of ``queries`` (H, T, D) among ``keys`` (H, N, D), N >= k.

        Returns ``scores`` (H, T, k) in descending order and ``slots`` (H, T, k),
        the indices of the hits along N (int64).
        """
        raise NotImplementedError


class ExactSearch(SearchBackend):
    """Exact search by blocked matmul with a running top-k.

    The full (T, N) score matrix is never materialised: keys are scored one
    block of ``block_size`` at a time and merged into the running top-k, so
    scratch memory is bounded by ``H * T * (block_size + k)`` floats whatever
    the memory size. Runs on whatever device the keys live on (CUDA included).
    Keys stored in fp16 are upcast one block at a time.
    """

    name = "exact"

    def __init__(self, *args, block_size: int = 4096, **kwargs):
        super().__init__(*args, **kwargs)
        self.block_size = block_size

    def search(self, stream, queries, keys, k):
        num_keys = keys.size(1)
        best_scores = best_slots = None
        for start in range(0, num_keys, self.block_size):
            block = keys[:, start : start + self.block_size].to(queries.dtype)
            scores = torch.bmm(queries, block.transpose(1, 2))  # (H, T, block)
            top_scores, top_slots = scores.topk(min(k, block.size(1)), dim=-1)
            top_slots += start
            if best_scores is not None:
                top_scores = torch.cat([best_scores, top_scores], dim=-1)
                top_slots = torch.cat([best_slots, top_slots], dim=-1)
                top_scores, order = top_scores.topk(k, dim=-1)
                top_slots = top_slots.gather(-1, order)
            best_scores, best_slots = top_scores, top_slots
        return best_scores, best_slots


BACKENDS: Dict[str, Type[SearchBackend]] = {ExactSearch.name: ExactSearch}


def register_backend(cls: Type[SearchBackend]) -> Type[SearchBackend]:
    BACKENDS[cls.name] = cls
    return cls


def build_backend(name: str, **kwargs) -> SearchBackend:
    if name not in BACKENDS:
        from fairseq_memtrm.errors import MemtrmUserError

        raise MemtrmUserError(
            f"unknown --memory-backend {name!r}; choose one of {sorted(BACKENDS)}"
        )
    return BACKENDS[name](**kwargs)
