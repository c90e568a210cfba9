"""Document streams: every batch row keeps reading the same document, segment
after segment, so a per-row kNN memory holds exactly that document's past.

Worked example: ``tokens_per_sample`` T=4, documents (lengths in tokens)
d0=9, d1=4, d2=5, d3=2, so d0 has 3 segments, d1 1, d2 2, d3 1. With
``batch_size`` 1 per rank and 2 ranks there are 2 global streams. Documents
go longest first to the stream with the fewest segments so far::

    stream 0: d0 d3          segments d0.0 d0.1 d0.2 d3.0
    stream 1: d2 d1          segments d2.0 d2.1 d1.0  --

    batch:      0     1     2     3
    rank 0:   d0.0  d0.1  d0.2  d3.0      doc_start  T F F T
    rank 1:   d2.0  d2.1  d1.0  (empty)   doc_start  T F T T

Every rank gets the same number of batches (the longest stream's); an
exhausted row is empty: source ``</s>`` then padding, target all padding, so
the criterion's padding mask drops it from the loss and fairseq-eval-lm
scores nothing there. Its ``doc_start`` is True, which keeps its memory empty.

Segment ``s`` of a document x_0..x_{n-1} has target x_{sT}..x_{sT+L-1} and
source (x_{sT-1} or ``</s>`` for s=0), x_{sT}..x_{sT+L-2}: every token is a
target exactly once and a segment never spans two documents. The last
segment of a document is shorter (L < T) and padded on the right.

Balance: a stream never holds more segments than the shortest stream plus the
longest document (greedy assignment to the least-loaded stream guarantees
it). Training shuffles per epoch from the seed: ties in that order, and the
reading order inside every stream; segments are never shuffled. A layout
depends only on (documents, streams, seed, epoch), so resuming a checkpoint
mid-epoch continues with the same streams at the next batch.
"""

import heapq
from typing import Dict, List, Optional

import numpy as np
import torch
from fairseq.data import data_utils

from .distant_repeats import DistantRepeats
from .documents import DocumentDataset


def assign_streams(doc_segments: np.ndarray, num_streams: int, order: np.ndarray) -> List[List[int]]:
    """Documents per stream: longest first (ties in ``order``), each to the
    stream with the fewest segments so far (lowest index on ties).

    ``doc_segments``: (num_docs,) segments per document; ``order``: a
    permutation of the documents that breaks ties between equal lengths.
    """
    ranked = order[np.argsort(-doc_segments[order], kind="stable")]
    loads = [(0, stream) for stream in range(num_streams)]
    streams: List[List[int]] = [[] for _ in range(num_streams)]
    for doc in ranked:
        load, stream = heapq.heappop(loads)
        streams[stream].append(int(doc))
        heapq.heappush(loads, (load + int(doc_segments[doc]), stream))
    return streams


class StreamLayout:
    """Which (document, segment) every global stream reads at every batch."""

    def __init__(self, streams: List[List[int]], doc_segments: np.ndarray):
        self.streams = streams
        # start[s][j]: batch at which stream s starts its j-th document
        self.starts = [np.concatenate([[0], np.cumsum(doc_segments[docs])]).astype(np.int64) for docs in streams]
        self.num_batches = max((int(start[-1]) for start in self.starts), default=0)

    def stream_length(self, stream: int) -> int:
        return int(self.starts[stream][-1])

    def locate(self, stream: int, batch: int):
        """(doc, segment) that ``stream`` reads at ``batch``, or None when exhausted."""
        start = self.starts[stream]
        if batch >= start[-1]:
            return None
        j = int(np.searchsorted(start, batch, side="right")) - 1
        return self.streams[stream][j], batch - int(start[j])


class DocumentStreamDataset(torch.utils.data.Dataset):
    """Item ``i`` is the whole batch ``i`` of this rank (a collated sample).

    Args:
        documents: the split's documents.
        tokens_per_sample: segment length T.
        batch_size: streams (rows) per rank.
        pad, eos: the dictionary's padding and end-of-sentence indices.
        shuffle: shuffle per epoch (train only).
        seed: shuffling seed.
        num_shards, shard_id: data-parallel world size and this rank.
        distant_repeats: copies of far-back spans written into segments
            (a training curriculum, :mod:`fairseq_memtrm.data.distant_repeats`).
    """

    def __init__(
        self,
        documents: DocumentDataset,
        tokens_per_sample: int,
        batch_size: int,
        pad: int,
        eos: int,
        shuffle: bool = False,
        seed: int = 1,
        num_shards: int = 1,
        shard_id: int = 0,
        distant_repeats: Optional[DistantRepeats] = None,
    ):
        super().__init__()
        assert tokens_per_sample > 0 and batch_size > 0 and 0 <= shard_id < num_shards
        self.documents = documents
        self.stream_id = documents.split
        self.tokens_per_sample = tokens_per_sample
        self.batch_size = batch_size
        self.pad, self.eos = pad, eos
        self.shuffle = shuffle
        self.seed = seed
        self.num_shards, self.shard_id = num_shards, shard_id
        self.distant_repeats = distant_repeats
        self.doc_segments = -(-documents.sizes // tokens_per_sample)  # ceil
        self.epoch = 1
        self._layouts: Dict[int, StreamLayout] = {}

    # ------------------------------------------------------------- layout
    def layout(self, epoch: Optional[int] = None) -> StreamLayout:
        epoch = self.epoch if epoch is None else epoch
        key = epoch if self.shuffle else 0  # unshuffled splits read alike every epoch
        if key not in self._layouts:
            num_docs = len(self.doc_segments)
            num_streams = self.batch_size * self.num_shards
            if self.shuffle:
                with data_utils.numpy_seed(self.seed, epoch):
                    order = np.random.permutation(num_docs)
                    streams = assign_streams(self.doc_segments, num_streams, order)
                    for docs in streams:
                        np.random.shuffle(docs)
            else:
                streams = assign_streams(self.doc_segments, num_streams, np.arange(num_docs))
            self._layouts = {key: StreamLayout(streams, self.doc_segments)}  # keep one epoch only
        return self._layouts[key]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batch_sampler(self, dataset, epoch: int) -> List[List[int]]:
        """For ``EpochBatchIterator``: one item per batch, in order."""
        return [[i] for i in range(self.layout(epoch).num_batches)]

    def __len__(self) -> int:
        return self.layout().num_batches

    def my_streams(self) -> range:
        return range(self.shard_id * self.batch_size, (self.shard_id + 1) * self.batch_size)

    # -------------------------------------------------------------- items
    def segment_tokens(self, doc: int, segment: int):
        """(source, target) of one segment, both (L,)."""
        start = segment * self.tokens_per_sample
        end = min(start + self.tokens_per_sample, int(self.documents.sizes[doc]))
        if start == 0:
            target = self.documents.tokens(doc, 0, end)
            source = torch.cat([target.new_tensor([self.eos]), target[:-1]])
        else:
            span = self.documents.tokens(doc, start - 1, end)
            source, target = span[:-1], span[1:]
        if self.distant_repeats is not None:
            source, target = self.distant_repeats.apply(
                self.documents, doc, segment, self.tokens_per_sample, self.epoch, source, target)
        return source, target

    def __getitem__(self, batch: int) -> dict:
        """The collated batch: ``net_input`` = {src_tokens (B, T'), src_lengths (B,),
        doc_start bool (B,), stream_id str}, ``target`` (B, T'), plus ``doc_id`` and
        ``segment`` (B,) (-1 on empty rows) for reports and tests. T' <= T."""
        layout = self.layout()
        sources, targets, doc_ids, segments = [], [], [], []
        for stream in self.my_streams():
            where = layout.locate(stream, batch)
            if where is None:
                # Exhausted stream: one real source token keeps attention finite.
                sources.append(torch.tensor([self.eos]))
                targets.append(torch.tensor([self.pad]))
                doc_ids.append(-1)
                segments.append(-1)
            else:
                source, target = self.segment_tokens(*where)
                sources.append(source)
                targets.append(target)
                doc_ids.append(where[0])
                segments.append(where[1])
        src_tokens = data_utils.collate_tokens(sources, self.pad)
        target = data_utils.collate_tokens(targets, self.pad)
        segments_t = torch.tensor(segments)
        return {
            "id": torch.tensor(list(self.my_streams())),
            "nsentences": len(sources),
            "ntokens": int(target.ne(self.pad).sum()),
            "net_input": {
                "src_tokens": src_tokens,
                "src_lengths": src_tokens.ne(self.pad).sum(dim=1),
                "doc_start": segments_t <= 0,
                "stream_id": self.stream_id,
            },
            "target": target,
            "doc_id": torch.tensor(doc_ids),
            "segment": segments_t,
        }

    @staticmethod
    def collater(items: List[dict]) -> dict:
        assert len(items) == 1, "document streams yield whole batches: one item per batch"
        return items[0]
