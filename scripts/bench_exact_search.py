#!/usr/bin/env python
"""Time the two paths of the ``exact`` search backend side by side.

``ExactSearch`` either scores keys block by block, keeps group maxima and
re-ranks ``k x group_size`` candidates per query (two-pass), or writes whole
score rows and takes a plain top-k. This script times both on random unit
keys for the shapes that matter here (the attention memory's 8 heads x 32
dims at k 32, the neural cache's one 256-dim head at k 32 and 1024), and says
which one ``ExactSearch.search`` takes, so that the rule can be checked
against measurements on any machine::

    python scripts/bench_exact_search.py [--threads 2] [--repeats 3]

``--parts`` instead times the stages of one two-pass search (the memory layer's
4 heads x 64 dims, ``--keys`` keys, k 32), side by side: the score pass (the
block matmuls alone, then with the group maxima), the top-k over the group
maxima, the candidate gather and the exact re-rank; and the score pass with
bf16 queries and keys (converted beforehand), at two block sizes, where the
CPU has bf16 matmul kernels worth timing::

    python scripts/bench_exact_search.py --parts --threads 2 --repeats 5
"""

import argparse

import torch
import torch.nn.functional as F

from bench_memory import median_time  # this script's folder is on the path when it runs
from fairseq_memtrm.memory.search import ExactSearch

PARTS_SHAPE = (4, 64, 32)  # the memory layer's heads and dims, and k
# (heads, dims, keys, k)
CASES = [(8, 32, 8192, 32), (8, 32, 16384, 32), (8, 32, 65536, 32),
         (1, 256, 65536, 32), (1, 256, 65536, 1024)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed searches per path (median)")
    parser.add_argument("--queries", type=int, default=512, help="queries per search (one segment)")
    parser.add_argument("--parts", action="store_true", help="time the stages of one two-pass search instead")
    parser.add_argument("--keys", type=int, default=65536, help="keys searched by --parts")
    args = parser.parse_args()
    if args.keys < 1 or args.queries < 1 or args.repeats < 1:
        parser.error("--keys, --queries and --repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    if args.parts:
        time_parts(args, generator)
        return
    print(f"{torch.get_num_threads()} threads, {args.queries} queries, median of {args.repeats}")
    print("| heads x dims, keys, k | two-pass | plain | path taken |")
    print("|---|---:|---:|---|")
    for heads, dims, num_keys, k in CASES:
        queries = F.normalize(torch.randn(heads, args.queries, dims, generator=generator), dim=-1)
        keys = F.normalize(torch.randn(heads, num_keys, dims, generator=generator), dim=-1)
        search = ExactSearch(1, heads, dims, num_keys)
        grouped = median_time(lambda: search._grouped_topk(queries, keys, k), args.repeats, warmup=1)
        plain = median_time(lambda: search._full_topk(queries, keys, k), args.repeats, warmup=1)
        taken = "two-pass" if search.two_pass(num_keys, k) else "plain"
        print(f"| {heads} x {dims}, {num_keys // 1024}K, k {k} | {grouped:.3f} s | {plain:.3f} s | {taken} |",
              flush=True)


def time_parts(args, generator) -> None:
    """Each stage of ``ExactSearch._grouped_topk``, timed on its own, in ms."""
    heads, dims, k = PARTS_SHAPE
    queries = F.normalize(torch.randn(heads, args.queries, dims, generator=generator), dim=-1)
    keys = F.normalize(torch.randn(heads, args.keys, dims, generator=generator), dim=-1)
    search = ExactSearch(1, heads, dims, args.keys)
    stride, block = search._layout()
    scores = queries.new_empty(heads, args.queries, block)

    def matmuls() -> None:
        for start in range(0, args.keys, block):
            width = min(block, args.keys - start)
            torch.bmm(queries, keys[:, start : start + width].transpose(1, 2), out=scores[:, :, :width])

    group_max = search._group_maxima(queries, keys)
    best_groups = group_max.topk(k, dim=-1).indices
    slots, valid, candidates = search._candidates(keys, best_groups, queries.dtype)
    stages = {
        "block matmuls alone": matmuls,
        "pass 1: matmuls + group maxima": lambda: search._group_maxima(queries, keys),
        "top-k of the group maxima": lambda: group_max.topk(k, dim=-1),
        "candidate gather": lambda: search._candidates(keys, best_groups, queries.dtype),
        "re-rank": lambda: search._rerank(queries, slots, valid, candidates, k),
        "whole search": lambda: search._grouped_topk(queries, keys, k),
    }
    low_queries, low_keys = queries.bfloat16(), keys.bfloat16()
    for block_size in (block, 2 * block):
        low = ExactSearch(1, heads, dims, args.keys, block_size=block_size)
        stages[f"pass 1 in bf16, block {block_size}"] = lambda s=low: s._group_maxima(low_queries, low_keys)
    print(f"{heads} heads x {dims} dims, {args.keys} keys, k {k}, {args.queries} queries, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("| stage | ms |")
    print("|---|---:|")
    for name, stage in stages.items():
        print(f"| {name} | {1000 * median_time(stage, args.repeats, warmup=1):.1f} |", flush=True)


if __name__ == "__main__":
    main()
