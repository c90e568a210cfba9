"""The kNN memory: per stream and per head, a ring buffer of (key, value) pairs.

This one class owns all memory state. Its invariants (each one tested in
``tests/test_knn_memory.py``):

* one store per stream (batch row) and per head; streams never see each other;
* ``reset(streams)`` empties only the named streams (a document starts there);
* when full, the oldest entries are overwritten first (a ring buffer, as in
  meliad); the memory is never wiped wholesale;
* entries are stored detached: no gradient ever reaches them;
* every entry remembers its position in its document, for reports and demos;
* with ``shift_keys``, the entry of position ``p`` holds the key of ``p - 1``
  (the previous token of the same document, carried across segments; a
  document's first token keys itself) and the value of ``p``.

It implements :class:`~fairseq_memtrm.memory.store.MemoryStore`; the order
of operations per segment is the caller's (see there).
"""

import inspect
import logging
from typing import Optional, Tuple

import torch
from torch import Tensor

from .search import build_backend, parse_backend_spec
from .store import MemoryStore, Retrieval, StoredEntries  # noqa: F401  (Retrieval: imported from here too)

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def memory_bytes(memory_size: int, num_heads: int, head_dim: int, dtype: str = "fp32",
                 backend: str = "exact") -> int:
    """Bytes one stream needs for one memory layer: keys + values + positions,
    plus what the search backend's own index keeps per entry."""
    element = torch.finfo(DTYPES[dtype]).bits // 8
    cls, options = parse_backend_spec(backend)
    accepted = inspect.signature(cls.index_bytes_per_entry).parameters  # e.g. hnsw_m
    index = cls.index_bytes_per_entry(num_heads, head_dim, **{k: v for k, v in options.items() if k in accepted})
    return memory_size * (num_heads * head_dim * 2 * element + 8 + index)


class KNNMemory(MemoryStore):
    """Ring-buffer memory of ``memory_size`` tokens per stream, for every head.

    Storage grows on demand (doubling) up to ``memory_size``, so short
    documents do not pay for a 262K-token buffer.
    """

    def __init__(
        self,
        num_streams: int,
        num_heads: int,
        head_dim: int,
        memory_size: int,
        dtype: str = "fp32",
        backend: str = "exact",
        shift_keys: bool = False,
    ):
        if memory_size < 0:
            from fairseq_memtrm.errors import MemtrmUserError

            raise MemtrmUserError(f"--memory-size must be >= 0, got {memory_size}")
        self.num_streams = num_streams
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.memory_size = memory_size
        self.dtype = DTYPES[dtype]
        self.backend = build_backend(
            backend,
            num_streams=num_streams,
            num_heads=num_heads,
            head_dim=head_dim,
            memory_size=memory_size,
        )
        # Shifted keys (a "smeared key", Olsson et al. 2022): a query that matches
        # the key of a past token reads the value of the token that followed it,
        # the induction step ("last time, this came next") built into the memory.
        self.shift_keys = shift_keys
        self.last_keys: Optional[Tensor] = None  # (B, H, D) each stream's newest key
        self.capacity = 0
        self.keys: Optional[Tensor] = None  # (B, H, capacity, D)
        self.values: Optional[Tensor] = None  # (B, H, capacity, D)
        self.positions: Optional[Tensor] = None  # (B, capacity) int64, -1 = empty
        # tokens written per stream since its document started = next position
        self.written = torch.zeros(num_streams, dtype=torch.long)

    # ------------------------------------------------------------------ state
    def num_valid(self, stream: int) -> int:
        """Entries ``stream`` holds now: ring slots ``[0, num_valid)`` are filled."""
        return min(int(self.written[stream]), self.memory_size)

    def is_empty(self) -> bool:
        return bool((self.written == 0).all()) or self.memory_size == 0

    def entries(self, stream: int) -> StoredEntries:
        """Copies of ring slots ``[0, num_valid(stream))``: keys, values (H, N, D), positions (N,)."""
        valid = self.num_valid(stream)
        if self.keys is None or valid == 0:
            empty = torch.zeros(self.num_heads, 0, self.head_dim, dtype=self.dtype)
            return StoredEntries(empty, empty.clone(), torch.zeros(0, dtype=torch.long))
        return StoredEntries(self.keys[stream, :, :valid].clone(), self.values[stream, :, :valid].clone(),
                             self.positions[stream, :valid].clone())

    def reset(self, streams: Optional[Tensor] = None) -> None:
        """Forget the memory of ``streams`` (bool[B]; None = all streams)."""
        if streams is None:
            streams = torch.ones(self.num_streams, dtype=torch.bool)
        streams = streams.detach().to("cpu", torch.bool)
        if streams.numel() != self.num_streams:
            raise ValueError(f"reset got {streams.numel()} streams, memory has {self.num_streams}")
        for stream in streams.nonzero().flatten().tolist():
            self.written[stream] = 0
            if self.last_keys is not None:
                self.last_keys[stream] = 0
            if self.positions is not None:
                self.positions[stream] = -1
            self.backend.on_reset(stream)

    def _ensure_capacity(self, needed: int, like: Tensor) -> None:
        needed = min(needed, self.memory_size)
        if self.keys is not None and (needed <= self.capacity):
            return
        capacity = min(self.memory_size, max(needed, 2 * self.capacity, 256))
        shape = (self.num_streams, self.num_heads, capacity, self.head_dim)
        keys = like.new_zeros(shape, dtype=self.dtype)
        values = like.new_zeros(shape, dtype=self.dtype)
        positions = torch.full((self.num_streams, capacity), -1, dtype=torch.long, device=like.device)
        if self.keys is not None:
            keys[:, :, : self.capacity] = self.keys
            values[:, :, : self.capacity] = self.values
            positions[:, : self.capacity] = self.positions
        self.keys, self.values, self.positions, self.capacity = keys, values, positions, capacity

    def gather(self, stream: int, slots: Tensor, keys: bool = True) -> Tuple[Optional[Tensor], Tensor, Tensor]:
        """The entries of ``stream`` at ring ``slots`` (H, T, n), each head its own:
        keys (None if not ``keys``) and values (H, T, n, D), positions (H, T, n)."""
        found_keys, values, positions = self.gather_streams(slots.unsqueeze(0), keys, streams=[stream])
        return None if found_keys is None else found_keys[0], values[0], positions[0]

    def gather_streams(self, slots: Tensor, keys: bool = True, values: bool = True, streams: Optional[list] = None
                       ) -> Tuple[Optional[Tensor], Optional[Tensor], Tensor]:
        """The entries at ring ``slots`` (S, H, T, n) of ``streams`` (default all, in order):
        keys and values (S, H, T, n, D; None if not asked for), positions (S, H, T, n). Each
        comes from one ``index_select`` into a tensor that nothing zeroes first: on the CPU,
        the first touch of a large new tensor, not the copy, is what a gather costs."""
        count, heads = slots.shape[:2]
        stream_ids = torch.arange(count, device=slots.device) if streams is None else torch.tensor(
            streams, device=slots.device)
        # one index_select over (B * H * capacity) rows: a gather with an
        # expanded index is several times slower on CPU
        offsets = (stream_ids.view(count, 1) * heads + torch.arange(heads, device=slots.device)) * self.capacity
        rows = (slots + offsets.view(count, heads, 1, 1)).view(-1)
        shape = (*slots.shape, self.head_dim)
        found_keys = self.keys.view(-1, self.head_dim).index_select(0, rows).view(shape) if keys else None
        found_values = self.values.view(-1, self.head_dim).index_select(0, rows).view(shape) if values else None
        positions = self.positions.view(-1).index_select(
            0, (slots + (stream_ids * self.capacity).view(count, 1, 1, 1)).view(-1)).view(slots.shape)
        return found_keys, found_values, positions

    # ------------------------------------------------------------- interface
    @torch.no_grad()
    @torch.profiler.record_function("knn_memory.add")  # labels for scripts/bench_memory.py profiles
    def add(self, keys: Tensor, values: Tensor, token_mask: Optional[Tensor] = None) -> None:
        """Write a segment. ``keys``/``values``: (B, H, T, D); ``token_mask``: bool (B, T),
        True for real tokens (padding is never written). Stored detached."""
        if self.memory_size == 0:
            return
        bsz, _, seq_len, _ = keys.shape
        if token_mask is None:
            token_mask = keys.new_ones(bsz, seq_len, dtype=torch.bool)
        counts = token_mask.sum(dim=1).tolist()
        self._ensure_capacity(max(int(self.written.max()) + max(counts), 1), keys)
        if self.shift_keys and self.last_keys is None:
            self.last_keys = keys.new_zeros(bsz, self.num_heads, self.head_dim, dtype=self.dtype)
        for stream in range(bsz):
            index = token_mask[stream].nonzero().flatten()
            if index.numel() == 0:
                continue
            stream_keys = keys[stream, :, index].detach().to(self.dtype)  # (H, n, D)
            if self.shift_keys:
                first = self.last_keys[stream, :, None] if self.written[stream] > 0 else stream_keys[:, :1]
                shifted = torch.cat([first, stream_keys[:, :-1]], dim=1)  # copies `first` before it is replaced
                self.last_keys[stream] = stream_keys[:, -1]
                stream_keys = shifted
            keep = min(index.numel(), self.memory_size)  # only the newest can survive
            index, stream_keys = index[-keep:], stream_keys[:, -keep:]
            start = int(self.written[stream]) + (counts[stream] - keep)
            doc_positions = torch.arange(start, start + keep, device=keys.device)
            slots = doc_positions % self.memory_size
            self.keys[stream, :, slots] = stream_keys
            self.values[stream, :, slots] = values[stream, :, index].detach().to(self.dtype)
            self.positions[stream, slots] = doc_positions
            self.written[stream] += counts[stream]
            self.backend.on_add(stream, slots, stream_keys)

    @torch.no_grad()
    @torch.profiler.record_function("knn_memory.search")
    def search(self, queries: Tensor, k: int, vectors: bool = True, keys: bool = True) -> Retrieval:
        """Top-``k`` entries by inner product for ``queries`` (B, H, T, D).

        Streams holding fewer than ``k`` entries return what they have, the rest
        masked out (``mask`` False, ``positions`` -1, ``scores`` -inf). The last
        dimension is ``min(k, entries of the fullest stream)`` (at least 1).
        ``vectors=False`` skips gathering keys and values, ``keys=False`` the keys
        alone (None in the result).
        """
        bsz, heads, seq_len, dim = queries.shape
        # the buffers are never wider than the fullest stream can fill: a k far
        # beyond the memory's size must not allocate B x H x T x k x D
        k = max(1, min(k, max(self.num_valid(stream) for stream in range(bsz))))
        out_scores = queries.new_full((bsz, heads, seq_len, k), float("-inf"))
        slots = torch.full((bsz, heads, seq_len, k), -1, dtype=torch.long, device=queries.device)
        for stream in range(bsz):
            num_valid = self.num_valid(stream)
            if num_valid == 0:
                continue
            found = min(k, num_valid)
            scores, found_slots = self.backend.search(stream, queries[stream].detach(),
                                                      self.keys[stream, :, :num_valid], found)
            out_scores[stream, :, :, :found] = scores.to(queries.dtype)
            slots[stream, :, :, :found] = found_slots
        # approximate backends may find fewer than k, and short streams hold fewer: slot -1
        missing = slots < 0
        out_scores.masked_fill_(missing, float("-inf"))
        if self.keys is None:  # nothing written yet: every entry is missing
            shape = (bsz, heads, seq_len, k, dim)
            out_keys = queries.new_zeros(shape) if vectors and keys else None
            out_values = queries.new_zeros(shape) if vectors else None
            return Retrieval(out_keys, out_values, out_scores, slots, ~missing)
        out_keys, out_values, out_positions = self.gather_streams(slots.clamp(min=0), keys=vectors and keys,
                                                                 values=vectors)
        out_positions.masked_fill_(missing, -1)
        if vectors:
            out_keys, out_values = [None if found is None else found.to(queries.dtype)
                                    for found in (out_keys, out_values)]
            if bool(missing.any()):  # entries not found read as zeros
                for found in (out_keys, out_values):
                    if found is not None:
                        found.masked_fill_(missing.unsqueeze(-1), 0.0)
        return Retrieval(out_keys, out_values, out_scores, out_positions, out_positions >= 0)
