"""fairseq_memtrm.diagnostics against by-hand numbers, with a model whose every
prediction is known: it puts logit 10 on (previous token + 1) and 0 elsewhere."""

import math

import pytest
import torch

from fairseq_memtrm.diagnostics import in_context_score, plant_passage, planted_passage_loss
from fairseq_memtrm.errors import MemtrmUserError

V = 50
RIGHT = math.log(1 + (V - 1) * math.exp(-10))  # loss where the next token is previous + 1
WRONG = RIGHT + 10


class Successor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens):
        self.calls.append(tokens.size(1))
        return (10 * torch.nn.functional.one_hot((tokens + 1) % V, V).float(),)


def test_plant_passage_writes_two_copies_gap_apart():
    document = torch.arange(100, 200)
    passage = torch.tensor([7, 8, 9])
    planted = plant_passage(document, passage, first_at=5, gap=20)
    assert planted.tolist() == list(range(100, 105)) + [7, 8, 9] + list(range(105, 122)) + [7, 8, 9]
    with pytest.raises(MemtrmUserError, match="cannot hold"):
        plant_passage(document[:10], passage, 5, 20)


def test_planted_passage_loss_scores_each_copy_but_its_first_token():
    passage = torch.arange(10, 18)  # successive: the model predicts every token of a copy but the first
    documents = torch.stack([plant_passage(torch.arange(20 + 3 * row, 49 + 3 * row) % V, passage, 4, 13)
                             for row in range(2)])  # 4 + 13 + 8 = 25 tokens, read in segments of 7
    model = Successor()
    result = planted_passage_loss(model, documents, first_at=4, gap=13, length=8, tokens_per_sample=7)
    assert model.calls == [7, 7, 7, 3]
    assert result["first_copy_loss"] == pytest.approx(RIGHT, abs=1e-5)
    assert result["second_copy_loss"] == pytest.approx(RIGHT, abs=1e-5)
    documents[:, 4 + 13 + 5] = 0  # one wrong token inside the second copy: two wrong predictions of 7
    result = planted_passage_loss(Successor(), documents, first_at=4, gap=13, length=8, tokens_per_sample=7)
    assert result["second_copy_loss"] == pytest.approx(RIGHT + 2 * 10 / 7, abs=1e-4)


def test_in_context_score_is_late_minus_early_loss():
    segments = torch.arange(0, 12).repeat(3, 1) % V
    segments[:, 9] = 30  # token 9 is not its predecessor + 1
    result = in_context_score(Successor(), segments, early=3, late=9)
    assert result["loss_at_early"] == pytest.approx(RIGHT, abs=1e-5)
    assert result["in_context_score"] == pytest.approx(10, abs=1e-4)
    with pytest.raises(MemtrmUserError):
        in_context_score(Successor(), segments, early=3, late=12)
