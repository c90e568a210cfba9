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
"""

import argparse

import torch
import torch.nn.functional as F

from bench_memory import median_time  # this script's folder is on the path when it runs
from fairseq_memtrm.memory.search import ExactSearch

# (heads, dims, keys, k)
CASES = [(8, 32, 8192, 32), (8, 32, 16384, 32), (8, 32, 65536, 32),
         (1, 256, 65536, 32), (1, 256, 65536, 1024)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed searches per path (median)")
    parser.add_argument("--queries", type=int, default=512, help="queries per search (one segment)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
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


if __name__ == "__main__":
    main()
