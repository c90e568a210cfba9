"""What a memory layer retrieved, per token.

A layer's retrieval for a segment is per head: ``positions`` (H, T, k) document
positions of each head's top-k entries (-1: none), their cosine ``scores``,
their softmax weights ``probs`` and the head's memory gate. ``merge_heads``
turns that into one ranked list per token: an entry's *weight* is the share of
the layer's output that came from it, ``sum_h gate_h * p_h(entry) / H``; its
*score* the best cosine any head gave it; ``heads`` a bitmask of the heads that
retrieved it.

The entry at document position ``p`` holds token ``p`` (its value was computed
while reading it), whether its key is its own or, with ``--memory-shift-keys``,
the previous token's. ``entries_hold_token`` asks whether that token is the one
the query predicts: for a model with shifted keys, whether the memory proposes
the right token.
"""

import torch


def entries_hold_token(tokens, positions, target):
    """Whether each entry holds ``target``: ``tokens`` (N,) a document's tokens by position,
    ``positions`` (..., k) entry positions (-1: no entry), ``target`` broadcastable to them.
    Works on numpy arrays and torch tensors alike; False where there is no entry."""
    held = tokens[positions.clip(0, len(tokens) - 1)]
    return (positions >= 0) & (held == target)


def merge_heads(positions, scores, probs, gate, top_k: int):
    """Merge one segment's per-head retrievals into per-token entries.

    Args: ``positions`` (H, T, k) int64 (-1 invalid), ``scores`` (H, T, k),
    ``probs`` (H, T, k) softmax over each head's top-k, ``gate`` (H, T).
    Returns (T, top_k) tensors ``positions``, ``scores``, ``weights``, ``heads``
    (bitmask), sorted by weight, descending; missing entries have position -1.
    """
    heads, seq_len, k = positions.shape
    flat_positions = positions.permute(1, 0, 2).reshape(seq_len, heads * k)
    flat_scores = scores.permute(1, 0, 2).reshape(seq_len, heads * k).float()
    flat_weights = (probs * gate.unsqueeze(-1) / heads).permute(1, 0, 2).reshape(seq_len, heads * k).float()
    head_bits = (1 << torch.arange(heads, dtype=torch.int64)).repeat_interleave(k).to(positions.device)
    valid = flat_positions >= 0
    # same[t, i, j]: candidates i and j of token t are the same document position
    same = (flat_positions.unsqueeze(2) == flat_positions.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    merged_weights = (same * flat_weights.unsqueeze(1)).sum(-1)
    merged_scores = flat_scores.unsqueeze(1).expand(-1, heads * k, -1).masked_fill(~same, float("-inf")).amax(-1)
    merged_heads = (same * head_bits.view(1, 1, -1)).sum(-1)  # each head lists a position once
    first = valid & ~torch.tril(same, diagonal=-1).any(-1)  # keep one candidate per position
    rank_key = merged_weights.masked_fill(~first, -1.0)
    top_k = min(top_k, heads * k)
    order = rank_key.topk(top_k, dim=-1).indices
    kept = rank_key.gather(1, order) >= 0
    return (
        flat_positions.gather(1, order).masked_fill(~kept, -1),
        merged_scores.gather(1, order).masked_fill(~kept, float("nan")),
        merged_weights.gather(1, order).masked_fill(~kept, 0.0),
        merged_heads.gather(1, order).masked_fill(~kept, 0),
    )

