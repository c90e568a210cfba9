"""faiss search backends: ``faiss-flat`` (exact), ``faiss-ivf`` and ``faiss-hnsw`` (approximate).

All search the memory one (stream, head) at a time, because faiss indexes
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
* ``faiss-hnsw`` keeps a ring of blocks, one HNSW graph per block lap and
  head (see :class:`FaissHNSWSearch`); on the CPU like ``faiss-ivf``.

Measured speed and recall of each: ``docs/benchmark.md``.
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
    search is exact until then. For queries that do not lie where the keys do
    (queries and keys are different projections), ``assign=2`` adds every key to
    its 2 nearest lists (twice the index RAM; a search takes ``k * assign``
    results and keeps each slot once); off by default.
    """

    name = "faiss-ivf"
    approximate = True

    def __init__(self, *args, nlist: Optional[int] = None, nprobe: int = 8,
                 train_size: Optional[int] = None, assign: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.nlist = nlist or default_nlist(self.memory_size)
        self.nprobe = min(nprobe, self.nlist)
        self.train_size = train_size or 39 * self.nlist
        if assign < 1 or assign > self.nlist:
            from fairseq_memtrm.errors import MemtrmUserError

            raise MemtrmUserError(f"faiss-ivf: assign={assign} must be between 1 and nlist ({self.nlist})")
        self.assign = int(assign)
        self.indexes: Dict[int, List[faiss.IndexIVFFlat]] = {}  # stream -> one index per head
        self.exact = ExactSearch(*args, **kwargs)

    @classmethod
    def index_bytes_per_entry(cls, num_heads: int, head_dim: int, assign: int = 1) -> int:
        """Each entry is copied into the index ``assign`` times: fp32 key + int64 id, per head."""
        return assign * num_heads * (head_dim * 4 + 8)

    def is_indexed(self, stream: int) -> bool:
        return stream in self.indexes

    def on_reset(self, stream):
        self.indexes.pop(stream, None)

    def _add(self, index: faiss.IndexIVFFlat, keys: np.ndarray, ids: np.ndarray) -> None:
        """Add ``keys`` under ``ids`` to each of their ``assign`` nearest lists."""
        if self.assign == 1:
            index.add_with_ids(keys, ids)
            return
        _, lists = index.quantizer.search(keys, self.assign)
        for column in range(self.assign):
            assigned = np.ascontiguousarray(lists[:, column])
            index.add_core(keys.shape[0], faiss.swig_ptr(keys), faiss.swig_ptr(ids), faiss.swig_ptr(assigned))

    def on_add(self, stream, slots, keys):
        indexes = self.indexes.get(stream)
        if indexes is None:  # not trained yet: search reads the ring itself
            return
        ids = np.ascontiguousarray(slots.detach().to("cpu", torch.int64).numpy())
        # Before the ring wraps, the index holds exactly slots [0, ntotal / assign).
        overwritten = ids[ids < indexes[0].ntotal // self.assign]
        selector = faiss.IDSelectorBatch(overwritten) if overwritten.size else None
        host_keys = host_float32(keys)
        for head, index in enumerate(indexes):
            if selector is not None:
                index.remove_ids(selector)  # every copy of each id
            self._add(index, host_keys[head], ids)

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
            # faiss's default for inner product, stated because it matters: plain
            # k-means lets a few long centroids take most keys (lists ~100x
            # unbalanced on real keys, recall near 0); spherical keeps them even.
            index.cp.spherical = True
            index.train(np.ascontiguousarray(head_keys[sample]))
            self._add(index, head_keys, ids)
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
            distances, labels = index.search(host_queries[head], k * self.assign)
            found_scores, found_slots = faiss_results(distances, labels, torch.device("cpu"))
            if self.assign > 1:
                found_scores, found_slots = once_each(found_scores, found_slots, k)
            scores[head], slots[head] = found_scores, found_slots
        return scores.to(queries.device, queries.dtype), slots.to(queries.device)


def once_each(scores: Tensor, slots: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The best ``k`` of (T, n) results sorted by score, each slot kept once (a key held
    in several lists is found with the same score each time); -inf / -1 pad the rest."""
    order = slots.sort(dim=1, stable=True)
    repeat = torch.zeros_like(slots, dtype=torch.bool)
    repeat[:, 1:] = order.values[:, 1:].eq(order.values[:, :-1]) & order.values[:, 1:].ge(0)
    scores = scores.gather(1, order.indices).masked_fill(repeat, float("-inf"))
    best = scores.topk(k, dim=1)
    kept = order.values.gather(1, best.indices)
    return best.values, kept.masked_fill(best.values.eq(float("-inf")), -1)


class BlockIndexes:
    """HNSW indexes (one per head) of one lap of one ring block; ids = ring slots.

    ``valid_from``: slots below it were overwritten by the next lap and are
    filtered out of search results (HNSW cannot delete).
    """

    def __init__(self, num_heads: int, head_dim: int, hnsw_m: int, ef_construction: int):
        self.heads = []
        for _ in range(num_heads):
            index = faiss.IndexIDMap(faiss.IndexHNSWFlat(head_dim, hnsw_m, faiss.METRIC_INNER_PRODUCT))
            faiss.downcast_index(index.index).hnsw.efConstruction = ef_construction
            self.heads.append(index)
        self.valid_from = 0


@register_backend
class FaissHNSWSearch(SearchBackend):
    """Approximate search: the ring is ``num_blocks`` blocks, each lap of a block
    its own HNSW graph per head (ids = ring slots), added to as keys arrive.

    When the ring wraps into a block, its previous lap's graphs stay searchable
    with the overwritten slots filtered out, and are dropped once the new lap
    has replaced the whole block: eviction never rebuilds a graph, and search
    sees exactly the entries the ring holds. Each query searches every live
    graph (at most ``num_blocks + 1``) and the results are merged.
    """

    name = "faiss-hnsw"
    approximate = True

    def __init__(self, *args, num_blocks: int = 4, hnsw_m: int = 32, ef_search: int = 64,
                 ef_construction: int = 40, **kwargs):
        super().__init__(*args, **kwargs)
        self.block_size = max(1, -(-self.memory_size // num_blocks))
        self.hnsw_m, self.ef_search, self.ef_construction = hnsw_m, ef_search, ef_construction
        # stream -> block -> [previous lap or None, current lap]
        self.laps: Dict[int, Dict[int, List[Optional[BlockIndexes]]]] = {}

    @classmethod
    def index_bytes_per_entry(cls, num_heads: int, head_dim: int, hnsw_m: int = 32) -> int:
        """fp32 key, int64 id and about 2 * M int32 level-0 links per head (upper levels ~ +3%)."""
        return num_heads * (head_dim * 4 + 8 + int(2 * hnsw_m * 4 * 1.03))

    def is_indexed(self, stream: int) -> bool:
        return bool(self.laps.get(stream))

    def on_reset(self, stream):
        self.laps.pop(stream, None)

    def on_add(self, stream, slots, keys):
        slots = slots.detach().cpu()
        if slots.numel() >= self.memory_size:  # the whole ring is rewritten at once
            self.laps.pop(stream, None)
        blocks = self.laps.setdefault(stream, {})
        host_keys = host_float32(keys)
        block_of = slots // self.block_size
        # slots are consecutive (mod memory_size): split them into runs per block
        cut = (block_of[1:] != block_of[:-1]).nonzero().flatten().add(1).tolist()
        for run_start, run_end in zip([0] + cut, cut + [slots.numel()]):
            block = int(block_of[run_start])
            first, last = int(slots[run_start]), int(slots[run_end - 1])
            laps = blocks.setdefault(block, [None, None])
            if laps[1] is None or first == block * self.block_size:  # a new lap of this block
                laps[0], laps[1] = laps[1], BlockIndexes(
                    self.num_heads, self.head_dim, self.hnsw_m, self.ef_construction)
            if laps[0] is not None:
                laps[0].valid_from = last + 1
                block_end = min((block + 1) * self.block_size, self.memory_size)
                if laps[0].valid_from >= block_end:
                    laps[0] = None  # fully replaced
            ids = slots[run_start:run_end].numpy().astype(np.int64)
            for head, index in enumerate(laps[1].heads):
                index.add_with_ids(np.ascontiguousarray(host_keys[head, run_start:run_end]), ids)

    def search(self, stream, queries, keys, k):
        heads, seq_len, _ = queries.shape
        host_queries = host_float32(queries)
        live = []  # (lap, search parameters)
        for block, laps in sorted(self.laps.get(stream, {}).items()):
            for lap in laps:
                if lap is None:
                    continue
                params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
                if lap.valid_from > block * self.block_size:
                    lap.selector = faiss.IDSelectorRange(lap.valid_from, (block + 1) * self.block_size)
                    params.sel = lap.selector  # the parameters keep no reference: lap does
                live.append((lap, params))
        all_scores, all_slots = [], []
        for lap, params in live:
            results = [lap.heads[head].search(host_queries[head], k, params=params) for head in range(heads)]
            all_scores.append(np.stack([distances for distances, _ in results]))
            all_slots.append(np.stack([labels for _, labels in results]))
        scores, slots = faiss_results(np.concatenate(all_scores, -1), np.concatenate(all_slots, -1),
                                      torch.device("cpu"))
        scores, order = scores.topk(k, dim=-1)
        slots = slots.gather(-1, order)
        return scores.to(queries.device, queries.dtype), slots.masked_fill(scores == float("-inf"), -1).to(
            queries.device)
