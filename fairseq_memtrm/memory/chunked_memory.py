"""Chunked retrieval (LongMem, Wang et al. 2023, sec. 3.3): token-to-chunk search.

The memory is cut into chunks of ``chunk_size`` consecutive tokens of a
document. A query is scored against each chunk's *mean key*; the ``k //
chunk_size`` best chunks are returned with all their tokens, so the attention
still reads ``k`` (key, value) pairs but the search covers ``chunk_size`` times
fewer entries, and each hit brings its neighbours along (a phrase, not a lone
token).

``ChunkedKNNMemory`` is a :class:`~fairseq_memtrm.memory.store.MemoryStore`
like :class:`KNNMemory`, so the kNN attention layer and the memory bank use it
unchanged. It is built from two plain ``KNNMemory`` ring buffers:

* ``tokens``: every token's key and value (``memory_size`` per stream);
* ``chunks``: one mean key per *complete* chunk (``memory_size // chunk_size``
  per stream), searched by the configured backend.

Chunk ``j`` of a document holds positions ``j*c .. j*c+c-1``; with
``memory_size`` a multiple of ``c`` those sit in consecutive ring slots. A chunk
becomes searchable once its last token is written (a document's trailing
partial chunk never is). The two rings evict at slightly different times, so a
retrieved chunk's tokens are checked against the positions the token ring still
holds: an overwritten token is masked out, never returned as a wrong neighbour.
"""

from typing import Optional

import torch
from torch import Tensor

from fairseq_memtrm.errors import MemtrmUserError

from .knn_memory import KNNMemory
from .store import MemoryStore, Retrieval, StoredEntries


class ChunkedKNNMemory(MemoryStore):
    """Per stream and head: a token ring plus a ring of chunk mean keys."""

    def __init__(self, num_streams: int, num_heads: int, head_dim: int, memory_size: int,
                 chunk_size: int, dtype: str = "fp32", backend: str = "exact"):
        if chunk_size < 1 or memory_size % chunk_size:
            raise MemtrmUserError(
                f"--memory-size ({memory_size}) must be a multiple of --memory-chunk-size ({chunk_size})"
            )
        self.chunk_size = chunk_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        # The token ring is only indexed by slot, never searched: "exact" keeps no index.
        self.tokens = KNNMemory(num_streams, num_heads, head_dim, memory_size, dtype, "exact")
        self.chunks = KNNMemory(num_streams, num_heads, head_dim, memory_size // chunk_size, dtype, backend)

    # ------------------------------------------------------------------ state
    @property
    def num_streams(self) -> int:
        return self.tokens.num_streams

    @property
    def memory_size(self) -> int:
        return self.tokens.memory_size

    @property
    def written(self) -> Tensor:
        """(B,) tokens written per stream since its document started."""
        return self.tokens.written

    def num_valid(self, stream: int) -> int:
        return self.tokens.num_valid(stream)

    def is_empty(self) -> bool:
        """True while no stream holds a complete (searchable) chunk."""
        return self.chunks.is_empty()

    def reset(self, streams: Optional[Tensor] = None) -> None:
        """Forget ``streams`` (bool[B]; None = all)."""
        self.tokens.reset(streams)
        self.chunks.reset(streams)

    def entries(self, stream: int) -> StoredEntries:
        """The token ring's entries (every token's own key and value, not the chunk means)."""
        return self.tokens.entries(stream)

    # ------------------------------------------------------------- interface
    @torch.no_grad()
    def add(self, keys: Tensor, values: Tensor, token_mask: Optional[Tensor] = None) -> None:
        """Write a segment: ``keys``/``values`` (B, H, T, D), ``token_mask`` bool (B, T).
        Then index every chunk the segment completed by its mean key and value."""
        if self.memory_size == 0:
            return
        before = self.tokens.written.clone()
        self.tokens.add(keys, values, token_mask)
        after = self.tokens.written
        c = self.chunk_size
        first_chunk = torch.div(before, c, rounding_mode="floor")
        new_chunks = torch.div(after, c, rounding_mode="floor") - first_chunk  # (B,)
        most = int(new_chunks.max())
        if most == 0:
            return
        bsz, heads, dim = keys.size(0), self.num_heads, self.head_dim
        chunk_keys = keys.new_zeros(bsz, heads, most, dim)
        chunk_values = keys.new_zeros(bsz, heads, most, dim)
        chunk_mask = torch.zeros(bsz, most, dtype=torch.bool, device=keys.device)
        offsets = torch.arange(c, device=keys.device)
        for stream in range(bsz):
            count = int(new_chunks[stream])
            if count == 0:
                continue
            # every token of a just-completed chunk is still in the token ring:
            # it was written at most memory_size tokens ago
            positions = (first_chunk[stream] + torch.arange(count, device=keys.device)).unsqueeze(1) * c + offsets
            slots = (positions % self.memory_size).view(1, 1, -1).expand(heads, 1, -1)
            stored_keys, stored_values, _ = self.tokens.gather(stream, slots)  # (H, 1, count * c, D)
            stored_keys = stored_keys.view(heads, count, c, dim)
            stored_values = stored_values.view(heads, count, c, dim)
            chunk_keys[stream, :, :count] = stored_keys.float().mean(dim=2).to(keys.dtype)
            chunk_values[stream, :, :count] = stored_values.float().mean(dim=2).to(keys.dtype)
            chunk_mask[stream, :count] = True
        self.chunks.add(chunk_keys, chunk_values, chunk_mask)

    @torch.no_grad()
    def search(self, queries: Tensor, k: int, vectors: bool = True, keys: bool = True) -> Retrieval:
        """The tokens of the ``max(1, k // chunk_size)`` chunks whose mean key has the
        largest inner product with each query of ``queries`` (B, H, T, D).

        Returns a :class:`Retrieval` of ``k' = n * c`` entries per query, ``n`` = ``max(1, k // c)``
        or fewer where fewer chunks are complete,
        chunk by chunk in rank order, tokens in document order within a chunk.
        ``scores`` are each token's own inner product with the query.
        """
        c = self.chunk_size
        hits = self.chunks.search(queries, max(1, k // c))  # (B, H, T, kc)
        bsz, heads, seq_len, num_chunks = hits.positions.shape
        dim = queries.size(-1)
        offsets = torch.arange(c, device=queries.device)
        positions = (hits.positions.unsqueeze(-1) * c + offsets).view(bsz, heads, seq_len, num_chunks * c)
        chunk_found = hits.mask.unsqueeze(-1).expand(-1, -1, -1, -1, c).reshape(positions.shape)
        out_keys = queries.new_zeros(bsz, heads, seq_len, num_chunks * c, dim)
        out_values = torch.zeros_like(out_keys)
        stored_positions = torch.full_like(positions, -1)
        for stream in range(bsz):
            if self.tokens.num_valid(stream) == 0:
                continue
            slots = (positions[stream].clamp(min=0) % self.memory_size)  # (H, T, k')
            out_keys[stream], out_values[stream], stored_positions[stream] = self.tokens.gather(stream, slots)
        # a token the ring has overwritten since its chunk was indexed is not returned
        mask = chunk_found & stored_positions.eq(positions)
        positions = positions.masked_fill(~mask, -1)
        scores = torch.einsum("bhtd,bhtkd->bhtk", queries, out_keys).masked_fill(~mask, float("-inf"))
        if not vectors:  # the scores needed the keys; the caller reads neither
            out_keys = out_values = None
        elif not keys:
            out_keys = None
        return Retrieval(out_keys, out_values, scores, positions, mask)
