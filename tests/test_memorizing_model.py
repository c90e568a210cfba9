"""memorizing_transformer_lm: vanilla checkpoints load, empty memory changes nothing,
memory is per stream and per document, and incompatibilities get clear errors."""

import re

import pytest
import torch

from fairseq_memtrm.errors import MemtrmUserError
from fairseq_memtrm.models.memorizing_transformer_lm import parse_memory_layers
from lm_builders import TINY, WIKI103_TINY, build_model, random_tokens, write_dictionary

LAYOUTS = {
    "base": ("transformer_lm", "memorizing_transformer_lm", TINY),
    "wiki103": ("transformer_lm_wiki103", "memorizing_transformer_lm_wiki103", WIKI103_TINY),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dict")
    write_dictionary(path)
    return path


@pytest.mark.parametrize("arch", ["memorizing_transformer_lm_tiny", "longmem_sidenet_lm_tiny"])
def test_a_gate_gain_that_is_not_positive_is_one_sentence(data_dir, arch):
    with pytest.raises(MemtrmUserError, match=re.escape("--memory-param-gain must be positive, got -5.0")):
        build_model(data_dir, arch, ["--memory-param-gain", "-5"])


def test_default_memory_layer_is_three_quarters_deep():
    assert parse_memory_layers("", 12) == [8]
    assert parse_memory_layers("", 6) == [3]
    assert parse_memory_layers("0,2", 3) == [0, 2]
    with pytest.raises(MemtrmUserError, match="0-based"):
        parse_memory_layers("3", 3)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_vanilla_checkpoint_loads_and_empty_memory_gives_its_logits(data_dir, layout):
    vanilla_arch, memorizing_arch, shape = LAYOUTS[layout]
    vanilla, task = build_model(data_dir, vanilla_arch, shape, seed=1)
    model, _ = build_model(data_dir, memorizing_arch, shape + ["--memory-layers", "1", "--memory-size", "256",
                                                              "--memory-gate-init", "1.5"], seed=2)
    fresh_gate = model.decoder.layers[1].self_attn.memory_gate.detach().clone()
    vanilla_state = vanilla.state_dict()
    assert not any("memory_" in key for key in vanilla_state)
    model.load_state_dict(vanilla_state, strict=True)
    # every vanilla weight was loaded; the memory parameters start fresh
    own = model.state_dict()
    for key, tensor in vanilla_state.items():
        torch.testing.assert_close(own[key], tensor)
    torch.testing.assert_close(model.decoder.layers[1].self_attn.memory_gate, fresh_gate)
    gate_logits = model.decoder.layers[1].self_attn.gate_logits()
    assert torch.allclose(gate_logits, torch.full_like(gate_logits, 1.5))

    tokens = random_tokens(task, 2, 16)
    doc_start = torch.tensor([True, True])
    with torch.no_grad():
        expected = vanilla(tokens)[0]
        got = model(tokens, doc_start=doc_start, stream_id="test")[0]  # memory empty
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # the same segment again, now with memory: the memory is used
        again = model(tokens, doc_start=torch.tensor([False, False]), stream_id="test")[0]
    assert not torch.allclose(again, expected, atol=1e-3)


def test_plugin_checkpoint_round_trip(data_dir):
    model, _ = build_model(data_dir, "memorizing_transformer_lm", TINY + ["--memory-layers", "2"], seed=3)
    with torch.no_grad():
        model.decoder.layers[2].self_attn.memory_gate.fill_(0.7)
    other, _ = build_model(data_dir, "memorizing_transformer_lm", TINY + ["--memory-layers", "2"], seed=4)
    other.load_state_dict(model.state_dict(), strict=True)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], tensor)


def test_incompatible_checkpoints_get_clear_errors(data_dir, tmp_path):
    model, _ = build_model(data_dir, "memorizing_transformer_lm", TINY)
    wider, _ = build_model(data_dir, "transformer_lm", [*TINY[:4], "--decoder-embed-dim", "64", *TINY[6:]])
    with pytest.raises(MemtrmUserError, match="decoder.*has shape"):
        model.load_state_dict(wider.state_dict())
    deeper, _ = build_model(data_dir, "transformer_lm", ["--decoder-layers", "4", *TINY[2:]])
    with pytest.raises(MemtrmUserError, match="decoder layers|more layers"):
        model.load_state_dict(deeper.state_dict())
    shallower, _ = build_model(data_dir, "transformer_lm", ["--decoder-layers", "2", *TINY[2:]])
    with pytest.raises(MemtrmUserError, match="2 decoder layers"):
        model.load_state_dict(shallower.state_dict())
    other_dict = tmp_path / "other"
    write_dictionary(other_dict, num_symbols=90)
    other_vocab, _ = build_model(other_dict, "transformer_lm", TINY)
    with pytest.raises(MemtrmUserError, match="dictionary mismatch"):
        model.load_state_dict(other_vocab.state_dict())


def run_segments(model, segments, doc_starts, stream_id="test"):
    """Feed (B, T) segments in order; returns each segment's retrieval record."""
    records = []
    with torch.no_grad():
        for tokens, doc_start in zip(segments, doc_starts):
            _, extra = model(tokens, doc_start=torch.tensor(doc_start), stream_id=stream_id, record_retrievals=True)
            records.append(extra["retrievals"].get(model.memory_layer_ids[0]))
    return records


def test_retrieval_stays_in_its_stream_and_before_its_segment(data_dir):
    model, task = build_model(data_dir, "memorizing_transformer_lm", TINY + ["--memory-layers", "1", "--knn-k", "8"])
    seg_len = 16
    segments = [random_tokens(task, 2, seg_len, seed=s) for s in range(4)]
    # stream 0 reads one document of 4 segments; stream 1 starts a new document at segment 2
    records = run_segments(model, segments, [[True, True], [False, False], [False, True], [False, False]])
    assert records[0] is None
    for index, record in enumerate(records[1:], start=1):
        found = record.retrieval
        stream0 = found.positions[0][found.mask[0]]
        assert stream0.max() < index * seg_len  # earlier segments only, never the current one
        assert found.mask[0].any()
    assert not records[2].retrieval.mask[1].any()  # fresh document: nothing from its old one
    stream1 = records[3].retrieval.positions[1][records[3].retrieval.mask[1]]
    assert stream1.max() < seg_len  # only its new document's first segment


def test_validation_memory_does_not_touch_training_memory(data_dir):
    model, task = build_model(data_dir, "memorizing_transformer_lm", TINY + ["--memory-layers", "1"])
    tokens = random_tokens(task, 2, 8)
    with torch.no_grad():
        model(tokens, doc_start=torch.tensor([True, True]), stream_id="train")
        train_memory = model.memory_bank.memories("train")[0]
        snapshot = train_memory.keys.clone(), train_memory.written.clone()
        model(random_tokens(task, 3, 8, seed=5), doc_start=torch.tensor([True] * 3), stream_id="valid")
        model(random_tokens(task, 3, 8, seed=6), doc_start=torch.tensor([False] * 3), stream_id="valid")
    assert torch.equal(train_memory.keys, snapshot[0]) and torch.equal(train_memory.written, snapshot[1])
    assert model.memory_bank.memories("valid")[0].num_valid(0) == 16


@pytest.mark.parametrize("shift", [0, 1])
def test_planted_repeat_is_retrieved_far_beyond_the_local_window(data_dir, shift):
    """A rare sequence read 3 segments earlier (at the same offset) is the top-1
    retrieval when it recurs. An untrained model's queries do not look for its own
    keys, so the memory is queried with the token's key (--memory-query key), as a
    trained model learns to do for repeats; layer 0's keys carry token identity.
    With --memory-shift-keys the match is keyed by the previous token: the query of
    token i finds the entry of the token that followed i's earlier occurrence."""
    flags = ["--memory-layers", "0", "--knn-k", "4", "--memory-query", "key"]
    model, task = build_model(data_dir, "memorizing_transformer_lm", TINY + flags + (["--memory-shift-keys"] * shift))
    assert model.memory_bank.shift_keys == bool(shift)
    seg_len = 32
    g = torch.Generator().manual_seed(11)
    common = torch.arange(4, 24)  # frequent words fill the document
    segments = [common[torch.randint(len(common), (1, seg_len), generator=g)] for _ in range(4)]
    rare = torch.arange(50, 58)  # 8 rare words, in the first segment and again in the last
    segments[0][0, 10:18] = rare
    segments[3][0, 10:18] = rare
    records = run_segments(model, segments, [[True], [False], [False], [False]])
    found = records[3].retrieval
    top1 = found.positions[0, :, 10:18, 0]  # each head, each token of the repeat
    assert (top1 == torch.arange(10, 18) + shift).float().mean() >= 0.9
    torch.testing.assert_close(found.scores[0, :, 10:18, 0], torch.ones(4, 8))  # the very same key
    margin = found.scores[0, :, 10:18, 0] - found.scores[0, :, 10:18, 1]
    assert margin.min() > 0.01 and margin.mean() > 0.05


def top_retrieved_tokens(model, document, seg_len):
    """{document position: (H,) token id of each head's best memory entry}, for every
    token of a (1, N) document read in segments of ``seg_len`` (layer 0's memory)."""
    starts = range(0, document.size(1), seg_len)
    segments = [document[:, start : start + seg_len] for start in starts]
    records = run_segments(model, segments, [[start == 0] for start in starts])
    tops = {}
    for start, record in zip(starts, records):
        if record is None:
            continue
        best = record.retrieval.scores[0].argmax(dim=-1, keepdim=True)  # (H, T, 1)
        positions = record.retrieval.positions[0].gather(-1, best).squeeze(-1)  # (H, T)
        for t in range(positions.size(1)):
            tops[start + t] = document[0, positions[:, t]]
    return tops


@pytest.mark.parametrize("memory_query", ["query", "key"])
def test_layer0_retrieval_does_not_depend_on_the_place_in_the_segment(data_dir, memory_query):
    """Prepending 5 tokens moves every token to another place in its segment. Layer 0's
    memory keys and queries come from the token embeddings alone, so each token's best
    retrieval is the same token as before; with the positional embedding left in
    (--memory-keys-with-positions) the place decides many of them."""
    g = torch.Generator().manual_seed(3)
    vocab = torch.arange(4, 12)  # 8 words: every one is in memory after the first segment
    document = vocab[torch.randint(len(vocab), (1, 96), generator=g)]
    document[0, :8] = vocab
    shifted = torch.cat([vocab[torch.randint(len(vocab), (1, 5), generator=g)], document], dim=1)
    changed = {}
    for with_positions in (False, True):
        flags = ["--memory-layers", "0", "--knn-k", "4", "--memory-query", memory_query]
        model, _ = build_model(data_dir, "memorizing_transformer_lm",
                               TINY + flags + (["--memory-keys-with-positions"] if with_positions else []))
        assert bool(model.decoder.layers[0].self_attn.memory_position_free) == (not with_positions)
        before = top_retrieved_tokens(model, document, 16)
        after = top_retrieved_tokens(model, shifted, 16)
        common = [p for p in before if p + 5 in after]
        assert len(common) >= 70
        changed[with_positions] = sum(not torch.equal(before[p], after[p + 5]) for p in common) / len(common)
        if memory_query == "key" and not with_positions:  # a token's own key is the best match: itself
            assert all(torch.equal(before[p], document[0, p].repeat(4)) for p in common)
    assert changed[False] == 0.0
    assert changed[True] > 0.2


def test_position_free_keys_follow_the_checkpoint(data_dir):
    """A vanilla checkpoint gets the configured keys; a memory checkpoint saved before
    the option existed keeps the positional keys it was trained with."""
    vanilla, _ = build_model(data_dir, "transformer_lm", TINY)
    model, _ = build_model(data_dir, "memorizing_transformer_lm", TINY + ["--memory-layers", "0,2"])
    attentions = model.memory_attentions()
    assert [bool(a.memory_position_free) for a in attentions] == [True, False]  # exact at layer 0 only
    model.load_state_dict(vanilla.state_dict())
    assert [bool(a.memory_position_free) for a in attentions] == [True, False]
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("memory_position_free")}
    model.load_state_dict(old)
    assert [bool(a.memory_position_free) for a in attentions] == [False, False]
