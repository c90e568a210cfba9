"""scripts/bench_exact_search.py --parts, and the stages of the two-pass search it times."""

import re
import sys

import torch
import torch.nn.functional as F
from lm_builders import REPO, run_command

from fairseq_memtrm.memory.search import ExactSearch

STAGES = ["block matmuls alone", "pass 1: matmuls + group maxima", "top-k of the group maxima",
          "candidate gather", "re-rank", "whole search", "pass 1 in bf16, block 256", "pass 1 in bf16, block 512"]


def test_parts_prints_one_timed_row_per_stage():
    out = run_command(sys.executable, REPO / "scripts" / "bench_exact_search.py", "--parts", "--keys", "2048",
                      "--queries", "64", "--repeats", "1", "--threads", "1", timeout=300).stdout
    rows = dict(re.findall(r"^\| (.+?) \| ([0-9.]+) \|$", out, flags=re.M))
    assert list(rows) == STAGES
    assert all(float(ms) > 0 for ms in rows.values())


def test_stages_compose_to_brute_force_and_bf16_group_maxima_stay_within_their_rounding_bound():
    generator = torch.Generator().manual_seed(3)
    heads, dims, num_keys, k = 2, 64, 3000, 8  # 3000: the last block overhangs
    queries = F.normalize(torch.randn(heads, 40, dims, generator=generator), dim=-1)
    keys = F.normalize(torch.randn(heads, num_keys, dims, generator=generator), dim=-1)
    search = ExactSearch(1, heads, dims, num_keys)
    group_max = search._group_maxima(queries, keys)
    stride, block = search._layout()
    assert group_max.shape == (heads, 40, -(-num_keys // block) * stride)
    scores = torch.bmm(queries, keys.transpose(1, 2))
    padded = F.pad(scores, (0, group_max.size(-1) * search.group_size - num_keys), value=float("-inf"))
    by_hand = padded.view(heads, 40, -1, search.group_size, stride).amax(3).flatten(2)
    assert torch.equal(group_max, by_hand)
    slots, valid, candidates = search._candidates(keys, group_max.topk(k, dim=-1).indices, queries.dtype)
    top, found = search._rerank(queries, slots, valid, candidates, k)
    assert torch.allclose(top, scores.topk(k, dim=-1).values)
    assert torch.allclose(scores.gather(-1, found), top)  # the slots hold those scores
    # unit vectors: bf16 inputs (2 x 2^-8 relative) and a bf16 output (2^-8) stay within 2^-6
    low = search._group_maxima(queries.bfloat16(), keys.bfloat16()).float()
    assert (low - group_max).abs().max() <= 2 ** -6


def test_parts_refuses_zero_keys_in_one_sentence():
    done = run_command(sys.executable, REPO / "scripts" / "bench_exact_search.py", "--parts", "--keys", "0",
                       check=False, timeout=120)
    assert done.returncode == 2
    assert "--keys, --queries and --repeats must be at least 1" in done.stderr and "Traceback" not in done.stderr
