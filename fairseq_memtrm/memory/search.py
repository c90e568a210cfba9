"""Top-k inner-product search backends for :class:`KNNMemory`.

A backend answers one question: given the keys that one stream holds for every
head, which ``k`` of them have the largest inner product with each query? The
memory owns the keys (a ring buffer); a backend only searches them, and may
keep an index of its own in step with the ring through ``on_add``/``on_reset``.
The attention layer never sees which backend it talks to.
"""

import inspect
from typing import Dict, Optional, Tuple, Type

import torch
from torch import Tensor


FULL_SCORES = 1 << 24  # scores (64 MB in fp32) one plain top-k pass of ExactSearch writes at most


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

    @classmethod
    def index_bytes_per_entry(cls, num_heads: int, head_dim: int) -> int:
        """RAM the backend's own index adds per memory entry (0: it searches the ring)."""
        return 0

    def on_reset(self, stream: int) -> None:
        """Stream ``stream`` starts a new document: forget everything it held."""

    def on_add(self, stream: int, slots: Tensor, keys: Tensor) -> None:
        """``keys`` (H, n, D) were written to ring ``slots`` (n,) of ``stream``."""

    def search(self, stream: int, queries: Tensor, keys: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """Top-``k`` search of ``queries`` (H, T, D) among ``keys`` (H, N, D), N >= k.

        Returns ``scores`` (H, T, k) in descending order and ``slots`` (H, T, k),
        the indices of the hits along N (int64). An approximate backend may find
        fewer than ``k`` for a query: those slots are -1 (scores -inf).
        """
        raise NotImplementedError


class ExactSearch(SearchBackend):
    """Exact search in two passes that never materialise the (T, N) score matrix.

    Writing a 512 x 65536 score matrix per head and running ``topk`` over it is
    memory-bound: 6-20x the matmul's compute bound on a CPU (docs/benchmark.md). Instead:

    1. keys are scored one block of ``block_size`` at a time into a reused
       scratch buffer (H, T, block_size) that stays in cache; each block is
       reduced at once to the maximum score of every *group* of ``group_size``
       keys, so only (H, T, N / group_size) floats are kept. A group is strided:
       in a block of ``block_size = group_size * G`` keys, group ``r`` holds
       keys ``r, r + G, r + 2G, ...``, so that its maximum is an elementwise
       maximum of ``group_size`` contiguous (H, T, G) slices (vectorised),
       not a reduction over short runs of 8 (several times slower);
    2. the k-th largest group maximum is a lower bound on the k-th best score
       (those k groups hold k keys at least that good), so every true top-k key
       lies in one of the k best groups. Those ``k * group_size`` candidates are
       gathered, scored again and ranked exactly.

    Results equal brute force (up to float rounding of equal scores). Scratch
    memory is ``H * T * (block_size + N / group_size + k * group_size * D)``
    floats. The candidates of step 2 cost ``k * group_size * D`` floats per query
    against the ``N`` scores a plain top-k writes, so a memory of fewer than
    ``k * group_size * D`` keys (small memories; wide keys; large ``k``, as the
    neural cache's 1024) takes the plain top-k over full score rows instead, a
    bounded number of queries at a time (docs/benchmark.md has both measured).
    Runs on the keys' device (CUDA included); fp16 keys are upcast one block
    at a time.
    """

    name = "exact"

    def __init__(self, *args, block_size: int = 256, group_size: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self.block_size = block_size
        self.group_size = group_size
        self._scratch: Optional[Tensor] = None

    def two_pass(self, num_keys: int, k: int) -> bool:
        """Whether ``num_keys`` keys are searched in two passes (else: plain top-k)."""
        return num_keys >= k * self.group_size * self.head_dim

    def search(self, stream, queries, keys, k):
        if self.two_pass(keys.size(1), k):
            return self._grouped_topk(queries, keys, k)
        return self._full_topk(queries, keys, k)

    def _full_topk(self, queries: Tensor, keys: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """Plain top-k over whole score rows, at most ``FULL_SCORES`` scores at a time."""
        heads, seq_len, _ = queries.shape
        keys_t = keys.to(queries.dtype).transpose(1, 2)
        rows = max(1, FULL_SCORES // (heads * keys.size(1)))
        found = [torch.bmm(queries[:, start : start + rows], keys_t).topk(k, dim=-1)
                 for start in range(0, seq_len, rows)]
        return torch.cat([f.values for f in found], dim=1), torch.cat([f.indices for f in found], dim=1)

    def _scratch_for(self, numel: int, like: Tensor) -> Tensor:
        """A reused flat buffer: fresh large allocations page-fault on every call."""
        scratch = self._scratch
        if scratch is None or scratch.numel() < numel or scratch.dtype != like.dtype or scratch.device != like.device:
            scratch = self._scratch = like.new_empty(numel)
        return scratch[:numel]

    def _grouped_topk(self, queries: Tensor, keys: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        group_max = self._group_maxima(queries, keys)
        best_groups = group_max.topk(k, dim=-1).indices  # (H, T, k)
        slots, valid, candidates = self._candidates(keys, best_groups, queries.dtype)
        return self._rerank(queries, slots, valid, candidates, k)

    def _layout(self) -> Tuple[int, int]:
        """(G, block): groups per block (the distance between a group's members), keys per block."""
        stride = max(1, self.block_size // self.group_size)
        return stride, self.group_size * stride

    def _group_maxima(self, queries: Tensor, keys: Tensor) -> Tensor:
        """Pass 1: the maximum score of every group, (H, T, groups), in ``queries``' dtype."""
        heads, seq_len, _ = queries.shape
        num_keys, group = keys.size(1), self.group_size
        stride, block = self._layout()
        num_blocks = -(-num_keys // block)
        group_max = queries.new_empty(heads, seq_len, num_blocks, stride)
        scores = self._scratch_for(heads * seq_len * block, queries).view(heads, seq_len, block)
        for index, start in enumerate(range(0, num_keys, block)):
            width = min(block, num_keys - start)
            if width < block:  # the last block: its missing keys never win a group
                scores[:, :, width:] = float("-inf")
            torch.bmm(queries, keys[:, start : start + width].to(queries.dtype).transpose(1, 2),
                      out=scores[:, :, :width] if width < block else scores)
            torch.amax(scores.view(heads, seq_len, group, stride), dim=2, out=group_max[:, :, index])
        return group_max.view(heads, seq_len, -1)

    def _candidates(self, keys: Tensor, best_groups: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
        """Pass 2a: the members of ``best_groups`` (H, T, c): their ring slots (H, T * c * group_size),
        which of them exist (the last block can overhang), and their keys (H, T, c * group_size, D)."""
        heads, seq_len, count = best_groups.shape
        num_keys, dim, group = keys.size(1), keys.size(2), self.group_size
        stride, block = self._layout()
        first_member = best_groups // stride * block + best_groups % stride
        members = torch.arange(0, block, stride, device=keys.device)
        slots = (first_member.unsqueeze(-1) + members).view(heads, seq_len * count * group)
        valid = slots < num_keys
        slots = slots.clamp_(max=num_keys - 1)
        candidates = keys.new_empty(heads, seq_len * count * group, dim)
        for head in range(heads):  # into one buffer: stacking copies 100+ MB again
            torch.index_select(keys[head], 0, slots[head], out=candidates[head])
        return slots, valid, candidates.view(heads, seq_len, count * group, dim).to(dtype)

    @staticmethod
    def _rerank(queries: Tensor, slots: Tensor, valid: Tensor, candidates: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """Pass 2b: score the candidates (H, T, C, D) exactly and keep the best ``k``."""
        heads, seq_len, count, _ = candidates.shape
        candidate_scores = torch.einsum("htcd,htd->htc", candidates, queries)  # (H, T, C)
        candidate_scores = candidate_scores.masked_fill_(~valid.view_as(candidate_scores), float("-inf"))
        top_scores, order = candidate_scores.topk(k, dim=-1)
        return top_scores, slots.view(heads, seq_len, count).gather(-1, order)


BACKENDS: Dict[str, Type[SearchBackend]] = {ExactSearch.name: ExactSearch}


def register_backend(cls: Type[SearchBackend]) -> Type[SearchBackend]:
    BACKENDS[cls.name] = cls
    return cls


def parse_backend_spec(spec: str) -> Tuple[Type[SearchBackend], Dict[str, float]]:
    """``"faiss-ivf:nprobe=32,nlist=1024"`` -> (the backend class, {"nprobe": 32, "nlist": 1024}).

    Options are the backend's own keyword arguments (numbers only), so a search
    setting such as IVF's ``nprobe`` can be chosen from ``--memory-backend``.
    """
    from fairseq_memtrm.errors import MemtrmUserError

    name, _, option_text = str(spec).partition(":")
    if name not in BACKENDS:
        raise MemtrmUserError(f"unknown --memory-backend {name!r}; choose one of {sorted(BACKENDS)}")
    cls = BACKENDS[name]
    accepted = [
        parameter for parameter in inspect.signature(cls.__init__).parameters
        if parameter not in ("self", "args", "kwargs")
    ]
    options: Dict[str, float] = {}
    for item in filter(None, option_text.split(",")):
        key, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if key not in accepted or number is None:
            raise MemtrmUserError(
                f"--memory-backend {spec!r}: {item!r} is not KEY=NUMBER for one of {name}'s options "
                f"{accepted or '(none)'}, e.g. {name}:{accepted[0] if accepted else 'OPTION'}=VALUE"
            )
        options[key] = int(number) if number.is_integer() else number
    return cls, options


def build_backend(spec: str, **kwargs) -> SearchBackend:
    """A backend from its ``--memory-backend`` spec: a name, optionally ``:key=value,...``."""
    cls, options = parse_backend_spec(spec)
    return cls(**kwargs, **options)
