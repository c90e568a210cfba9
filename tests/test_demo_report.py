"""The demo's retrieval report, checked against brute force on a model whose
retrievals are known: layer 0 has memory, there are no position embeddings
and its query and key projections are equal, so a query's best match is
exactly an earlier occurrence of the same token (cosine 1)."""

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairseq import options, tasks
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from demo.app import DemoApp, list_samples, looks_like_code, max_upload_bytes, parse_checkpoint_args, read_text_file
from demo.checkpoint import DEMO_CHECKPOINT, DEMO_CHECKPOINTS, load_demo_model
from demo.checks import FAR_CALLS, far_call_retrievals, name_pieces_last_seen_far_back, name_recall
from demo.checks import main as checks_main
from demo.report import ReadCancelled, build_report, check_document, token_details
from demo.views import gain_colour
from fairseq_memtrm.errors import MemtrmUserError

PLUGIN = str(Path(__file__).resolve().parents[1] / "fairseq_memtrm")
FILLER_SYMBOLS = 40  # filler draws from these; the planted phrase uses the next 20, once each
PLANTED = 20
HEADS = 4


@pytest.fixture(scope="module")
def same_token_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dict")
    dictionary = Dictionary()
    for i in range(FILLER_SYMBOLS + PLANTED):
        dictionary.add_symbol(f"w{i}", n=1000 - i)
    dictionary.save(str(directory / "dict.txt"))
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(directory), "--user-dir", PLUGIN, "--task", "language_modeling",
        "--arch", "memorizing_transformer_lm_tiny", "--tokens-per-sample", "64", "--cpu",
        "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
        "--decoder-attention-heads", str(HEADS), "--dropout", "0", "--attention-dropout", "0",
        "--no-token-positional-embeddings", "--memory-layers", "0", "--memory-size", "1024",
    ])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model(cfg.model).eval()
    attention = model.memory_attentions()[0]
    with torch.no_grad():
        attention.k_proj.weight.copy_(attention.q_proj.weight)
        attention.k_proj.bias.copy_(attention.q_proj.bias)
    return model, task.dictionary


def planted_document(dictionary, length=400, source=10, repeat=330, seed=0):
    """Random filler with the same 20 unique tokens at ``source`` and at ``repeat``."""
    rng = np.random.default_rng(seed)
    first = dictionary.nspecial
    tokens = rng.integers(first, first + FILLER_SYMBOLS, size=length)
    phrase = np.arange(first + FILLER_SYMBOLS, first + FILLER_SYMBOLS + PLANTED)
    tokens[source : source + PLANTED] = phrase
    tokens[repeat : repeat + PLANTED] = phrase
    return tokens


def texts_of(report):
    return [f"w{int(t)} " for t in report.token_ids]


def report_for(model, tokens, **overrides):
    settings = dict(segment_length=64, memory_size=1024, knn_k=4, stream_id="test")
    settings.update(overrides)
    return build_report(model, tokens.tolist(), **settings)


def test_the_planted_repeats_source_is_the_top_retrieval(same_token_model):
    model, dictionary = same_token_model
    source, repeat = 10, 330
    report = report_for(model, planted_document(dictionary, source=source, repeat=repeat))
    for offset in range(1, PLANTED + 1):
        # token repeat+offset is predicted by the query at repeat+offset-1,
        # whose own token first appeared at source+offset-1
        details = token_details(report, repeat + offset, texts_of(report))
        top = details.entries[0]
        assert top.position == source + offset - 1
        assert top.distance == repeat - source
        assert top.score == pytest.approx(1.0, abs=1e-3)  # stored as fp16
        assert set(top.heads) == set(range(HEADS))  # every head agrees


def test_the_position_check_follows_each_token_to_its_new_place(same_token_model):
    """demo/checks.py's position check: the planted repeat (its source unique in the text) keeps its
    source as best retrieval when 3 tokens are put before the text, a shorter text says why."""
    from demo.checks import shift_stability

    model, dictionary = same_token_model
    tokens = planted_document(dictionary, source=10, repeat=330).tolist()
    repeat = [330 + offset for offset in range(1, PLANTED + 1)]
    settings = dict(segment_length=64, memory_size=1024, knn_k=4)
    assert shift_stability(model, tokens, 3, repeat, **settings) == 1.0
    assert 0 < shift_stability(model, tokens, 3, **settings) <= 1
    with pytest.raises(SystemExit, match="longer than two segments"):
        shift_stability(model, tokens[:100], 3, **settings)


def test_scores_and_positions_equal_brute_force_cosine(same_token_model):
    model, dictionary = same_token_model
    tokens = planted_document(dictionary, seed=1)
    report = report_for(model, tokens, knn_k=3)
    attention = model.memory_attentions()[0]
    with torch.no_grad():
        embedded = model.decoder.embed_scale * model.decoder.embed_tokens(torch.as_tensor(tokens))
        layer_input = model.decoder.layers[0].self_attn_layer_norm(embedded)  # pre-norm layers
        split = lambda x: F.normalize(x.view(len(tokens), HEADS, -1).transpose(0, 1), dim=-1)  # (H, N, D)
        queries, keys = split(attention.q_proj(layer_input)), split(attention.k_proj(layer_input))
    for index in (70, 150, 260, 399):  # queries in segments 1..6
        query_position = index - 1
        memory_end = (query_position // 64) * 64  # earlier segments only
        cosine = torch.einsum("hd,hnd->hn", queries[:, query_position], keys[:, :memory_end])
        details = token_details(report, index, texts_of(report))
        for entry in details.entries:
            expected = max(float(cosine[h, entry.position]) for h in entry.heads)
            assert entry.score == pytest.approx(expected, abs=1e-3)  # stored as fp16
        # an entry listed for head h is in h's brute-force top-k; the best entry is the best match
        kth_best = cosine.topk(3, dim=1).values[:, -1]
        for entry in details.entries:
            assert all(float(cosine[h, entry.position]) >= float(kth_best[h]) - 1e-3 for h in entry.heads)
        assert all(sum(h in e.heads for e in details.entries) <= 3 for h in range(HEADS))
        weights = [e.weight for e in details.entries]
        assert weights == sorted(weights, reverse=True)
        assert sum(weights) <= np.mean(report.head_gates) + 1e-3


def test_losses_first_segment_and_memory_off(same_token_model):
    model, dictionary = same_token_model
    tokens = planted_document(dictionary, seed=2)
    report = report_for(model, tokens)
    # nothing predicts token 0; the first segment has an empty memory: no gain, no entries
    assert np.isnan(report.loss_with_memory[0]) and np.isnan(report.loss_without_memory[0])
    np.testing.assert_allclose(report.loss_with_memory[1:65], report.loss_without_memory[1:65], atol=1e-5)
    assert (report.entry_positions[:65] == -1).all() and (report.memory_share[:65] == 0).all()
    assert (report.entry_positions[65:, 0] >= 0).all()
    # without memory = the plain decoder, segment by segment
    for start in (0, 64, 320):
        source = torch.as_tensor(tokens[start : start + 64]).unsqueeze(0)
        with torch.no_grad():
            log_probs = model.get_normalized_probs(model.decoder(source), log_probs=True)[0]
        target = torch.as_tensor(tokens[start + 1 : start + 65])
        expected = -log_probs[: len(target)].gather(1, target.unsqueeze(1)).squeeze(1)
        np.testing.assert_allclose(
            report.loss_without_memory[start + 1 : start + 1 + len(target)], expected.numpy(), atol=1e-4
        )
    with_memory, without_memory = report.segment_losses()
    assert len(with_memory) == len(report.segment_starts) == 7


def test_small_memory_forgets_far_entries(same_token_model):
    model, dictionary = same_token_model
    report = report_for(model, planted_document(dictionary, seed=3), memory_size=128)
    distances, weights = report.retrieval_distances()
    # a query at t searches entries written before its segment: at most memory_size + segment - 1 back
    assert distances.min() >= 0 and distances.max() <= 128 + 63
    assert distances.size == weights.size > 0
    # the planted source (320 tokens back) has been evicted, so it is not retrieved
    assert all(e.position > 100 for e in token_details(report, 335, texts_of(report)).entries)


def test_concurrent_sessions_never_share_memory(same_token_model):
    """Two sessions read different documents at the same time through one model:
    each gets exactly what it gets alone."""
    model, dictionary = same_token_model
    documents = [planted_document(dictionary, seed=10), planted_document(dictionary, seed=11)[::-1].copy()]
    alone = [report_for(model, d, stream_id=f"alone-{i}") for i, d in enumerate(documents)]
    lock, together = threading.Lock(), [None, None]

    def read(i):
        together[i] = report_for(model, documents[i], stream_id=f"session-{i}", lock=lock)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for solo, shared in zip(alone, together):
        np.testing.assert_array_equal(solo.entry_positions, shared.entry_positions)
        np.testing.assert_allclose(solo.loss_with_memory, shared.loss_with_memory, atol=1e-6)


def test_predictions_and_entries_that_hold_the_token(same_token_model):
    """Per token: the top predictions with and without memory (without = the plain decoder's),
    the true token's probability = exp(-loss), and an entry is marked exactly where its token
    is the clicked one."""
    model, dictionary = same_token_model
    tokens = planted_document(dictionary, seed=4)
    report = report_for(model, tokens)
    source = torch.as_tensor(tokens[128:192]).unsqueeze(0)
    with torch.no_grad():
        plain = model.get_normalized_probs(model.decoder(source), log_probs=False)[0]  # (T, V)
    for index in (130, 150, 191):
        details = token_details(report, index, texts_of(report))
        expected = plain[index - 129].topk(5)
        assert [p.token for p in details.predictions_without_memory] == [str(i) for i in expected.indices.tolist()]
        np.testing.assert_allclose([p.probability for p in details.predictions_without_memory],
                                   expected.values.numpy(), atol=2e-3)  # stored as fp16
        with_memory = [p.probability for p in details.predictions_with_memory]
        assert with_memory == sorted(with_memory, reverse=True) and sum(with_memory) <= 1 + 1e-3
        assert details.probability_with_memory == pytest.approx(np.exp(-report.loss_with_memory[index]))
    marked = 0
    for index in range(65, len(tokens)):
        for entry in token_details(report, index, texts_of(report)).entries:
            assert entry.holds_token == (tokens[entry.position] == tokens[index])
            marked += entry.holds_token
    assert marked > 0  # the filler repeats: some entries hold the token to predict
    assert token_details(report, 0, texts_of(report)).predictions_with_memory == []


def test_memory_share_follows_the_gate(same_token_model):
    """The share of the layer's output from memory: 0 in the first segment, between 0 and 1 after,
    0 with a closed gate and 1 with a fully open one (the gate is a constant per head, the share not)."""
    model, dictionary = same_token_model
    tokens = planted_document(dictionary, seed=5)
    share = report_for(model, tokens).memory_share
    assert (share[:65] == 0).all() and ((share[65:] > 0) & (share[65:] < 1)).all() and share[65:].std() > 0
    attention = model.memory_attentions()[0]
    saved = attention.memory_gate.detach().clone()
    try:
        for logit, expected in ((-40.0, 0.0), (40.0, 1.0)):
            with torch.no_grad():
                attention.memory_gate.fill_(logit / attention.memory_param_gain)
            report = report_for(model, tokens)
            np.testing.assert_allclose(report.memory_share[65:], expected, atol=1e-5)
            np.testing.assert_allclose(report.head_gates, expected, atol=1e-5)
    finally:
        with torch.no_grad():
            attention.memory_gate.copy_(saved)


def test_progress_counts_the_documents_segments_once_and_a_read_stops(same_token_model):
    model, dictionary = same_token_model
    tokens = planted_document(dictionary)  # 400 tokens: 7 segments of 64
    calls = []
    report_for(model, tokens, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(done, 7) for done in range(1, 8)]
    asked = []
    with pytest.raises(ReadCancelled, match="after 3 of 7 segments"):
        report_for(model, tokens, should_stop=lambda: asked.append(1) or len(asked) > 3)


def test_bad_documents_get_clear_errors(tmp_path):
    with pytest.raises(MemtrmUserError, match="empty"):
        check_document([2])
    with pytest.raises(MemtrmUserError, match="at most 100"):
        check_document(list(range(101)), max_tokens=100)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(MemtrmUserError, match="not UTF-8"):
        read_text_file(str(latin1))
    with pytest.raises(MemtrmUserError, match="only local checkpoints"):
        load_demo_model("https://example.com/model.pt")
    with pytest.raises(MemtrmUserError, match="no checkpoint file"):
        load_demo_model(str(tmp_path / "missing.pt"))
    with pytest.raises(MemtrmUserError, match="not a directory"):
        list_samples(str(tmp_path / "missing"))
    assert "stdlib: argparse.py" in list_samples(None)
    assert gain_colour(1.0).startswith("rgba(34") and gain_colour(-1.0).startswith("rgba(220")


@pytest.mark.parametrize("corpus", sorted(DEMO_CHECKPOINTS))
def test_committed_demo_models_are_small_fp16_with_their_recipes_memory(corpus):
    """Each committed demo model: fp16, <= 25 MB, its tokenizer beside it, and the memory
    make_demo_model.py trains: code the paper's (query -> keys), books the one that copies
    (key query, shifted keys); both at layer 2, the committed vanillas' induction layer."""
    checkpoint = DEMO_CHECKPOINTS[corpus]
    assert os.path.getsize(checkpoint) <= 25 * 2**20
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert {t.dtype for t in state["model"].values() if t.is_floating_point()} == {torch.float16}
    assert state["last_optimizer_state"] is None
    model_cfg = state["cfg"]["model"]
    expected = {"code": ["query", False, 65536, "2"], "books": ["key", True, 65536, "2"]}[corpus]
    assert [model_cfg[k] for k in ("memory_query", "memory_shift_keys", "memory_size", "memory_layers")] == expected
    for name in ("spm.model", "dict.txt"):
        assert os.path.isfile(os.path.join(os.path.dirname(checkpoint), name))


def test_checkpoint_arguments_and_the_model_a_sample_gets(tmp_path):
    assert parse_checkpoint_args(None) == DEMO_CHECKPOINTS  # both committed
    assert parse_checkpoint_args(["checkpoints/books/ft/checkpoint_last.pt", "prose=/m/b.pt", "a/ft/c.pt"]) == {
        "ft": "checkpoints/books/ft/checkpoint_last.pt", "prose": "/m/b.pt", "ft-3": "a/ft/c.pt"}
    with pytest.raises(MemtrmUserError, match="the name 'x' is taken"):
        parse_checkpoint_args(["x=a.pt", "x=b.pt"])
    samples = {"stdlib: heapq.py": "/lib/heapq.py", "samples: kidnapped.txt": "/books/kidnapped.txt"}
    both = DemoApp({"code": None, "books": None}, samples)
    assert both.model_for_sample("samples: kidnapped.txt", "code") == "books"
    assert both.model_for_sample("stdlib: heapq.py", "books") == "code"
    assert both.model_for_sample(None, "books") == "books"  # no sample: the user's choice stands
    assert DemoApp({"mine": None}, samples).model_for_sample("samples: kidnapped.txt", "mine") == "mine"


def test_the_document_is_what_was_touched_last_with_the_model_it_suits():
    prose = "It was a bright cold day in April, and the clocks were striking thirteen.\nWinston Smith hurried."
    code = "def area(r):\n    return 3.14 * r * r\n\nprint(area(2))\n"
    cut_out = "        if x:\n            y = f(x)\n        return y\n"  # indented: does not parse alone
    assert looks_like_code(code) and looks_like_code(cut_out) and looks_like_code(open(os.__file__).read())
    assert not looks_like_code(prose) and not looks_like_code("Hello") and not looks_like_code("")
    assert not looks_like_code(open(Path(__file__).parents[1] / "docs" / "vanilla.md").read())
    both = DemoApp({"code": None, "books": None}, {"stdlib: heapq.py": "/lib/heapq.py"})
    assert both.on_paste(prose, "code") == ("Paste", "books")
    assert both.on_paste(code, "books") == ("Paste", "code")
    assert both.on_upload("/tmp/notes.txt", "code") == ("Upload", "books")
    assert both.on_upload("/tmp/x.py", "books") == ("Upload", "code")
    assert both.on_sample("stdlib: heapq.py", "books") == ("Sample", "code")
    assert DemoApp({"mine": None}, {}).on_paste(prose, "mine") == ("Paste", "mine")  # only one model


def test_a_text_of_one_segment_says_why_nothing_was_retrieved():
    app = DemoApp({"code": load_demo_model(DEMO_CHECKPOINT, cpu=True, segment_length=64)}, {}, max_tokens=2000)
    status, _, view, _, gain_chart, distance_plot, links, session = app.run(
        "code", "Paste", None, "x = 1\ny = 2\n", None, 1024, 8, {}, None, progress=lambda *a, **k: None)
    assert "The memory starts after the first segment** (64 tokens)" in status
    assert gain_chart["visible"] is False and distance_plot["visible"] is False and links == ""
    status, _, view, _, gain_chart, distance_plot, links, session = app.run(
        "code", "Paste", None, "x = 1\ny = 2\n" * 40, None, 1024, 8, {}, None, progress=lambda *a, **k: None)
    assert "memory starts after" not in status and gain_chart["visible"] is True and distance_plot["visible"]
    assert 'data-segment="1"' in gain_chart["value"] and 'class="type-link"' in links


def test_a_checkpoint_folders_own_tokenizer_comes_first(tmp_path):
    from omegaconf import OmegaConf

    from demo.checkpoint import _find_assets

    folder, data_bin = tmp_path / "ckpt", tmp_path / "data-bin"
    for directory in (folder, data_bin):
        directory.mkdir()
        (directory / "dict.txt").write_text("a 1\n")
    (data_bin / "spm.model").write_bytes(b"x")
    cfg = OmegaConf.create({"task": {"data": str(data_bin)}})
    checkpoint = str(folder / "checkpoint_last.pt")
    # a folder with dict.txt but no SentencePiece model: both from the data-bin
    assert _find_assets(checkpoint, cfg, None, None) == (str(data_bin), str(data_bin / "spm.model"))
    (folder / "spm.model").write_bytes(b"x")  # kept by the training scripts: the folder's own
    assert _find_assets(checkpoint, cfg, None, None) == (str(folder), str(folder / "spm.model"))


def test_committed_demo_model_loads_encodes_and_reads():
    """The code demo model's text round-trips through encode/token_texts as
    prepare_data.py normalises it; a short document reads with and without memory."""
    demo = load_demo_model(DEMO_CHECKPOINT, cpu=True, segment_length=128)
    text = "def f(x):\n\treturn x  \n\n\nclass Cafe:\n    pass\n"
    assert "".join(demo.token_texts(demo.encode(text))) == "\ndef f(x):\n    return x\nclass Cafe:\n    pass\n"
    lines = Path(os.path.dirname(os.__file__), "bisect.py").read_text(encoding="utf-8").splitlines()[:60]
    token_ids = demo.encode("\n".join(lines))
    report = build_report(demo.model, token_ids, segment_length=128, memory_size=1024, knn_k=8, stream_id="demo")
    assert np.isfinite(report.loss_with_memory[1:]).all() and np.isfinite(report.loss_without_memory[1:]).all()
    assert (report.entry_positions[:129] == -1).all() and (report.entry_positions[129:, 0] >= 0).all()
    details = token_details(report, len(token_ids) - 1, demo.token_texts(token_ids))
    assert 1 <= len(details.entries) <= 8 and all(0 <= e.distance < len(token_ids) for e in details.entries)
    assert all(0 < g < 1 for g in report.head_gates) and 0 < details.memory_share < 1


def test_upload_limit_follows_the_token_limit():
    """Gradio's max_file_size and the app's own check: 40 bytes per token."""
    assert max_upload_bytes(300_000) == 12_000_000 and max_upload_bytes(200) == 8_000


def test_app_shows_bad_input_as_a_message(tmp_path):
    """Empty input, non-UTF-8 bytes and an over-long document: a status message, no exception."""
    app = DemoApp({"code": load_demo_model(DEMO_CHECKPOINT, cpu=True, segment_length=64)}, {}, max_tokens=200)
    latin1 = tmp_path / "latin1.py"
    latin1.write_bytes(b"x = 'caf\xe9'\n")
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as handle:  # sparse: 200 MB that would take seconds and RAM to read
        handle.truncate(200_000_000)
    no_progress = lambda *args, **kwargs: None
    cases = {
        "the document is empty": ("Paste", None, "  \n ", None),
        "not UTF-8": ("Upload", None, "", str(latin1)),
        "the demo reads at most 200": ("Paste", None, "x = 1\n" * 100, None),
        "upload a .txt or .py file": ("Upload", None, "", str(tmp_path / "model.pt")),
        "the file has 200,000,000 bytes, far over the limit of 200 tokens": ("Upload", None, "", str(huge)),
    }
    status, *_, session = app.run("books", "Paste", None, "x = 1\n", None, 1024, 8, {}, None, progress=no_progress)
    assert status.startswith("**Error:**") and "choose a model: code" in status
    for message, (source, sample, pasted, upload) in cases.items():
        status, _, view, *_, session = app.run("code", source, sample, pasted, upload, 1024, 8, {}, None,
                                               progress=no_progress)
        assert status.startswith("**Error:**") and message in status, status
        assert "report" not in session
    long_sample = tmp_path / "long.py"
    long_sample.write_text("x = 1\n" * 100, encoding="utf-8")
    app.samples = {"samples: long.py": str(long_sample)}  # a sample over the limit: its first 200 tokens
    status, _, view, *_, session = app.run("code", "Sample", "samples: long.py", "", None, 1024, 8, {}, None,
                                           progress=no_progress)
    assert "Read **200 tokens** (the sample's first 200 tokens: the demo's limit)" in status
    assert session["report"].num_tokens == 200
    text = "x = 1\n" * 20
    status, _, view, *_, session = app.run("code", "Paste", None, text, None, 1024, 8, {}, None,
                                           progress=no_progress)
    num_tokens = len(app.models["code"].encode(text))
    assert status.startswith(f"Read **{num_tokens} tokens** with the `code` model")
    assert view.count('class="tok"') == num_tokens
    assert session["report"].num_tokens == num_tokens


def test_committed_code_model_retrieves_functions_defined_far_above_their_call():
    """The issue's bar for code: at the call of a function defined ~8,400 tokens
    above, the best-weighted retrieval of most of the name's pieces is the
    definition (the code model, the paper's memory at layer 2 of the copying code
    vanilla: 6 of 8; the layer-0/3 model before it: 5; the same vanilla's copying
    memory: 4). Names made of words the module uses elsewhere (merge, sorted) are
    harder: each still gets at least one piece from its definition, and over all
    four most do (measured: 14 of 21; the model before: 9)."""
    demo = load_demo_model(DEMO_CHECKPOINT, cpu=True, segment_length=512)
    results = {name: far_call_retrievals(demo, name, module, call) for name, module, call in FAR_CALLS}
    frobnicate = results["frobnicate_widget_counter"]
    assert sum(frobnicate) >= 5, results
    assert all(any(hits) for hits in results.values()), results
    every = [hit for hits in results.values() for hit in hits]
    assert sum(every) >= 12, results


BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "books"


def test_name_pieces_are_found_by_position_and_distance():
    texts = ["\n", "The", " dog", " met", " Al", "an", ".", " Then", " Al", "an", " ran", " with", " Al", "an"]
    token_ids = [0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 8, 9, 4, 5]
    # "Then" starts a sentence; "Alan" at 8-9 is 4 tokens after 4-5, at 12-13 4 after 8-9
    assert name_pieces_last_seen_far_back(texts, token_ids, 4) == [8, 9, 12, 13]
    assert name_pieces_last_seen_far_back(texts, token_ids, 5) == []


@pytest.mark.skipif(not (BOOKS / "test" / "kidnapped.txt").is_file(), reason=f"no books at {BOOKS}")
def test_committed_books_model_retrieves_names_seen_thousands_of_tokens_earlier():
    """The issue's bar for books: in the first 12,000 tokens of a held-out novel,
    the pieces of names whose last mention is 1,000+ tokens back (beyond the
    512-token local window: only the memory has them) are among the retrieved
    entries, and the memory lowers their loss far more than the average token's
    (measured: 159 pieces, 39.6% recalled, 0.26 vs 0.03 nats, 26 copies, 22 from 2,000+ back)."""
    demo = load_demo_model(DEMO_CHECKPOINTS["books"], cpu=True, segment_length=512)
    result = name_recall(demo, (BOOKS / "test" / "kidnapped.txt").read_text(encoding="utf-8"), 12000)
    assert result.pieces >= 50
    assert result.recalled >= 0.3, result
    assert result.name_gain >= 0.15 and result.name_gain >= 3 * result.mean_gain, result
    # the best-weighted entry is the name piece itself, from thousands of tokens back
    # (e.g. "Essendean", David's village; the chapter titles' capitals)
    copied_from = result.copied_from
    assert len(copied_from) >= 15 and (copied_from >= 2000).sum() >= 10, sorted(copied_from)


@pytest.mark.skipif(not (BOOKS / "test" / "kidnapped.txt").is_file(), reason=f"no books at {BOOKS}")
def test_checks_command_prints_both_checks(capsys):
    checks_main(["--checkpoint", DEMO_CHECKPOINTS["books"], "--book", str(BOOKS / "test" / "kidnapped.txt"),
                 "--book-tokens", "3000"])
    out = capsys.readouterr().out
    assert out.count("far call ") == len(FAR_CALLS) + 1 and "names     kidnapped.txt, first 3000 tokens" in out
    with pytest.raises(SystemExit, match="no such file"):
        checks_main(["--checkpoint", DEMO_CHECKPOINTS["books"], "--book", "missing.txt"])


def test_a_longmem_checkpoint_reads_in_the_demo(tmp_path):
    """Any memory checkpoint of this plugin serves: a LongMem SideNet (its memory
    written by the frozen backbone, read by a side layer) gives a report whose
    entries lie in earlier segments and whose no-memory loss is the SideNet's own."""
    from lm_builders import TINY, build, save_checkpoint, write_dictionary

    write_dictionary(tmp_path)
    backbone_cfg, _, backbone = build(tmp_path, "transformer_lm", TINY + ["--decoder-layers", "4"])
    save_checkpoint(backbone_cfg, backbone, tmp_path / "backbone.pt")
    cfg, task, side = build(tmp_path, "longmem_sidenet_lm_tiny", [
        "--backbone-checkpoint", str(tmp_path / "backbone.pt"), "--dropout", "0", "--memory-size", "256"])
    save_checkpoint(cfg, side, tmp_path / "longmem.pt")
    spm = os.path.join(os.path.dirname(DEMO_CHECKPOINT), "spm.model")  # loads; the test feeds token ids
    demo = load_demo_model(str(tmp_path / "longmem.pt"), data=str(tmp_path), spm_model=spm, cpu=True,
                           segment_length=32)
    tokens = np.random.default_rng(0).integers(task.dictionary.nspecial, len(task.dictionary), size=130)
    report = build_report(demo.model, tokens.tolist(), segment_length=32, memory_size=256, knn_k=4, stream_id="lm")
    assert report.layer == demo.model.memory_layer_ids[0]
    assert (report.entry_positions[:33] == -1).all() and (report.entry_positions[33:, 0] >= 0).all()
    for index in (40, 70, 129):  # entries come from segments before the query's
        entries = report.entry_positions[index][report.entry_positions[index] >= 0]
        assert (entries < ((index - 1) // 32) * 32).all()
    assert np.isfinite(report.loss_with_memory[1:]).all()
    side.eval()
    side.memory_bank = side.memory_bank.resized(0)  # the SideNet without memory, on a later segment
    with torch.no_grad():
        logits = side(torch.as_tensor(tokens[64:96]).unsqueeze(0), doc_start=torch.tensor([True]), stream_id="ref")[0]
    expected = -F.log_softmax(logits.float(), -1)[0].gather(1, torch.as_tensor(tokens[65:97]).unsqueeze(1))
    np.testing.assert_allclose(report.loss_without_memory[65:97], expected.squeeze(1).numpy(), atol=1e-4)
    assert not np.allclose(report.loss_with_memory[65:97], report.loss_without_memory[65:97], atol=1e-4)
    with pytest.raises(MemtrmUserError, match="not a checkpoint of this plugin's memory models"):
        load_demo_model(str(tmp_path / "backbone.pt"), data=str(tmp_path), spm_model=spm)
