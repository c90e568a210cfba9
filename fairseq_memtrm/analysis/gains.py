"""Which token types gain most from memory: per type, the summed and mean loss
difference (loss without memory - loss with memory, nats) over its occurrences.

Used by ``eval_memory_sweep.py`` (over a split) and the demo (over one document).
"""

from collections import defaultdict
from dataclasses import dataclass
from typing import List, Sequence


@dataclass
class TokenTypeGain:
    token: int  # token id
    count: int  # occurrences scored
    total: float  # summed gain, nats

    @property
    def mean(self) -> float:
        return self.total / self.count


def gains_by_token_type(types: Sequence[int], gain: Sequence[float], top: int = 25,
                        min_count: int = 5) -> List[TokenTypeGain]:
    """The ``top`` token types of at least ``min_count`` occurrences whose summed gain is largest.

    ``types`` (N,) token ids and ``gain`` (N,) their gains, the same tokens in the same
    order; ties keep the order of first occurrence."""
    if len(types) != len(gain):
        raise ValueError(f"{len(types)} token types but {len(gain)} gains")
    totals, counts = defaultdict(float), defaultdict(int)
    for token, g in zip(list(types), list(gain)):
        totals[token] += g
        counts[token] += 1
    ranked = sorted((t for t in totals if counts[t] >= min_count), key=lambda t: -totals[t])[:top]
    return [TokenTypeGain(int(t), counts[t], totals[t]) for t in ranked]
