"""fairseq_memtrm.diagnostics against by-hand numbers, with a model whose every
prediction is known: it puts logit 10 on (previous token + 1) and 0 elsewhere."""

import math

import pytest
import torch

from fairseq_memtrm.diagnostics import in_context_score, plant_passage, planted_documents, planted_passage_loss
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


class Documents:
    """A split of documents as fairseq's datasets give them: ``size(i)`` and ``[i]``."""

    def __init__(self, documents):
        self.documents = documents

    def __len__(self):
        return len(self.documents)

    def size(self, index):
        return len(self.documents[index])

    def __getitem__(self, index):
        return self.documents[index]


class Vocabulary:
    nspecial = 4

    def __len__(self):
        return V


def test_planted_documents_take_random_tokens_or_a_span_of_the_next_long_document():
    split = Documents([torch.arange(0, 40) % V, torch.arange(100, 105) % V, torch.arange(200, 260) % V])
    random = planted_documents(split, Vocabulary(), first_at=3, gap=20, length=6)
    assert random.shape == (2, 3 + 20 + 6)  # the 5-token document is too short to hold both copies
    generator = torch.Generator().manual_seed(1)
    draws = [torch.randint(4, V, (6,), generator=generator) for _ in range(3)]  # one per document, short or not
    assert torch.equal(random[0], plant_passage(split[0], draws[0], 3, 20))
    assert torch.equal(random[1], plant_passage(split[2], draws[2], 3, 20))
    assert torch.equal(planted_documents(split, Vocabulary(), 3, 20, 6), random)  # the same for every caller
    text = planted_documents(split, Vocabulary(), first_at=3, gap=20, length=6, passage="text")
    for row, (doc, source) in enumerate([(0, 2), (2, 0)]):  # document 1 is too short to lend 6 tokens either
        passage = text[row, 3:9]
        assert torch.equal(text[row], plant_passage(split[doc], passage, 3, 20))
        starts = [i for i in range(split.size(source) - 5) if torch.equal(split[source][i : i + 6], passage)]
        assert starts, "the passage is a span of the next document long enough"
    assert planted_documents(Documents([split[0]]), Vocabulary(), 3, 20, 6, passage="text") is None
    with pytest.raises(MemtrmUserError, match="must be one of random, text"):
        planted_documents(split, Vocabulary(), 3, 20, 6, passage="words")


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


def test_induction_scores_read_fairseqs_own_attention_weights(tmp_path):
    """The scores recompute each layer's attention from its q/k projections: they must
    equal the weights fairseq's MultiheadAttention returns, at the induction positions."""
    from lm_builders import TINY, build_model, write_dictionary

    from fairseq_memtrm.diagnostics import induction_scores

    write_dictionary(tmp_path)
    model, _ = build_model(tmp_path, "transformer_lm", TINY)
    span = 10
    passages = torch.randint(4, 60, (3, span), generator=torch.Generator().manual_seed(0))
    tokens = torch.cat([passages, passages], dim=1)
    inputs = []
    hooks = [layer.self_attn.register_forward_hook(
        lambda module, args, kwargs, output: inputs.append(kwargs.get("query", args[0] if args else None)),
        with_kwargs=True) for layer in model.decoder.layers]
    with torch.no_grad():
        model(tokens)
    for handle in hooks:
        handle.remove()
    got = induction_scores(model, passages)
    assert got.shape == (3, 4)
    length = 2 * span
    future = torch.triu(torch.full((length, length), float("-inf")), 1)
    rows = torch.arange(span + 1, 2 * span)
    for index, (layer, x) in enumerate(zip(model.decoder.layers, inputs)):
        att = layer.self_attn
        with torch.no_grad():  # torch's own attention, as fairseq's MultiheadAttention calls it, per head
            _, weights = torch.nn.functional.multi_head_attention_forward(
                x, x, x, att.embed_dim, att.num_heads, torch.empty([0]),
                torch.cat((att.q_proj.bias, att.k_proj.bias, att.v_proj.bias)), None, None, False, 0.0,
                att.out_proj.weight, att.out_proj.bias, training=False, need_weights=True, attn_mask=future,
                use_separate_proj_weight=True, q_proj_weight=att.q_proj.weight, k_proj_weight=att.k_proj.weight,
                v_proj_weight=att.v_proj.weight, average_attn_weights=False)  # (B, H, T, T)
        expected = weights[:, :, rows, rows - span + 1].mean(dim=(0, 2))
        assert torch.allclose(got[index], expected, atol=1e-5), index


@pytest.mark.parametrize("memory_size,in_memory", [(64, True), (16, False)])
def test_planted_passage_retrievals_find_the_first_copy_while_memory_holds_it(tmp_path, memory_size, in_memory):
    """With k = memory size every stored entry is retrieved: the first copy is found by every
    (layer, head, query) while the memory holds it, and by none once it is evicted."""
    from lm_builders import build_model, write_dictionary

    write_dictionary(tmp_path, num_symbols=60)
    model, _ = build_model(tmp_path, "memorizing_transformer_lm_tiny",
                           ["--memory-size", str(memory_size), "--knn-k", str(memory_size)])
    generator = torch.Generator().manual_seed(0)
    documents = torch.stack([plant_passage(torch.randint(4, V, (52,), generator=generator),
                                           torch.randint(4, V, (8,), generator=generator), 4, 40)
                             for _ in range(2)])
    result = planted_passage_loss(model, documents, first_at=4, gap=40, length=8, tokens_per_sample=16)
    assert result["second_copy_next_found"] == result["second_copy_same_found"] == (1.0 if in_memory else 0.0)
    if in_memory:
        assert 0.0 < result["second_copy_next_weight"] <= 1.0
    else:
        assert result["second_copy_next_weight"] == 0.0
    assert "second_copy_next_found" not in planted_passage_loss(
        Successor(), documents, first_at=4, gap=40, length=8, tokens_per_sample=16)


def test_planted_key_ranks_equal_a_by_hand_count_over_the_memorys_keys(tmp_path):
    """Each rank counts, by hand, the keys of the earlier segments whose cosine with the
    query beats the first copy's key for the token to predict; a head whose queries and
    keys are the token embeddings themselves (identity projections) ranks the copy first."""
    from lm_builders import TINY, build_model, write_dictionary

    from fairseq_memtrm.diagnostics import attention_projections, planted_key_ranks

    write_dictionary(tmp_path)
    model, _ = build_model(tmp_path, "transformer_lm", TINY)
    generator = torch.Generator().manual_seed(0)
    first_at, gap, length, segment = 5, 40, 6, 16
    documents = torch.stack([plant_passage(torch.randint(4, 60, (60,), generator=generator),
                                           torch.randint(4, 60, (length,), generator=generator), first_at, gap)
                             for _ in range(2)])
    end = first_at + gap + length - 1
    with attention_projections(model) as captured, torch.no_grad():
        for start in range(0, end, segment):
            model(documents[:, start : min(start + segment, end)])
    layers = len(model.decoder.layers)
    for memory_query, shift_keys in (("query", False), ("key", True), ("key", False)):
        got = planted_key_ranks(model, documents, first_at, gap, length, segment, memory_query, shift_keys)
        assert got.shape == (3, 4, 2, length - 1) and got.dtype == torch.int64
        for layer in range(layers):
            q = torch.cat([captured[i][0] for i in range(layer, len(captured), layers)], dim=2)
            k = torch.cat([captured[i][1] for i in range(layer, len(captured), layers)], dim=2)
            asks = k if memory_query == "key" else q
            for head in range(4):
                for row in range(2):
                    for i, t in enumerate(range(first_at + gap, end)):
                        held = t - t % segment
                        # the entry of position j, keyed by j's key, or by j - 1's when shifted
                        entry_key = [k[row, head, max(j - 1, 0) if shift_keys else j] for j in range(held)]
                        score = [torch.cosine_similarity(asks[row, head, t], key, dim=0) for key in entry_key]
                        target = score[t + 1 - gap]
                        assert got[layer, head, row, i] == sum(int(s > target) for s in score), \
                            (memory_query, shift_keys, layer, head, row, t)
    with pytest.raises(MemtrmUserError, match="gap larger"):
        planted_key_ranks(model, documents, first_at, 8, length, segment)
