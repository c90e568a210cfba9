"""Every search backend behind ``KNNMemory``, against a brute-force numpy reference.

Exact backends must return exactly the brute-force top-k; approximate ones a
recall over a threshold. Eviction order and per-stream reset hold for all.
"""

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fairseq_memtrm.errors import MemtrmUserError
from fairseq_memtrm.memory import ChunkedKNNMemory, KNNMemory, memory_bytes
from fairseq_memtrm.memory.faiss_search import FaissIVFSearch
from fairseq_memtrm.memory import search as search_module
from fairseq_memtrm.memory.search import BACKENDS, ExactSearch

H, D, K = 2, 16, 4
EXACT_BACKENDS = [name for name, cls in BACKENDS.items() if not cls.approximate]
APPROXIMATE_BACKENDS = [name for name, cls in BACKENDS.items() if cls.approximate]
# Small IVF: 16 lists, trained once a stream holds 39 * 16 = 624 keys, so the
# tests below run through the index, not the exact fallback.
IVF_OPTIONS = {"nlist": 16, "nprobe": 6}


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Correctness only: tiny searches run several times faster on one OpenMP
    thread than on two when the cores are shared with other work."""
    threads, torch_threads = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(torch_threads)


def make_memory(backend, num_streams=1, memory_size=1000, dtype="fp32"):
    memory = KNNMemory(num_streams, H, D, memory_size, dtype, backend)
    if isinstance(memory.backend, FaissIVFSearch):
        memory.backend = FaissIVFSearch(num_streams, H, D, memory_size, **IVF_OPTIONS)
    if isinstance(memory.backend, ExactSearch):
        memory.backend.block_size = 96  # several blocks and a partial last one
    return memory


def clustered_unit_vectors(generator, shape, num_clusters=24):
    """Unit vectors around a few directions, like attention keys (not uniform noise)."""
    centers = F.normalize(torch.randn(num_clusters, shape[-1], generator=generator), dim=-1)
    choice = torch.randint(num_clusters, shape[:-1], generator=generator)
    noise = 0.6 * torch.randn(shape, generator=generator) / shape[-1] ** 0.5
    return F.normalize(centers[choice] + noise, dim=-1)


def fill(memory, generator, num_tokens, seq_len=100, query_len=4):
    """Write ``num_tokens`` per stream in segments, searching before each write as
    the model does (so an index is built mid-document and then kept in step).
    Returns the written keys and values (B, H, num_tokens, D) in document order."""
    bsz = memory.num_streams
    keys = clustered_unit_vectors(generator, (bsz, H, num_tokens, D))
    values = torch.randn(bsz, H, num_tokens, D, generator=generator)
    for start in range(0, num_tokens, seq_len):
        memory.search(clustered_unit_vectors(generator, (bsz, H, query_len, D)), K)
        memory.add(keys[:, :, start : start + seq_len], values[:, :, start : start + seq_len])
    return keys, values


def brute_force(queries, keys, k):
    """(T, D) x (N, D) numpy -> top-k scores and indices along N."""
    scores = queries @ keys.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def held_window(keys, values, memory_size):
    """The entries a ring of ``memory_size`` holds: the newest, with their positions."""
    total = keys.size(2)
    first = max(0, total - memory_size)
    return keys[:, :, first:], values[:, :, first:], first


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("num_tokens", [300, 1250])  # small path; grouped path after the ring wrapped
def test_exact_backends_equal_brute_force(backend, num_tokens):
    g = torch.Generator().manual_seed(0)
    memory = make_memory(backend, num_streams=2, memory_size=1000)
    keys, values = fill(memory, g, num_tokens)
    held_keys, held_values, first = held_window(keys, values, 1000)
    queries = clustered_unit_vectors(g, (2, H, 9, D))
    found = memory.search(queries, K)
    assert found.mask.all()
    for b in range(2):
        for h in range(H):
            ref_scores, ref_index = brute_force(queries[b, h].numpy(), held_keys[b, h].numpy(), K)
            np.testing.assert_allclose(found.scores[b, h].numpy(), ref_scores, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(found.positions[b, h].numpy(), ref_index + first)
            np.testing.assert_array_equal(found.values[b, h].numpy(), held_values[b, h].numpy()[ref_index])


@pytest.mark.parametrize("path", ["_grouped_topk", "_full_topk"])
@pytest.mark.parametrize("num_keys", [1024, 1027, 5000])
def test_both_exact_search_paths_match_full_topk(num_keys, path, monkeypatch):
    """The two-pass search (including a last group shorter than ``group_size``)
    and the plain one (a few query rows at a time) both equal one big top-k."""
    monkeypatch.setattr(search_module, "FULL_SCORES", 3 * 7 * num_keys)  # 7 query rows per pass
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(3, 50, D, generator=g)
    keys = torch.randn(3, num_keys, D, generator=g)
    search = ExactSearch(1, 3, D, num_keys, block_size=200)
    scores, slots = getattr(search, path)(queries, keys, 16)
    ref_scores, ref_slots = torch.bmm(queries, keys.transpose(1, 2)).topk(16, dim=-1)
    torch.testing.assert_close(scores, ref_scores)
    assert (slots == ref_slots).float().mean() > 0.999  # only exact float ties may swap


def test_exact_search_takes_the_plain_path_where_candidates_outnumber_keys(monkeypatch):
    """Two-pass candidates cost k * group_size * D floats per query: worth it from
    that many keys on."""
    search = ExactSearch(1, 1, D, 10_000)
    taken = []
    monkeypatch.setattr(search, "_grouped_topk", lambda q, keys, k: taken.append("grouped"))
    monkeypatch.setattr(search, "_full_topk", lambda q, keys, k: taken.append("full"))
    bound = 4 * search.group_size * D
    for num_keys in (bound - 1, bound):
        search.search(0, torch.zeros(1, 2, D), torch.zeros(1, num_keys, D), 4)
    assert taken == ["full", "grouped"]
    assert [search.two_pass(n, 4) for n in (bound - 1, bound)] == [False, True]


@pytest.mark.parametrize("backend", APPROXIMATE_BACKENDS)
def test_approximate_backends_recall_against_brute_force(backend):
    g = torch.Generator().manual_seed(2)
    memory = make_memory(backend, num_streams=2, memory_size=2000)
    keys, _ = fill(memory, g, 1800)
    assert all(memory.backend.is_indexed(b) for b in range(2)), "the index, not the exact fallback, must answer"
    queries = clustered_unit_vectors(g, (2, H, 64, D))
    found = memory.search(queries, K)
    hits = 0
    for b in range(2):
        for h in range(H):
            _, ref_index = brute_force(queries[b, h].numpy(), keys[b, h].numpy(), K)
            for t in range(64):
                hits += len(set(found.positions[b, h, t].tolist()) & set(ref_index[t].tolist()))
            # whatever was found is scored truthfully
            held = found.mask[b, h]
            true_scores = (queries[b, h].unsqueeze(1) * keys[b, h][found.positions[b, h].clamp(min=0)]).sum(-1)
            torch.testing.assert_close(found.scores[b, h][held], true_scores[held])
    recall = hits / (2 * H * 64 * K)
    assert recall >= 0.9, f"recall@{K} {recall:.3f}"


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_eviction_keeps_exactly_the_newest_entries(backend):
    g = torch.Generator().manual_seed(3)
    memory = make_memory(backend, memory_size=1000)
    keys, _ = fill(memory, g, 1650)  # wraps: positions 650..1649 are held
    if isinstance(memory.backend, FaissIVFSearch):
        assert memory.backend.is_indexed(0)
        assert memory.backend.indexes[0][0].ntotal == 1000, "overwritten slots must leave the index"
    held = [650, 651, 1200, 1649]
    evicted = [0, 300, 649]
    queries = keys[0, :, held + evicted].unsqueeze(0)  # each query is a stored key
    found = memory.search(queries, K)
    positions = found.positions[0]
    valid = positions[found.mask[0]]
    assert ((valid >= 650) & (valid < 1650)).all(), "an evicted entry was returned"
    # a stale index entry would carry the evicted key's score, not the held key's
    true_scores = (queries.unsqueeze(3) * found.keys).sum(-1)
    torch.testing.assert_close(found.scores[found.mask], true_scores[found.mask])
    # a held key finds itself first (its own list is the first one probed)
    assert (positions[:, : len(held), 0] == torch.tensor(held)).all()
    for i, position in enumerate(evicted):
        assert not (positions[:, len(held) + i] == position).any()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_reset_forgets_only_the_named_stream(backend):
    g = torch.Generator().manual_seed(4)
    memory = make_memory(backend, num_streams=2, memory_size=1000)
    keys, _ = fill(memory, g, 800)
    queries = clustered_unit_vectors(g, (2, H, 6, D))
    before = memory.search(queries, K)

    memory.reset(torch.tensor([False, True]))
    after = memory.search(queries, K)
    assert not after.mask[1].any() and (after.positions[1] == -1).all()
    torch.testing.assert_close(after.scores[0], before.scores[0])
    assert torch.equal(after.positions[0], before.positions[0])

    # the new document in stream 1 is found from position 0; nothing of the old one
    new_keys = clustered_unit_vectors(g, (2, H, 700, D))
    for start in range(0, 700, 100):
        memory.search(queries, K)
        memory.add(new_keys[:, :, start : start + 100], new_keys[:, :, start : start + 100])
    own = memory.search(new_keys[:, :, [5, 650]], K)
    assert (own.positions[1, :, :, 0] == torch.tensor([5, 650])).all()
    assert torch.equal(own.values[1, :, :, 0], new_keys[1, :, [5, 650]])


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_fp16_storage_searches_like_fp32(backend):
    g_full, g_half = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    full, half = make_memory(backend), make_memory(backend, dtype="fp16")
    fill(full, g_full, 900)
    fill(half, g_half, 900)
    assert half.keys.dtype == torch.float16
    queries = clustered_unit_vectors(torch.Generator().manual_seed(6), (1, H, 16, D))
    found_full, found_half = full.search(queries, K), half.search(queries, K)
    assert found_half.scores.dtype == queries.dtype
    torch.testing.assert_close(found_half.scores, found_full.scores, atol=5e-3, rtol=5e-3)


def test_ram_estimate_counts_the_index_copy():
    exact = memory_bytes(65536, 8, 32, "fp16", "exact")
    ivf = memory_bytes(65536, 8, 32, "fp16", "faiss-ivf")
    assert exact == 65536 * (8 * 32 * 2 * 2 + 8)
    assert ivf - exact == 65536 * 8 * (32 * 4 + 8)
    assert memory_bytes(65536, 8, 32, "fp32", "faiss-flat") == memory_bytes(65536, 8, 32, "fp32", "exact")
    # HNSW links grow with M, and the spec's M is the one counted
    assert memory_bytes(1024, 8, 32, "fp32", "faiss-hnsw:hnsw_m=64") > memory_bytes(1024, 8, 32, "fp32", "faiss-hnsw")


def test_unknown_backend_names_the_choices():
    with pytest.raises(MemtrmUserError, match="faiss-ivf"):
        KNNMemory(1, H, D, 100, backend="annoy")


def test_backend_options_come_from_the_spec():
    memory = KNNMemory(1, H, D, 4096, backend="faiss-ivf:nprobe=24,nlist=32")
    assert (memory.backend.nprobe, memory.backend.nlist) == (24, 32)
    assert KNNMemory(1, H, D, 100, backend="exact:block_size=64").backend.block_size == 64
    for bad in ("faiss-ivf:nprobes=4", "faiss-ivf:nprobe=many", "faiss-flat:nprobe=4"):
        with pytest.raises(MemtrmUserError, match="KEY=NUMBER"):
            KNNMemory(1, H, D, 100, backend=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_cuda_memory_matches_cpu(backend):
    g = torch.Generator().manual_seed(7)
    keys = clustered_unit_vectors(g, (1, H, 900, D))
    queries = clustered_unit_vectors(g, (1, H, 8, D))
    results = []
    for device in ("cpu", "cuda"):
        memory = make_memory(backend)
        for start in range(0, 900, 100):
            memory.search(queries.to(device), K)
            memory.add(keys[:, :, start : start + 100].to(device), keys[:, :, start : start + 100].to(device))
        found = memory.search(queries.to(device), K)
        assert found.scores.device.type == device
        results.append(found)
    torch.testing.assert_close(results[1].scores.cpu(), results[0].scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("store", ["tokens", "chunks"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_search_without_vectors_finds_the_same_entries(backend, store):
    """``vectors=False`` (the neural cache's search) skips only the keys and values, and
    ``keys=False`` (attention without gradient) only the keys: the same scores, positions,
    mask (and values), streams of different fill, ring wrapped. The scores are the found
    keys' inner products with the queries, which is what lets the attention skip the keys."""
    g = torch.Generator().manual_seed(5)
    if store == "tokens":
        memory = make_memory(backend, num_streams=2, memory_size=1000)
    else:
        memory = ChunkedKNNMemory(2, H, D, 1000, chunk_size=4, backend=backend)
    fill(memory, g, 1650)
    memory.reset(torch.tensor([False, True]))
    memory.add(*(clustered_unit_vectors(g, (2, H, 300, D)) for _ in range(2)))  # stream 1 partly filled
    queries = clustered_unit_vectors(g, (2, H, 7, D))
    full, bare = memory.search(queries, 4 * K), memory.search(queries, 4 * K, vectors=False)
    assert bare.keys is None and bare.values is None
    assert full.mask.any()
    torch.testing.assert_close(bare.scores, full.scores)
    assert torch.equal(bare.positions, full.positions) and torch.equal(bare.mask, full.mask)
    no_keys = memory.search(queries, 4 * K, keys=False)
    assert no_keys.keys is None and torch.equal(no_keys.values, full.values)
    torch.testing.assert_close(no_keys.scores, full.scores)
    assert torch.equal(no_keys.positions, full.positions) and torch.equal(no_keys.mask, full.mask)
    products = torch.einsum("bhtd,bhtkd->bhtk", queries, full.keys)
    torch.testing.assert_close(full.scores[full.mask], products[full.mask], rtol=1e-5, atol=1e-5)


def test_ivf_two_lists_per_key_find_each_slot_once_and_evict_every_copy():
    """``assign=2`` (every key in its 2 nearest lists): each slot is returned once per
    query, scored truthfully; an
    overwritten slot leaves every list it was in; recall at a low nprobe is at least the
    plain index's; the RAM estimate counts both copies."""
    recalls = {}
    for spec in ("faiss-ivf", "faiss-ivf:assign=2"):
        g = torch.Generator().manual_seed(7)
        memory = KNNMemory(1, H, D, 1000, "fp32", spec)
        options = dict(IVF_OPTIONS, nprobe=2)
        memory.backend = type(memory.backend)(1, H, D, 1000, **options, assign=2 if "assign" in spec else 1)
        keys, _ = fill(memory, g, 1650)  # wraps: positions 650..1649 are held
        index = memory.backend.indexes[0][0]
        assert index.ntotal == 1000 * memory.backend.assign, "overwritten slots must leave every list"
        held_keys = keys[:, :, 650:]
        queries = clustered_unit_vectors(g, (1, H, 64, D))
        found = memory.search(queries, K)
        hits = 0
        for h in range(H):
            positions = found.positions[0, h]
            for t in range(64):
                row = [p for p in positions[t].tolist() if p >= 0]
                assert len(row) == len(set(row)), "a slot was returned twice"
            assert ((positions[found.mask[0, h]] >= 650)).all(), "an evicted entry was returned"
            true_scores = (queries[0, h].unsqueeze(1) * keys[0, h][positions.clamp(min=0)]).sum(-1)
            torch.testing.assert_close(found.scores[0, h][found.mask[0, h]], true_scores[found.mask[0, h]])
            _, ref_index = brute_force(queries[0, h].numpy(), held_keys[0, h].numpy(), K)
            hits += sum(len(set(positions[t].tolist()) & set((ref_index[t] + 650).tolist())) for t in range(64))
        recalls[spec] = hits / (H * 64 * K)
    assert recalls["faiss-ivf"] < 1 and recalls["faiss-ivf:assign=2"] >= recalls["faiss-ivf"], recalls
    assert (memory_bytes(1000, H, D, "fp32", "faiss-ivf:assign=2") - memory_bytes(1000, H, D, "fp32", "faiss-ivf")
            == 1000 * H * (D * 4 + 8))
