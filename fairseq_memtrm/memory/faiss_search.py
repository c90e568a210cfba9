"""faiss search backends: ``faiss-flat`` (exact) and ``faiss-ivf`` (approximate).

Both search the memory one (stream, head) at a time, because faiss indexes
hold one set of vectors each, and return the same ``(scores, slots)`` as
:class:`~fairseq_memtrm.memory.search.ExactSearch`.

* ``faiss-flat`` runs faiss's brute-force inner-product kNN (the kernel behind
  ``IndexFlatIP.search``) directly on the memory's ring buffer, so it keeps no
  copy of the keys and eviction needs no bookkeeping. With faiss-gpu installed
  and CUDA keys it runs on the GPU; otherwise on the CPU.
* ``faiss-ivf`` keeps one ``IndexIVFFlat`` per stream and head whose ids are
  ring slots. Overwriting a slot removes its old id and adds the new key, so
  eviction is incremental (the index is never rebuilt or wiped while the
  document lasts). The coarse quantizer is trained on the document's own
  keys once the stream holds ``train_size`` of them; until then (and for
  memories smaller than that) search is exact. ``on_reset`` drops the
  stream's indexes, so every document trains its own clusters. Search scans
  ``nprobe`` of ``nlist`` lists: recall below 1, measured by
  ``scripts/bench_memory.py`` and tested in ``tests/test_search_backends.py``.
  The index holds an fp32 copy of the keys: see ``index_bytes_per_entry``.
  It always runs on the CPU (queries and keys are copied to the host).
"""

import logging
import math
from typing import Dict, List, Optional, Tuple

import faiss
import numpy as np
import torch
from torch import Tensor

from .search import ExactSearch, SearchBackend, register_backend

logger = logging.getLogger(__name__)


def host_float32(tensor: Tensor) -> np.ndarray:
    """A C-contiguous float32 numpy view (or copy) of a tensor, as faiss wants."""
    return np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())


def faiss_gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def faiss_results(distances: np.ndarray, labels: np.ndarray, device: torch.device) -> Tuple[Tensor, Tensor]:
    """faiss (T, k) results as torch tensors; unfilled results get -inf / slot -1."""
    scores = torch.from_numpy(distances)
    slots = torch.from_numpy(labels)
    scores = scores.masked_fill(slots < 0, float("-inf"))
    return scores.to(device), slots.to(device)


@register_backend
class FaissFlatSearch(SearchBackend):
    """Exact search with faiss's brute-force kNN, one head at a time."""

    name = "faiss-flat"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gpu_resources = None

    def search(self, stream, queries, keys, k):
        if queries.is_cuda and faiss_gpu_available():
            return self._search_gpu(queries, keys, k)
        heads, seq_len, _ = queries.shape
        scores = torch.empty(heads, seq_len, k)
        slots = torch.empty(heads, seq_len, k, dtype=torch.long)
        host_queries = host_float32(queries)
        for head in range(heads):
            distances, labels = faiss.knn(
                host_queries[head], host_float32(keys[head]), k, metric=faiss.METRIC_INNER_PRODUCT
            )
            scores[head], slots[head] = faiss_results(distances, labels, torch.device("cpu"))
        return scores.to(queries.device), slots.to(queries.device)

    def _search_gpu(self, queries: Tensor, keys: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        import faiss.contrib.torch_utils  # noqa: F401  (lets faiss take CUDA tensors)

        if self._gpu_resources is None:
            self._gpu_resources = faiss.StandardGpuResources()
        results = [
            faiss.knn_gpu(
                self._gpu_resources, queries[head].float().contiguous(), keys[head].float().contiguous(),
                k, metric=faiss.METRIC_INNER_PRODUCT,
            )
            for head in range(queries.size(0))
        ]
        scores = torch.stack([distances for distances, _ in results])
        slots = torch.stack([labels for _, labels in results]).long()
        return scores.masked_fill(slots < 0, float("-inf")).to(queries.dtype), slots


def default_nlist(memory_size: int) -> int:
    """About sqrt(memory_size) lists, a power of two: 256 for 65K, 512 for 262K."""
    return max(16, 2 ** round(math.log2(max(1, memory_size) ** 0.5)))


@register_backend
class FaissIVFSearch(SearchBackend):
    """Approximate search: an inverted-file index per stream and head, ids = ring slots.

    ``nlist`` lists (default about sqrt(memory_size)), ``nprobe`` of them
    scanned per query. The index is trained on the first ``train_size`` keys
    of each document (default 39 per list, faiss's minimum for k-means);
    search is exact until then.
    """

    name = "faiss-ivf"
    approximate = True

    def __init__(self, *args, nlist: Optional[int] = None, nprobe: int = 16,
                 train_size: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.nlist = nlist or default_nlist(self.memory_size)
        self.nprobe = min(nprobe, self.nlist)
        self.train_size = train_size or 39 * self.nlist
        self.indexes: Dict[int, List[faiss.IndexIVFFlat]] = {}  # stream -> one index per head
        self.exact = ExactSearch(*args, **kwargs)

    @classmethod
    def index_bytes_per_entry(cls, num_heads: int, head_dim: int) -> int:
        """Each entry is copied into the index: fp32 key + int64 id, per head."""
        return num_heads * (head_dim * 4 + 8)

    def is_indexed(self, stream: int) -> bool:
        return stream in self.indexes

    def on_reset(self, stream):
        self.indexes.pop(stream, None)

    def on_add(self, stream, slots, keys):
        indexes = self.indexes.get(stream)
        if indexes is None:  # not trained yet: search reads the ring itself
            return
        ids = slots.detach().to("cpu", torch.int64).numpy()
        # Before the ring wraps, the index holds exactly slots [0, ntotal).
        overwritten = ids[ids < indexes[0].ntotal]
        selector = faiss.IDSelectorBatch(overwritten) if overwritten.size else None
        host_keys = host_float32(keys)
        for head, index in enumerate(indexes):
            if selector is not None:
                index.remove_ids(selector)
            index.add_with_ids(host_keys[head], ids)

    def _build(self, keys: Tensor) -> List[faiss.IndexIVFFlat]:
        """Train one index per head on the ring's keys (H, N, D); ids = slots 0..N-1."""
        host_keys = host_float32(keys)
        ids = np.arange(host_keys.shape[1], dtype=np.int64)
        sample = np.random.default_rng(0).permutation(ids.size)[: self.train_size]
        indexes = []
        for head_keys in host_keys:
            # the factory's index owns its quantizer (no dangling reference)
            index = faiss.index_factory(self.head_dim, f"IVF{self.nlist},Flat", faiss.METRIC_INNER_PRODUCT)
            index.cp.min_points_per_centroid = 1  # train_size is ours to choose; no warning
            index.train(np.ascontiguousarray(head_keys[sample]))
            index.add_with_ids(head_keys, ids)
            index.nprobe = self.nprobe
            indexes.append(index)
        return indexes

    def search(self, stream, queries, keys, k):
        indexes = self.indexes.get(stream)
        if indexes is None:
            if keys.size(1) < max(self.train_size, self.nlist):
                return self.exact.search(stream, queries, keys, k)
            indexes = self.indexes[stream] = self._build(keys)
        heads, seq_len, _ = queries.shape
        scores = torch.empty(heads, seq_len, k)
        slots = torch.empty(heads, seq_len, k, dtype=torch.long)
        host_queries = host_float32(queries)
        for head, index in enumerate(indexes):
            index.nprobe = self.nprobe
            distances, labels = index.search(host_queries[head], k)
            scores[head], slots[head] = faiss_results(distances, labels, torch.device("cpu"))
        return scores.to(queries.device, queries.dtype), slots.to(queries.device)
