"""Which memory a forward pass reads: one :class:`MemoryStore` per stream set and layer.

A *stream set* names a family of streams that read documents in order:
``"train"``, ``"valid"``, ``"test"``, a demo session id. Validation in the
middle of training runs on the same model object, so memories are keyed by
stream set and never shared: validation can neither read nor clobber the
training streams' memory, and one demo session never sees another's document.
"""

import logging
import os
from typing import Dict, List, Optional

import torch
from torch import Tensor

from fairseq_memtrm.errors import MemtrmUserError

from .chunked_memory import ChunkedKNNMemory
from .knn_memory import KNNMemory, memory_bytes
from .store import MemoryStore

logger = logging.getLogger(__name__)


def available_bytes(device: torch.device) -> int:
    """Free memory where the memory would live: host RAM or the CUDA device."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: no check
        return 1 << 62


class StreamSetBank:
    """The per-stream-set state of a memory model: built on a stream set's first
    batch, reset per stream at ``doc_start``, never shared between stream sets.

    A subclass builds one stream set's stores (:meth:`_build_stream_set`: {layer or
    name: store}, each store with ``num_streams`` and ``reset(streams)``) and says
    what one stream costs (:meth:`bytes_per_stream`); :meth:`select` is the rest,
    written once for every kind of memory (the kNN stores here, the GPTm matrix in
    ``matrix_memory.py``).
    """

    #: what the memory is called in the log and in the out-of-memory sentence
    memory_name = "memory"

    def __init__(self):
        self.stream_sets: Dict[str, Dict[int, object]] = {}

    def bytes_per_stream(self) -> int:
        raise NotImplementedError

    def _build_stream_set(self, num_streams: int, device: torch.device) -> Dict[int, object]:
        raise NotImplementedError

    def _size_terms(self) -> str:
        """What sets a stream's size, for the log and the out-of-memory sentence."""
        raise NotImplementedError

    def _smaller(self) -> str:
        """The fix when the memory does not fit."""
        raise NotImplementedError

    def check_fits(self, num_streams: int, device: torch.device) -> None:
        """Fail before any work when ``num_streams`` full memories would not fit."""
        need = num_streams * self.bytes_per_stream()
        held = sum(
            next(iter(m.values())).num_streams * self.bytes_per_stream()
            for m in self.stream_sets.values()
            if m
        )
        free = available_bytes(device) + held
        if need > 0.9 * free:
            raise MemtrmUserError(
                f"the {self.memory_name} needs {need / 2**30:.1f} GiB ({num_streams} streams x "
                f"{self.bytes_per_stream() / 2**20:.0f} MiB: {self._size_terms()}) but only {free / 2**30:.1f} GiB "
                f"is free on {device}; {self._smaller()}"
            )

    def select(self, stream_set: str, num_streams: int, doc_start: Optional[Tensor], device: torch.device):
        """The stores for this batch, with streams at ``doc_start`` reset.

        ``doc_start`` None means the batch carries no document structure (e.g.
        fairseq's ``language_modeling`` task): every stream is reset, so memory
        only spans the segments of one batch... which is none: it stays empty.
        """
        memories = self.stream_sets.get(stream_set)
        held_streams = next(iter(memories.values())).num_streams if memories else num_streams
        if memories is not None and held_streams != num_streams:
            if doc_start is not None and not bool(doc_start.all()):
                raise MemtrmUserError(
                    f"stream set {stream_set!r} changed from {held_streams} to {num_streams} streams in the "
                    "middle of its documents; keep --batch-size fixed within an epoch"
                )
            memories = None
        if memories is None:
            self.check_fits(num_streams, device)
            logger.info("%s for stream set %r: %d streams x %.1f MiB (%s)", self.memory_name, stream_set,
                        num_streams, self.bytes_per_stream() / 2**20, self._size_terms())
            memories = self._build_stream_set(num_streams, device)
            self.stream_sets[stream_set] = memories
        for memory in memories.values():
            memory.reset(None if doc_start is None else doc_start)
        return memories

    def clear(self, stream_set: Optional[str] = None) -> None:
        """Drop a stream set's memory (or all of them), freeing its storage."""
        if stream_set is None:
            self.stream_sets.clear()
        else:
            self.stream_sets.pop(stream_set, None)

    def memories(self, stream_set: str) -> list:
        """The stores of ``stream_set``, in the order they were built (none before its first batch)."""
        return list(self.stream_sets.get(stream_set, {}).values())


class MemoryBank(StreamSetBank):
    """Memories of one model. ``layers`` maps a layer index to (num_heads, head_dim).
    ``chunk_size`` > 1 gives LongMem's chunked retrieval (:class:`ChunkedKNNMemory`);
    ``shift_keys`` keys each entry by the previous token (:class:`KNNMemory`)."""

    memory_name = "kNN memory"

    def __init__(self, layers: Dict[int, tuple], memory_size: int, dtype: str, backend: str,
                 chunk_size: int = 1, shift_keys: bool = False):
        if shift_keys and chunk_size > 1:
            raise MemtrmUserError(
                "--memory-shift-keys works with token retrieval only: drop it or set --memory-chunk-size 1"
            )
        if chunk_size < 1 or memory_size % chunk_size:
            raise MemtrmUserError(
                f"--memory-size ({memory_size}) must be a multiple of --memory-chunk-size ({chunk_size})"
            )
        self.layers = dict(layers)
        self.memory_size = memory_size
        self.dtype = dtype
        self.backend = backend
        self.chunk_size = chunk_size
        self.shift_keys = shift_keys
        super().__init__()

    def resized(self, memory_size: int, backend: Optional[str] = None) -> "MemoryBank":
        """A new, empty bank like this one (layers, dtype, backend, chunks, key
        shift) holding ``memory_size`` tokens per stream (searched by ``backend``
        where given)."""
        return MemoryBank(self.layers, memory_size, self.dtype, backend or self.backend, self.chunk_size,
                          self.shift_keys)

    def bytes_per_stream(self) -> int:
        if self.chunk_size > 1:  # the token ring is searched by nobody; chunk means by the backend
            return sum(
                memory_bytes(self.memory_size, h, d, self.dtype, "exact")
                + memory_bytes(self.memory_size // self.chunk_size, h, d, self.dtype, self.backend)
                for h, d in self.layers.values()
            )
        return sum(
            memory_bytes(self.memory_size, h, d, self.dtype, self.backend) for h, d in self.layers.values()
        )

    def _build_memory(self, num_streams: int, heads: int, dim: int) -> MemoryStore:
        if self.chunk_size > 1:
            return ChunkedKNNMemory(num_streams, heads, dim, self.memory_size, self.chunk_size,
                                    self.dtype, self.backend)
        return KNNMemory(num_streams, heads, dim, self.memory_size, self.dtype, self.backend, self.shift_keys)

    def _build_stream_set(self, num_streams: int, device: torch.device) -> Dict[int, MemoryStore]:
        return {layer: self._build_memory(num_streams, heads, dim) for layer, (heads, dim) in self.layers.items()}

    def _size_terms(self) -> str:
        return f"--memory-size {self.memory_size}, {len(self.layers)} memory layer(s), {self.dtype}"

    def _smaller(self) -> str:
        return "lower --memory-size or --batch-size, or use --memory-dtype fp16"

    def memories(self, stream_set: str) -> List[MemoryStore]:
        """The stores of ``stream_set``, one per memory layer in the order of ``layers`` (none before its first batch)."""
        return super().memories(stream_set)
