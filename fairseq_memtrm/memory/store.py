"""The memory store interface: what every kNN memory answers, declared once.

A store keeps, per *stream* (batch row) and per head, (key, value) pairs of the
tokens read so far in the stream's current document. The attention layer, the
memory bank, the demo and the scripts talk to a store only through
:class:`MemoryStore`; they never know whether it is a :class:`KNNMemory` (one
entry per token) or a :class:`ChunkedKNNMemory` (searched by chunk), nor which
search backend it uses. In the spirit of meliad's ``MemoryLayer``
(``update`` / ``topk_retrieval`` / ``reset``).

Shapes: ``B`` streams, ``H`` heads, ``T`` tokens of a segment, ``D`` head dims,
``k`` entries per query, ``N`` entries a stream holds.

Per segment the caller's order is: ``reset`` the streams that start a document,
``search`` with the segment's queries, then ``add`` the segment's keys and
values, so that a segment never retrieves itself.
"""

import abc
from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass
class Retrieval:
    """The top-k entries found for each query. Shapes: (B, H, T, k[, D])."""

    keys: Optional[Tensor]  # (B, H, T, k, D), detached, in the queries' dtype; None from search(vectors=False or keys=False)
    values: Optional[Tensor]  # (B, H, T, k, D), detached; None from search(vectors=False)
    scores: Tensor  # (B, H, T, k) inner products; -inf where invalid
    positions: Tensor  # (B, H, T, k) int64 position in the document; -1 where invalid
    mask: Tensor  # (B, H, T, k) bool, True where an entry was found


@dataclass(frozen=True)
class StoredEntries:
    """Copies of the ``N`` entries one stream holds now, for analysis (changing them
    changes nothing in the store). Entry ``i`` sits in ring slot ``i``: the order
    is the ring's, not the document's; ``positions`` says where each came from."""

    keys: Tensor  # (H, N, D), in the store's dtype
    values: Tensor  # (H, N, D)
    positions: Tensor  # (N,) int64 position of each entry in its document


class MemoryStore(abc.ABC):
    """Per stream and head, the (key, value) pairs of the current document's past tokens.

    Sizes, read-only: ``num_streams`` (B), ``num_heads`` (H), ``head_dim`` (D) and
    ``memory_size``, the most entries a stream holds (the oldest go first; 0: a
    memory that stays empty).
    """

    num_streams: int
    num_heads: int
    head_dim: int
    memory_size: int

    @abc.abstractmethod
    def add(self, keys: Tensor, values: Tensor, token_mask: Optional[Tensor] = None) -> None:
        """Write a segment: ``keys`` and ``values`` (B, H, T, D), ``token_mask`` bool (B, T)
        True for the tokens to write (None: all; padding is never written). Entries are
        stored detached: no gradient reaches them."""

    @abc.abstractmethod
    def search(self, queries: Tensor, k: int, vectors: bool = True, keys: bool = True) -> Retrieval:
        """The top-``k`` entries by inner product for ``queries`` (B, H, T, D), each
        stream in its own entries only. Returns a :class:`Retrieval` whose last
        dimension is at most ``k`` (never wider than the fullest stream can fill,
        at least 1); entries a stream lacks are masked out. ``vectors=False``: only
        scores, positions and mask (keys and values None), for a caller that reads no
        vector, e.g. the neural cache; ``keys=False``: the values but not the keys, for
        a caller that takes its logits from ``scores`` (attention without gradient).
        The same entries either way."""

    @abc.abstractmethod
    def reset(self, streams: Optional[Tensor] = None) -> None:
        """Forget everything ``streams`` (bool (B,); None: all streams) hold: a
        document starts there. The other streams keep their entries."""

    @abc.abstractmethod
    def num_valid(self, stream: int) -> int:
        """Entries ``stream`` holds now (0 .. ``memory_size``)."""

    @abc.abstractmethod
    def is_empty(self) -> bool:
        """True while a search can find nothing in any stream."""

    @abc.abstractmethod
    def entries(self, stream: int) -> StoredEntries:
        """The ``num_valid(stream)`` entries ``stream`` holds, as copies (see
        :class:`StoredEntries`)."""
