"""The memory's invariants, checked against a brute-force numpy reference."""

import numpy as np
import pytest
import torch

from fairseq_memtrm.memory import ChunkedKNNMemory, KNNMemory, MemoryBank, MemoryStore, memory_bytes
from fairseq_memtrm.errors import MemtrmUserError

B, H, D = 3, 2, 8


def random_segment(generator, seq_len=16, bsz=B):
    keys = torch.randn(bsz, H, seq_len, D, generator=generator)
    values = torch.randn(bsz, H, seq_len, D, generator=generator)
    return keys, values


def brute_force_topk(queries, keys, k):
    """numpy reference: (T, D) x (N, D) -> top-k scores and indices."""
    scores = queries @ keys.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("block_size", [5, 4096])
def test_search_equals_brute_force(block_size):
    g = torch.Generator().manual_seed(0)
    memory = KNNMemory(B, H, D, memory_size=100)
    memory.backend.block_size = block_size  # several blocks and the one-block path
    history = []
    for _ in range(3):
        keys, values = random_segment(g, seq_len=20)
        memory.add(keys, values)
        history.append((keys, values))
    all_keys = torch.cat([k for k, _ in history], dim=2)
    all_values = torch.cat([v for _, v in history], dim=2)
    queries = torch.randn(B, H, 7, D, generator=g)
    found = memory.search(queries, k=6)
    for b in range(B):
        for h in range(H):
            ref_scores, ref_index = brute_force_topk(queries[b, h].numpy(), all_keys[b, h].numpy(), 6)
            np.testing.assert_allclose(found.scores[b, h].numpy(), ref_scores, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(found.positions[b, h].numpy(), ref_index)
            np.testing.assert_allclose(found.keys[b, h].numpy(), all_keys[b, h].numpy()[ref_index], rtol=1e-6)
            np.testing.assert_allclose(found.values[b, h].numpy(), all_values[b, h].numpy()[ref_index], rtol=1e-6)
    assert found.mask.all()


def test_ring_buffer_keeps_exactly_the_newest_entries_in_order():
    g = torch.Generator().manual_seed(1)
    memory = KNNMemory(1, H, D, memory_size=50)
    segments = [random_segment(g, seq_len=n, bsz=1) for n in (20, 20, 20, 7, 30)]
    for keys, values in segments:
        memory.add(keys, values)
    all_keys = torch.cat([k for k, _ in segments], dim=2)[0]  # (H, 97, D)
    total = all_keys.size(1)
    assert memory.num_valid(0) == 50
    # slot of document position p is p % memory_size; the held positions are the newest 50
    entries = memory.entries(0)
    positions = entries.positions
    assert sorted(positions.tolist()) == list(range(total - 50, total))
    for slot, pos in enumerate(positions.tolist()):
        assert slot == pos % 50
        torch.testing.assert_close(entries.keys[:, slot], all_keys[:, pos])
    # a query equal to an evicted key cannot find it; one equal to a held key finds itself first
    evicted, held = all_keys[:, total - 51], all_keys[:, total - 1]
    found = memory.search(torch.stack([evicted, held], dim=1)[None] * 100, k=50)
    assert (found.positions[0, :, 0] != total - 51).all()
    assert set(found.positions[0, 0, 0].tolist()) <= set(range(total - 50, total))


def test_segment_longer_than_memory_keeps_its_tail():
    g = torch.Generator().manual_seed(2)
    memory = KNNMemory(1, H, D, memory_size=8)
    keys, values = random_segment(g, seq_len=20, bsz=1)
    memory.add(keys, values)
    assert sorted(memory.positions[0, :8].tolist()) == list(range(12, 20))
    for pos in range(12, 20):
        torch.testing.assert_close(memory.keys[0, :, pos % 8], keys[0, :, pos])
    assert int(memory.written[0]) == 20


def test_reset_clears_only_named_streams():
    g = torch.Generator().manual_seed(3)
    memory = KNNMemory(B, H, D, memory_size=64)
    keys, values = random_segment(g)
    memory.add(keys, values)
    memory.reset(torch.tensor([False, True, False]))
    found = memory.search(torch.randn(B, H, 4, D, generator=g), k=4)
    assert found.mask[0].all() and found.mask[2].all()
    assert not found.mask[1].any()
    assert (found.positions[1] == -1).all()
    # the reset stream starts again at document position 0
    memory.add(*random_segment(g, seq_len=3))
    assert memory.positions[1, :3].tolist() == [0, 1, 2]
    assert int(memory.written[0]) == 19


def test_streams_never_see_each_other():
    memory = KNNMemory(2, 1, 2, memory_size=16)
    keys = torch.zeros(2, 1, 4, 2)
    keys[0, 0, :, 0] = 1.0  # stream 0 holds +x keys
    keys[1, 0, :, 0] = -1.0  # stream 1 holds -x keys
    memory.add(keys, keys.clone())
    found = memory.search(torch.tensor([1.0, 0.0]).expand(2, 1, 1, 2), k=4)
    assert (found.scores[0] == 1.0).all()
    assert (found.scores[1] == -1.0).all()  # stream 1 only has its own, worse keys


def test_padding_is_never_written():
    g = torch.Generator().manual_seed(4)
    memory = KNNMemory(2, H, D, memory_size=32)
    keys, values = random_segment(g, seq_len=6, bsz=2)
    token_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    memory.add(keys, values, token_mask)
    assert memory.num_valid(0) == 4 and memory.num_valid(1) == 0
    found = memory.search(torch.randn(2, H, 2, D, generator=g), k=8)
    assert found.mask[0].sum(-1).eq(4).all() and not found.mask[1].any()


def test_fewer_entries_than_k_are_masked():
    g = torch.Generator().manual_seed(5)
    memory = KNNMemory(1, H, D, memory_size=32)
    memory.add(*random_segment(g, seq_len=3, bsz=1))
    found = memory.search(torch.randn(1, H, 5, D, generator=g), k=8)
    assert found.mask[..., :3].all() and not found.mask[..., 3:].any()
    assert torch.isinf(found.scores[..., 3:]).all()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_streams_of_different_fullness_share_one_search(dtype):
    """An empty, a short and a full stream searched together: each finds its own entries (by-hand
    reference), in the queries' dtype; what a stream lacks is masked, -1, and reads as zeros."""
    g = torch.Generator().manual_seed(8)
    memory = KNNMemory(3, H, D, memory_size=10, dtype=dtype)
    keys, values = random_segment(g, seq_len=12, bsz=3)
    counts = [0, 3, 12]  # stream 2 wraps its ring of 10
    mask = torch.arange(12).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
    memory.add(keys, values, token_mask=mask)
    queries = torch.randn(3, H, 4, D, generator=g)
    found = memory.search(queries, k=5)
    assert found.keys.dtype == found.values.dtype == torch.float32
    assert not found.mask[0].any() and (found.positions[0] == -1).all()
    assert not found.keys[0].any() and not found.values[0].any()
    stored = {1: range(0, 3), 2: range(2, 12)}  # positions each stream still holds
    tolerance = 1e-6 if dtype == "fp32" else 2e-3
    for stream, positions in stored.items():
        n = min(5, len(positions))
        assert found.mask[stream, ..., :n].all() and not found.mask[stream, ..., n:].any()
        assert (found.positions[stream, ..., n:] == -1).all()
        assert not found.keys[stream, ..., n:, :].any() and not found.values[stream, ..., n:, :].any()
        for h in range(H):
            held = torch.tensor(list(positions))
            scores, order = brute_force_topk(queries[stream, h].numpy(), keys[stream, h, held].numpy(), n)
            np.testing.assert_array_equal(found.positions[stream, h, :, :n].numpy(), held.numpy()[order])
            np.testing.assert_allclose(found.keys[stream, h, :, :n].numpy(), keys[stream, h].numpy()[held.numpy()[order]],
                                       atol=tolerance, rtol=tolerance)
            np.testing.assert_allclose(found.values[stream, h, :, :n].numpy(),
                                       values[stream, h].numpy()[held.numpy()[order]], atol=tolerance, rtol=tolerance)


def test_no_gradient_reaches_stored_entries():
    keys = torch.randn(1, H, 4, D, requires_grad=True)
    values = torch.randn(1, H, 4, D, requires_grad=True)
    memory = KNNMemory(1, H, D, memory_size=8)
    memory.add(keys * 2, values * 2)
    assert not memory.keys.requires_grad and not memory.values.requires_grad
    found = memory.search(torch.randn(1, H, 2, D), k=2)
    assert not found.keys.requires_grad and not found.values.requires_grad
    assert keys.grad is None


def test_fp16_storage_halves_bytes_and_keeps_search_close():
    g = torch.Generator().manual_seed(6)
    assert memory_bytes(1024, 8, 32, "fp16") - 1024 * 8 == (memory_bytes(1024, 8, 32, "fp32") - 1024 * 8) // 2
    full, half = KNNMemory(1, H, D, 64, "fp32"), KNNMemory(1, H, D, 64, "fp16")
    keys, values = random_segment(g, seq_len=40, bsz=1)
    full.add(keys, values)
    half.add(keys, values)
    assert half.keys.dtype == torch.float16
    queries = torch.randn(1, H, 5, D, generator=g)
    torch.testing.assert_close(half.search(queries, 4).scores, full.search(queries, 4).scores, atol=2e-2, rtol=1e-2)


def test_bank_separates_stream_sets_and_resets_at_doc_start():
    bank = MemoryBank({0: (H, D)}, memory_size=32, dtype="fp32", backend="exact")
    g = torch.Generator().manual_seed(7)
    train = bank.select("train", 2, torch.tensor([True, True]), torch.device("cpu"))[0]
    train.add(*random_segment(g, seq_len=5, bsz=2))
    valid = bank.select("valid", 2, torch.tensor([True, True]), torch.device("cpu"))[0]
    assert valid is not train and valid.is_empty()
    valid.add(*random_segment(g, seq_len=5, bsz=2))
    # continuing the train streams finds them as they were
    again = bank.select("train", 2, torch.tensor([False, True]), torch.device("cpu"))[0]
    assert again is train
    assert train.num_valid(0) == 5 and train.num_valid(1) == 0
    # no document structure: every stream is reset
    assert bank.select("train", 2, None, torch.device("cpu"))[0].is_empty()


def test_bank_refuses_a_memory_larger_than_ram():
    bank = MemoryBank({0: (64, 128)}, memory_size=1 << 30, dtype="fp32", backend="exact")
    with pytest.raises(MemtrmUserError, match="--memory-size"):
        bank.select("train", 4, None, torch.device("cpu"))


@pytest.mark.parametrize("backend", ["exact", "faiss-flat"])
def test_shifted_keys_pair_each_value_with_the_previous_tokens_key(backend):
    """Reference: one document written whole. Entry p holds key p-1 and value p
    (entry 0 keys itself), however the document is cut into segments, padded
    or evicted; a reset starts the next document without its predecessor's key."""
    g = torch.Generator().manual_seed(11)
    memory = KNNMemory(2, H, D, memory_size=24, backend=backend, shift_keys=True)
    document_keys, document_values = [], []
    for seq_len, real in ((7, 7), (9, 4), (1, 1), (16, 16)):  # stream 0 gets `real` tokens, then padding
        keys, values = random_segment(g, seq_len=seq_len, bsz=2)
        mask = torch.ones(2, seq_len, dtype=torch.bool)
        mask[0, real:] = False
        memory.add(keys, values, mask)
        document_keys.append(keys[0, :, :real])
        document_values.append(values[0, :, :real])
    keys, values = torch.cat(document_keys, dim=1), torch.cat(document_values, dim=1)  # (H, 28, D)
    expected_keys = torch.cat([keys[:, :1], keys[:, :-1]], dim=1)
    total = keys.size(1)
    assert sorted(memory.positions[0].tolist()) == list(range(total - 24, total))
    for slot, pos in enumerate(memory.positions[0].tolist()):
        torch.testing.assert_close(memory.keys[0, :, slot], expected_keys[:, pos])
        torch.testing.assert_close(memory.values[0, :, slot], values[:, pos])
    # the search indexes the shifted key: the query equal to key p-1 finds entry p
    found = memory.search(keys[None, :, total - 6 : total - 5] * 10, k=1)
    assert (found.positions[0, :, 0, 0] == total - 5).all()
    torch.testing.assert_close(found.values[0, :, 0, 0], values[:, total - 5])

    memory.reset(torch.tensor([True, False]))
    new_keys, new_values = random_segment(g, seq_len=3, bsz=2)
    memory.add(new_keys, new_values)
    torch.testing.assert_close(memory.keys[0, :, 0], new_keys[0, :, 0])  # not the old document's last key
    torch.testing.assert_close(memory.keys[0, :, 1], new_keys[0, :, 0])


def test_shifted_keys_need_token_retrieval():
    with pytest.raises(MemtrmUserError, match="--memory-chunk-size 1"):
        MemoryBank({0: (H, D)}, memory_size=32, dtype="fp32", backend="exact", chunk_size=4, shift_keys=True)


@pytest.mark.parametrize("store", ["tokens", "chunks"])
def test_stores_share_one_interface_and_entries_are_copies(store):
    """Both stores are MemoryStores; ``entries`` shows what a stream holds (every
    token's own key and value, for the chunked store too) and changing it changes nothing."""
    g = torch.Generator().manual_seed(9)
    memory = KNNMemory(2, H, D, memory_size=16) if store == "tokens" else ChunkedKNNMemory(2, H, D, 16, chunk_size=4)
    assert isinstance(memory, MemoryStore)
    assert (memory.num_streams, memory.num_heads, memory.head_dim, memory.memory_size) == (2, H, D, 16)
    assert memory.entries(0).keys.shape == (H, 0, D) and memory.is_empty()
    keys, values = random_segment(g, seq_len=10, bsz=2)
    memory.add(keys, values, torch.tensor([[True] * 10, [True] * 6 + [False] * 4]))
    entries = memory.entries(1)
    assert entries.keys.shape == (H, 6, D) and entries.positions.tolist() == list(range(6))
    torch.testing.assert_close(entries.values, values[1, :, :6])
    entries.keys.zero_()
    torch.testing.assert_close(memory.entries(1).keys, keys[1, :, :6])
