"""fairseq_memtrm/analysis: merging per-head retrievals, whether an entry holds
the token to predict, and the token types that gain most (by hand)."""

import numpy as np
import pytest
import torch

from fairseq_memtrm.analysis import entries_hold_token, gains_by_token_type, merge_heads


def test_merge_heads_sums_weights_of_a_shared_entry():
    # 2 heads, 1 token, k=2: both heads retrieve position 7; head 1 also 3
    positions = torch.tensor([[[7, -1]], [[3, 7]]])
    scores = torch.tensor([[[0.9, float("-inf")]], [[0.8, 0.5]]])
    probs = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])
    gate = torch.tensor([[0.5], [1.0]])
    merged_positions, merged_scores, merged_weights, merged_heads = merge_heads(positions, scores, probs, gate, 4)
    assert merged_positions[0].tolist() == [7, 3, -1, -1]
    np.testing.assert_allclose(merged_weights[0].numpy(), [0.5, 0.25, 0, 0])  # (.5*1 + 1*.5)/2 ; 1*.5/2
    np.testing.assert_allclose(merged_scores[0, :2].numpy(), [0.9, 0.8])
    assert merged_heads[0].tolist() == [0b11, 0b10, 0, 0]


def test_an_entry_holds_the_token_at_its_position_in_numpy_and_torch():
    tokens = [5, 6, 7, 5, 9]
    positions = [[0, 3, -1], [1, 2, 4]]  # two queries, k = 3; -1: no entry
    target = [[5], [9]]
    expected = [[True, True, False], [False, False, True]]
    assert entries_hold_token(np.array(tokens), np.array(positions), np.array(target)).tolist() == expected
    assert entries_hold_token(torch.tensor(tokens), torch.tensor(positions), torch.tensor(target)).tolist() == expected
    # an invalid entry never holds the token, even where position 0 (what -1 would index) does
    assert not entries_hold_token(np.array(tokens), np.array([-1]), np.array(5)).any()


def test_gains_by_token_type_sums_ranks_and_drops_rare_types():
    types = [1, 2, 1, 3, 2, 1, 3]
    gain = [0.5, 2.0, 0.5, -1.0, 1.0, 0.5, 0.0]
    ranked = gains_by_token_type(types, gain, top=5, min_count=2)
    assert [(g.token, g.count, g.total) for g in ranked] == [(2, 2, 3.0), (1, 3, 1.5), (3, 2, -1.0)]
    assert ranked[1].mean == pytest.approx(0.5)
    assert [g.token for g in gains_by_token_type(types, gain, top=1, min_count=3)] == [1]
    with pytest.raises(ValueError, match="3 token types but 2 gains"):
        gains_by_token_type([1, 2, 3], [0.0, 1.0])
