"""Test-time methods (fairseq_memtrm.testtime, scripts/eval_testtime.py): dynamic
evaluation and the neural cache, checked against the formulas by hand on tiny
models, and the CLI on a slice of real documents."""

import json
import math
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairseq import options, tasks, utils
from fairseq.data import data_utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from lm_builders import PLUGIN, REPO, TINY, build, run_command, save_checkpoint, write_dictionary

from fairseq_memtrm.diagnostics import plant_passage, planted_passage_loss
from fairseq_memtrm.testtime import (CacheKNNLM, DynamicEvaluator, NeuralCache, StaticScorer, gradient_rms, mix3,
                                     planted_passage_losses, score_streams)
from fairseq_memtrm.testtime.neural_cache import mix
from fairseq_memtrm.errors import MemtrmUserError
from fairseq_memtrm.testtime.dynamic_eval import adaptable_parameters
from fairseq_memtrm.testtime.knn_lm import KNNLM, build_datastore

MEMORIZING = ["--memory-size", "64", "--knn-k", "4", "--memory-layers", "1"]


def tiny(data_dir, arch="transformer_lm", extra=(), seed=1, tokens_per_sample=8):
    """(model, task): a 3 x 32 model under --task document_lm (so a vanilla drops doc_start)."""
    args = options.parse_args_and_arch(
        options.get_training_parser(),
        [str(data_dir), "--user-dir", PLUGIN, "--task", "document_lm", "--arch", arch, "--tokens-per-sample",
         str(tokens_per_sample), "--batch-size", "2", "--cpu", *TINY, *extra],
    )
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(seed)
    model = task.build_model(cfg.model)
    return model.eval(), task


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vocab")
    write_dictionary(directory)
    return directory


def documents(count, length, seed):
    """``count`` random documents of ``length`` tokens over the 60 words."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 64, (length,), generator=g) for _ in range(count)]


def make_batch(rows, tokens_per_sample, pad=1, eos=2, stream_id="test"):
    """A document_lm batch by hand: ``rows`` = [(doc id, doc tokens, segment)] (as DocumentStreamDataset)."""
    sources, targets = [], []
    for _, doc, segment in rows:
        start = segment * tokens_per_sample
        end = min(start + tokens_per_sample, len(doc))
        target = doc[start:end]
        first = doc[start - 1 : start] if start > 0 else torch.tensor([eos])
        sources.append(torch.cat([first, doc[start : end - 1]]))
        targets.append(target)
    src_tokens = data_utils.collate_tokens(sources, pad)
    segments = torch.tensor([segment for _, _, segment in rows])
    return {"net_input": {"src_tokens": src_tokens, "src_lengths": src_tokens.ne(pad).sum(1),
                          "doc_start": segments == 0, "stream_id": stream_id},
            "target": data_utils.collate_tokens(targets, pad),
            "doc_id": torch.tensor([doc_id for doc_id, _, _ in rows]), "segment": segments}


def static_nll(model, sample):
    return StaticScorer(model).score(sample)["vanilla"]


# --------------------------------------------------------------- dynamic evaluation
def test_weights_after_a_document_are_the_checkpoints_at_the_next_documents_start(vocab_dir):
    model, _ = tiny(vocab_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first, second = documents(2, 24, seed=0)
    evaluator = DynamicEvaluator(model, lr=0.05, decay=0.0, optimizer="sgd")
    for segment in range(3):  # the whole first document
        evaluator.score(make_batch([(0, first, segment)], 8))
    adapted = evaluator.weights(0)
    moved = max(float((adapted[name] - p).abs().max()) for name, p in evaluator.original.items())
    assert moved > 1e-3  # it did learn on the first document
    start = make_batch([(1, second, 0)], 8)
    nll = evaluator.score(start)["dyneval"]
    # the next document's first segment is scored by the checkpoint's weights, exactly as without adaptation
    assert torch.allclose(nll, static_nll(model, start), atol=1e-6)
    # and the model's own weights were never written
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # while the document goes on, it adapts again: its second segment differs from the static score
    later = make_batch([(1, second, 1)], 8)
    assert not torch.allclose(evaluator.score(later)["dyneval"], static_nll(model, later), atol=1e-4)


@pytest.mark.parametrize("arch,extra", [("transformer_lm", []), ("memorizing_transformer_lm", MEMORIZING)])
def test_a_streams_adaptation_never_depends_on_another_streams_text(vocab_dir, arch, extra):
    docs = documents(3, 24, seed=1)

    def run(other):
        model, _ = tiny(vocab_dir, arch, extra)
        evaluator = DynamicEvaluator(model, lr=0.05, decay=0.01, optimizer="sgd")
        losses = [evaluator.score(make_batch([(0, docs[0], s), (other, docs[other], s)], 8))["dyneval"]
                  for s in range(3)]
        return torch.stack(losses), evaluator.weights(0), evaluator.weights(1)

    with_b, weights_a, weights_b = run(1)
    with_c, weights_a2, weights_c = run(2)
    assert torch.equal(with_b[:, 0], with_c[:, 0])  # stream 0's losses, bit for bit
    assert all(torch.equal(weights_a[k], weights_a2[k]) for k in weights_a)
    # the other stream did read other text, and learned something else
    assert not torch.equal(with_b[:, 1], with_c[:, 1])
    assert any(not torch.equal(weights_b[k], weights_c[k]) for k in weights_b)


@pytest.mark.parametrize("optimizer", ["rms", "sgd"])
def test_two_steps_by_hand_equal_the_implementations(vocab_dir, optimizer):
    model, _ = tiny(vocab_dir)
    doc = documents(1, 24, seed=2)[0]
    lr, decay, eps = 0.03, 0.4, 1e-3
    names = list(adaptable_parameters(model))
    g = torch.Generator().manual_seed(3)
    rms = {n: torch.exp(torch.randn(p.shape, generator=g)) * 1e-2 for n, p in adaptable_parameters(model).items()}
    evaluator = DynamicEvaluator(model, lr=lr, decay=decay, optimizer=optimizer, rms=rms, eps=eps)

    # by hand, on a copy of the model whose parameters are overwritten step by step
    hand, _ = tiny(vocab_dir)
    theta0 = {n: p.detach().clone() for n, p in adaptable_parameters(hand).items()}
    mean_rms = sum(float(r.mean()) for r in rms.values()) / len(rms)
    expected_nll = []
    for segment in range(2):
        sample = make_batch([(0, doc, segment)], 8)
        hand.zero_grad()
        out = hand(**sample["net_input"])
        lprobs = F.log_softmax(out[0].float(), dim=-1)
        nll = -lprobs.gather(-1, sample["target"].unsqueeze(-1)).squeeze(-1)
        expected_nll.append(nll.detach())
        nll.mean().backward()
        with torch.no_grad():
            for n, p in adaptable_parameters(hand).items():
                if optimizer == "sgd":
                    p += -lr * p.grad + decay * (theta0[n] - p)
                else:
                    rate = torch.clamp(rms[n] / mean_rms, max=1 / decay)
                    p += -lr * p.grad / (rms[n] + eps) + decay * rate * (theta0[n] - p)
        got = evaluator.score(sample)["dyneval"]
        assert torch.allclose(got, expected_nll[-1], atol=1e-5)
    adapted = evaluator.weights(0)
    for n, p in adaptable_parameters(hand).items():
        assert torch.allclose(adapted[n], p, atol=1e-6, rtol=1e-5), n
    assert set(adapted) == set(names)
    assert max(float((adapted[n] - theta0[n]).abs().max()) for n in names) > 1e-3


def test_gradient_rms_is_the_root_mean_square_of_training_gradients(vocab_dir):
    model, _ = tiny(vocab_dir)
    docs = documents(2, 8, seed=4)
    batches = [make_batch([(0, docs[0], 0)], 8), make_batch([(1, docs[1], 0)], 8)]
    rms = gradient_rms(model, iter(batches + batches), max_batches=2)
    squares = {}
    for sample in batches:
        model.zero_grad()
        out = model(**sample["net_input"])
        nll = -F.log_softmax(out[0], -1).gather(-1, sample["target"].unsqueeze(-1))
        nll.mean().backward()
        for n, p in adaptable_parameters(model).items():
            squares[n] = squares.get(n, 0) + p.grad ** 2
    for n, total in squares.items():
        assert torch.allclose(rms[n], (total / 2).sqrt(), atol=1e-7, rtol=1e-5), n


# ------------------------------------------------------------------- neural cache
@pytest.mark.parametrize("k", [64, 3])
def test_cache_probabilities_equal_the_formula_by_hand(vocab_dir, k):
    """One stream, a 20-token document in 8-token segments, a 10-entry cache (the ring
    evicts) and k = 64 (every cached entry) or 3 (the top 3 by h_t . h_i)."""
    model, _ = tiny(vocab_dir)
    doc = documents(1, 20, seed=5)[0]
    lam, theta, size, T = 0.3, 0.7, 10, 8
    cache = NeuralCache(model, 1, [lam], theta, size, k, T)
    got, states, next_tokens = [], [], []
    for segment in range(3):
        sample = make_batch([(0, doc, segment)], T)
        got.append(cache.score(sample)[f"cache lambda={lam:g}"][0])
        with torch.no_grad():
            features, _ = model(sample["net_input"]["src_tokens"], features_only=True)
            lprobs = F.log_softmax(model.decoder.output_layer(features)[0].float(), -1)
        states.append(features[0].float())
        next_tokens.append(sample["target"][0])
        seg_start = segment * T
        for j, target in enumerate(sample["target"][0].tolist()):
            t = seg_start + j
            h = torch.cat(states)  # (t', C): every position scored so far
            y = torch.cat(next_tokens)
            cached = [i for i in range(max(0, seg_start - size), seg_start)]  # what the ring still holds
            if len(cached) > k:
                cached = sorted(cached, key=lambda i: -float(h[t] @ h[i]))[:k]
            entries = cached + list(range(seg_start, t))  # and this segment's earlier positions
            p_model = float(lprobs[j, target].exp())
            if entries:
                weights = torch.tensor([theta * float(h[t] @ h[i]) for i in entries], dtype=torch.float64)
                weights = torch.softmax(weights, 0)
                p_cache = float(sum(w for w, i in zip(weights, entries) if int(y[i]) == target))
                expected = -math.log((1 - lam) * p_model + lam * p_cache)
            else:
                expected = -math.log(p_model)  # a document's first token: no cache
            assert float(got[-1][j]) == pytest.approx(expected, rel=1e-4, abs=1e-5), (segment, j)


def real_streams(data_bin, model, task, scorer, batches=6, tokens_per_sample=16, on_batch=None):
    task.load_dataset("test")
    max_positions = utils.resolve_max_positions(task.max_positions(), model.max_positions())
    return score_streams(scorer, task, "test", 2, tokens_per_sample, max_positions, batches, "none", on_batch)


def test_cache_with_lambda_zero_is_the_vanilla_exactly(prepared_data_bin):
    model, task = tiny(prepared_data_bin, tokens_per_sample=16)
    vanilla = real_streams(prepared_data_bin, model, task, StaticScorer(model))["vanilla"]
    cached = real_streams(prepared_data_bin, model, task, NeuralCache(model, 2, [0.0, 0.5], 1.0, 40, 8, 16))
    exact = cached["cache lambda=0"]
    assert vanilla["loss"].size > 100
    assert np.array_equal(exact["loss"], vanilla["loss"])  # bit for bit, token by token
    assert math.exp(exact["loss"].mean()) == math.exp(vanilla["loss"].mean())
    assert not np.array_equal(cached["cache lambda=0.5"]["loss"], vanilla["loss"])


def test_the_cache_never_holds_the_predicted_position_or_a_later_one(prepared_data_bin):
    """On real documents, with a ring smaller than a document: every entry summed over for a
    token sits strictly before it in the same document, and earlier segments are used."""
    model, task = tiny(prepared_data_bin, tokens_per_sample=16)
    cache = NeuralCache(model, 2, [0.2], 1.0, 40, 8, 16)
    seen = {"entries": 0, "from_memory": 0, "batches": 0}
    original = cache.cache_scores

    def checked(sample):
        result = original(sample)
        valid = result.entry_positions >= 0
        query = result.query_positions.unsqueeze(-1).expand_as(result.entry_positions)
        assert bool((result.entry_positions[valid] < query[valid]).all())
        real = sample["target"].ne(1)
        # a document's first token has nothing cached; every later real token has something
        first = (sample["segment"] == 0).unsqueeze(1) & (torch.arange(real.size(1)) == 0)
        assert not bool(result.has_cache[first].any())
        assert bool(result.has_cache[real & ~first].all())
        segment_start = (sample["segment"].clamp(min=0) * 16).view(-1, 1, 1)
        older = valid & (result.entry_positions < segment_start)
        assert not bool(older[sample["segment"] == 0].any())  # nothing survives a document start
        # only what the 40-entry ring still holds: the last 40 positions before the segment
        assert bool((result.entry_positions >= segment_start - 40)[older].all())
        seen["entries"] += int(valid.sum())
        seen["from_memory"] += int(older.sum())
        seen["batches"] += 1
        return result

    cache.cache_scores = checked
    real_streams(prepared_data_bin, model, task, cache, batches=8)
    assert seen["batches"] == 8 and seen["from_memory"] > 100 and seen["entries"] > seen["from_memory"]


# ------------------------------------------------------------------------ kNN-LM
def test_knnlm_probabilities_equal_the_formula_by_hand(prepared_data_bin, tmp_path):
    """A flat store of 300 train tokens, k = every entry: p_knn by brute force over keys.npy."""
    model, task = tiny(prepared_data_bin, tokens_per_sample=16)
    task.load_dataset("train")
    meta = build_datastore(model, task, "train", tmp_path / "store", 16, 2, max_tokens=300, log_format="none")
    assert meta["entries"] == 300 and meta["index"] == "flat"
    keys = torch.from_numpy(np.load(tmp_path / "store" / "keys.npy").astype(np.float32))
    vals = torch.from_numpy(np.load(tmp_path / "store" / "vals.npy").astype(np.int64))
    lam, temperature = 0.4, 3.0
    knnlm = KNNLM(model, task.target_dictionary, tmp_path / "store", [0.0, lam], k=300, temperature=temperature,
                  eval_subset="test")
    task.load_dataset("test")
    sample = next(iter(task.eval_lm_dataloader(task.dataset("test"), batch_size=2)))
    got = knnlm.score(sample)
    with torch.no_grad():
        features, _ = model(sample["net_input"]["src_tokens"], features_only=True)
        lprobs = F.log_softmax(model.decoder.output_layer(features).float(), -1)
    real = sample["target"].ne(1)
    checked = 0
    for b, t in real.nonzero().tolist():
        target = int(sample["target"][b, t])
        distances = ((keys - features[b, t].float()) ** 2).sum(-1)
        weights = torch.softmax(-distances.double() / temperature, 0)
        p_knn = float(weights[vals == target].sum())
        p_model = float(lprobs[b, t, target].exp())
        expected = -math.log((1 - lam) * p_model + lam * p_knn)
        assert float(got[f"knnlm lambda={lam:g}"][b, t]) == pytest.approx(expected, rel=1e-3, abs=1e-4)
        assert float(got["knnlm lambda=0"][b, t]) == pytest.approx(-math.log(p_model), rel=1e-5)
        checked += 1
    assert checked > 20
    # lambda 0 is the vanilla bit for bit
    assert torch.equal(got["knnlm lambda=0"], static_nll(model, sample))


def test_knnlm_refuses_another_checkpoint_or_the_scored_split(prepared_data_bin, tmp_path):
    model, task = tiny(prepared_data_bin, tokens_per_sample=16)
    task.load_dataset("valid")
    build_datastore(model, task, "valid", tmp_path / "store", 16, 2, max_tokens=50, log_format="none")
    other, _ = tiny(prepared_data_bin, tokens_per_sample=16, seed=2)
    with pytest.raises(MemtrmUserError, match="built from another checkpoint's weights"):
        KNNLM(other, task.target_dictionary, tmp_path / "store", [0.1], eval_subset="test")
    with pytest.raises(MemtrmUserError, match="holds the valid split itself"):
        KNNLM(model, task.target_dictionary, tmp_path / "store", [0.1], eval_subset="valid")
    shuffled = task.target_dictionary.__class__()
    for symbol in reversed(task.target_dictionary.symbols[4:]):
        shuffled.add_symbol(symbol)
    with pytest.raises(MemtrmUserError, match="another vocabulary"):
        KNNLM(model, shuffled, tmp_path / "store", [0.1], eval_subset="test")


# -------------------------------------------------------------------------- CLI
def test_three_way_mixture_equals_the_formula_by_hand():
    p_model = torch.tensor([[0.5, 0.1]])
    p_cache = torch.tensor([[0.2, 0.0]])
    p_knn = torch.tensor([[0.4, 0.9]])
    has_cache = torch.tensor([[True, False]])
    got = mix3(-p_model.log(), p_cache.log(), has_cache, p_knn.log(), 0.2, 0.3)
    expected = torch.tensor([[0.5 * 0.5 + 0.2 * 0.2 + 0.3 * 0.4,  # with a cache: three terms
                              0.7 * 0.1 + 0.3 * 0.9]])  # no cache: its weight is not given to anything else
    assert torch.allclose(got, -expected.log(), atol=1e-6)
    # each two-way mixture is the special case with the other weight at 0
    assert torch.allclose(mix3(-p_model.log(), p_cache.log(), has_cache, p_knn.log(), 0.2, 0.0),
                          mix(-p_model.log(), p_cache.log(), has_cache, 0.2), atol=1e-6)
    assert torch.allclose(mix3(-p_model.log(), p_cache.log(), has_cache, p_knn.log(), 0.0, 0.3),
                          mix(-p_model.log(), p_knn.log(), torch.ones_like(has_cache), 0.3), atol=1e-6)


def test_cache_plus_knnlm_runs_one_forward_and_equals_its_two_scorers(prepared_data_bin, tmp_path):
    """The mixture reads one forward pass per batch; its two parts equal the cache and
    the kNN-LM run on their own (each with its own forward), batch after batch."""
    model, task = tiny(prepared_data_bin, tokens_per_sample=16)
    task.load_dataset("train")
    build_datastore(model, task, "train", tmp_path / "store", 16, 2, max_tokens=200, log_format="none")
    task.load_dataset("test")
    cache_alone = NeuralCache(model, 2, [0.2], theta=0.5, size=64, k=8, tokens_per_sample=16)
    knn_alone = KNNLM(model, task.target_dictionary, tmp_path / "store", [0.3], k=8, eval_subset="test")
    mixed = CacheKNNLM(NeuralCache(model, 2, [0.2], theta=0.5, size=64, k=8, tokens_per_sample=16),
                       KNNLM(model, task.target_dictionary, tmp_path / "store", [0.3], k=8, eval_subset="test"))
    forwards = []
    hook = model.decoder.register_forward_hook(lambda *_: forwards.append(1))
    batches = 0
    try:
        for sample in task.eval_lm_dataloader(task.dataset("test"), batch_size=2):
            forwards.clear()
            got = mixed.score(sample)["cache+knnlm lambda=0.2,0.3"]
            assert len(forwards) == 1
            cached = cache_alone.cache_scores(sample)
            _, knn_logp, _, _ = knn_alone.knn_scores(sample)
            real = sample["target"].ne(1)
            expected = mix3(cached.model_nll, cached.cache_logp, cached.has_cache, knn_logp, 0.2, 0.3)
            torch.testing.assert_close(got, expected.masked_fill(~real, 0.0))
            batches += 1
            if batches == 3:
                break
    finally:
        hook.remove()
    assert batches == 3


@pytest.mark.parametrize("arch,extra", [("transformer_lm", ()), ("memorizing_transformer_lm", MEMORIZING)])
def test_planted_probe_of_a_scorer_equals_the_sweeps_probe(vocab_dir, arch, extra):
    """The probe through the scorer interface (padding rows, document_lm-shaped batches)
    gives the same losses as the sweep's direct probe of the model."""
    model, _ = tiny(vocab_dir, arch, extra)
    g = torch.Generator().manual_seed(3)
    docs = torch.stack([plant_passage(torch.randint(4, 64, (60,), generator=g), torch.randint(4, 64, (6,), generator=g),
                                      5, 30) for _ in range(3)])
    direct = planted_passage_loss(model, docs, 5, 30, 6, tokens_per_sample=8)
    through = planted_passage_losses(StaticScorer(model), docs, 5, 30, 6, tokens_per_sample=8, batch_size=2, pad=1)
    assert set(through) == {"vanilla"}
    for key in ("first_copy_loss", "second_copy_loss"):
        assert through["vanilla"][key] == pytest.approx(direct[key], rel=1e-5)


@pytest.fixture(scope="module")
def checkpoints(prepared_data_bin, tmp_path_factory):
    folder = tmp_path_factory.mktemp("testtime-checkpoints")
    paths = {}
    for arch, extra in (("transformer_lm", []), ("memorizing_transformer_lm", MEMORIZING)):
        cfg, _, model = build(prepared_data_bin, arch, [*TINY, *extra])
        paths[arch] = folder / f"{arch}.pt"
        save_checkpoint(cfg, model, paths[arch])
    return paths


def eval_testtime(*args, check=True):
    return run_command(sys.executable, REPO / "scripts" / "eval_testtime.py", *args, check=check, timeout=300)


def test_cli_runs_every_method_on_real_documents(prepared_data_bin, checkpoints, tmp_path):
    out = tmp_path / "out"
    eval_testtime(prepared_data_bin, "--checkpoint", checkpoints["transformer_lm"], "--methods",
                  "vanilla,dyneval,cache", "--tokens-per-sample", "32", "--batch-size", "2", "--max-batches", "6",
                  "--far-position", "64", "--dyneval-stats-batches", "2", "--dyneval-lr", "1e-5",
                  "--cache-lambda", "0,0.3", "--cache-theta", "0.5", "--cache-size", "100", "--cache-k", "16",
                  "--probe-gap", "70", "--probe-at", "5", "--probe-length", "12",
                  "--cpu", "--log-format", "none", "--out", out)
    report = json.loads((out / "testtime.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == ["vanilla", "dyneval", "cache lambda=0", "cache lambda=0.3"]
    assert len({r["tokens"] for r in runs.values()}) == 1 and runs["vanilla"]["tokens"] > 200
    for row in runs.values():
        assert math.isfinite(row["ppl"]) and row["ppl"] > 1 and row["tokens_per_second"] > 0
        assert row["ppl_past_far_position"] is None or math.isfinite(row["ppl_past_far_position"])
    assert runs["cache lambda=0"]["ppl"] == runs["vanilla"]["ppl"]
    assert runs["cache lambda=0.3"]["ppl"] != runs["vanilla"]["ppl"]
    assert runs["dyneval"]["ppl"] != runs["vanilla"]["ppl"]
    assert runs["vanilla"]["extra_memory_mb"] == 0 and runs["dyneval"]["extra_memory_mb"] > 0
    assert runs["cache lambda=0.3"]["extra_memory_mb"] > 0
    assert runs["dyneval"]["settings"]["stats_batches"] == 2
    table = (out / "testtime.md").read_text()
    assert "| vanilla |" in table and "| cache lambda=0.3 |" in table
    assert (out / "testtime.png").stat().st_size > 5_000
    # the planted passage (70 tokens apart: beyond a 32-token segment) is scored by every run
    assert report["planted_passage"]["gap"] == 70 and report["planted_passage"]["documents"]["random"] >= 1
    assert report["planted_passage"]["documents"]["text"] == report["planted_passage"]["documents"]["random"]
    for row in runs.values():
        assert math.isfinite(row["planted_passage"]["second_copy_loss"])
        assert math.isfinite(row["planted_text"]["second_copy_loss"])
    assert runs["cache lambda=0"]["planted_passage"] == runs["vanilla"]["planted_passage"]
    # the cache finds the first copy: the second is cheaper with it
    assert (runs["cache lambda=0.3"]["planted_passage"]["second_copy_loss"]
            < runs["vanilla"]["planted_passage"]["second_copy_loss"])


def test_cli_shows_its_progress_in_simple_log_format(prepared_data_bin, checkpoints, tmp_path):
    result = eval_testtime(prepared_data_bin, "--checkpoint", checkpoints["transformer_lm"], "--methods", "vanilla",
                           "--tokens-per-sample", "32", "--batch-size", "2", "--max-batches", "10", "--probe-gap", "0",
                           "--cpu", "--log-format", "simple", "--out", tmp_path / "out")
    tokens = re.search(r"test \(10 batches\):\s+10 / \d+ tokens=(\d+)", result.stdout)
    report = json.loads((tmp_path / "out" / "testtime.json").read_text())
    assert tokens and int(tokens.group(1)) == report["runs"][0]["tokens"] > 0


def test_cli_tunes_on_another_split_and_scores_only_the_best(prepared_data_bin, checkpoints, tmp_path):
    out = tmp_path / "out"
    eval_testtime(prepared_data_bin, "--checkpoint", checkpoints["transformer_lm"], "--methods", "vanilla,cache",
                  "--tune-subset", "valid", "--tune-batches", "3", "--cache-theta", "0.01,1", "--cache-lambda",
                  "0,0.2,0.5", "--cache-size", "100", "--cache-k", "16", "--tokens-per-sample", "32",
                  "--batch-size", "2", "--max-batches", "3", "--probe-gap", "0", "--cpu", "--log-format", "none",
                  "--out", out)
    report = json.loads((out / "testtime.json").read_text())
    tuned = report["tuning"]["runs"]
    assert report["tuning"]["subset"] == "valid" and len(tuned) == 6  # 2 thetas x 3 lambdas; vanilla has no grid
    best = min(tuned, key=lambda r: r["ppl"])
    assert report["tuning"]["chosen"]["cache"] == best["settings"]
    scored = [r for r in report["runs"] if r["method"] == "cache"]
    assert len(scored) == 1 and scored[0]["subset"] == "test"
    assert scored[0]["settings"]["theta"] == best["settings"]["theta"]
    assert scored[0]["settings"]["lambda"] == best["settings"]["lambda"]
    assert "planted_passage" not in scored[0] and report["planted_passage"] is None
    assert "tuned on valid" in (out / "testtime.md").read_text()
    refused = eval_testtime(prepared_data_bin, "--checkpoint", checkpoints["transformer_lm"], "--tune-subset", "test",
                            "--out", out, check=False)
    assert refused.returncode == 2 and "--tune-subset must be another split" in refused.stderr


def test_cli_dynamic_evaluation_of_a_memorizing_checkpoint(prepared_data_bin, checkpoints, tmp_path):
    """The combination: a memorizing model keeps one memory per stream while it adapts."""
    out = tmp_path / "out"
    eval_testtime(prepared_data_bin, "--checkpoint", checkpoints["memorizing_transformer_lm"], "--methods",
                  "vanilla,dyneval", "--dyneval-optimizer", "sgd", "--dyneval-lr", "0.01", "--tokens-per-sample",
                  "32", "--batch-size", "2", "--max-batches", "4", "--cpu", "--log-format", "none", "--out", out)
    runs = {r["name"]: r for r in json.loads((out / "testtime.json").read_text())["runs"]}
    assert runs["vanilla"]["model_memory_size"] == 64 and runs["vanilla"]["tokens"] == runs["dyneval"]["tokens"]
    assert math.isfinite(runs["dyneval"]["ppl"]) and runs["dyneval"]["ppl"] != runs["vanilla"]["ppl"]


@pytest.mark.parametrize("flags,message", [
    (["--methods", "vanilla,knnlm2"], "--methods: unknown ['knnlm2']"),
    (["--cache-lambda", "1.5"], "--cache-lambda takes values in [0, 1)"),
    (["--dyneval-decay", "2"], "--dyneval-decay must be at most 1"),
    (["--probe-passages", "random,words"], "--probe-passages takes random, text; got words"),
])
def test_cli_bad_input_is_one_sentence_and_exit_2(prepared_data_bin, checkpoints, tmp_path, flags, message):
    methods = [] if "--methods" in flags else ["--methods", "cache" if "--cache-lambda" in flags else "dyneval"]
    result = eval_testtime(prepared_data_bin, "--checkpoint", checkpoints["transformer_lm"], *methods, *flags,
                           "--dyneval-optimizer", "sgd", "--tokens-per-sample", "32", "--batch-size", "2",
                           "--max-batches", "1", "--cpu", "--log-format", "none", "--out", tmp_path, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_cli_missing_checkpoint_is_one_sentence(prepared_data_bin, tmp_path):
    result = eval_testtime(prepared_data_bin, "--checkpoint", tmp_path / "none.pt", "--out", tmp_path, check=False)
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr


def test_cli_knnlm_builds_a_store_and_scores_with_it(prepared_data_bin, checkpoints, tmp_path):
    store, out = tmp_path / "store", tmp_path / "out"
    result = run_command(sys.executable, REPO / "scripts" / "build_datastore.py", prepared_data_bin, "--checkpoint",
                         checkpoints["transformer_lm"], "--out", store, "--tokens-per-sample", "32", "--batch-size",
                         "2", "--max-tokens", "2000", "--cpu", "--log-format", "simple", "--log-interval", "10",
                         timeout=300)
    log = result.stdout + result.stderr
    meta = json.loads((store / "meta.json").read_text())
    assert meta["entries"] == 2000 and meta["index"] == "flat"
    assert f"2000 entries x {meta['dim']} dims, flat index" in log and "on disk" in log
    # progress while the model reads the split, then while the index is filled
    assert re.search(r"datastore train:\s+10 / \d+ entries=\d+", log) and "2000 of 2000 entries indexed" in log
    eval_testtime(prepared_data_bin, "--checkpoint", checkpoints["transformer_lm"], "--methods", "vanilla,knnlm",
                  "--datastore", store, "--knnlm-lambda", "0,0.3", "--knnlm-k", "8", "--knnlm-temperature", "10",
                  "--tokens-per-sample", "32", "--batch-size", "2", "--max-batches", "4", "--cpu",
                  "--log-format", "none", "--out", out)
    runs = {r["name"]: r for r in json.loads((out / "testtime.json").read_text())["runs"]}
    assert runs["knnlm lambda=0"]["ppl"] == runs["vanilla"]["ppl"]
    # the cache and kNN-LM together: the pair (0, 0) is the vanilla, (0, 0.3) the kNN-LM alone
    both = tmp_path / "both"
    eval_testtime(prepared_data_bin, "--checkpoint", checkpoints["transformer_lm"], "--methods", "cache+knnlm",
                  "--datastore", store, "--knnlm-lambda", "0,0.3", "--knnlm-k", "8", "--knnlm-temperature", "10",
                  "--cache-lambda", "0,0.2", "--cache-theta", "0.5", "--cache-size", "100", "--cache-k", "16",
                  "--tokens-per-sample", "32", "--batch-size", "2", "--max-batches", "4", "--cpu",
                  "--log-format", "none", "--out", both)
    mixed = {r["name"]: r for r in json.loads((both / "testtime.json").read_text())["runs"]}
    assert list(mixed) == [f"cache+knnlm lambda={c},{k}" for c in ("0", "0.2") for k in ("0", "0.3")]
    assert mixed["cache+knnlm lambda=0,0"]["ppl"] == pytest.approx(runs["vanilla"]["ppl"], rel=1e-6)
    assert mixed["cache+knnlm lambda=0,0.3"]["ppl"] == pytest.approx(runs["knnlm lambda=0.3"]["ppl"], rel=1e-6)
    assert mixed["cache+knnlm lambda=0.2,0.3"]["ppl"] != mixed["cache+knnlm lambda=0,0.3"]["ppl"]
    assert math.isfinite(runs["knnlm lambda=0.3"]["ppl"]) and runs["knnlm lambda=0.3"]["ppl"] != runs["vanilla"]["ppl"]
    assert runs["knnlm lambda=0.3"]["extra_memory_mb"] > 0
    # the memorizing checkpoint's hidden states are not those in the store: one sentence, exit 2
    refused = eval_testtime(prepared_data_bin, "--checkpoint", checkpoints["memorizing_transformer_lm"], "--methods",
                            "knnlm", "--datastore", store, "--tokens-per-sample", "32", "--batch-size", "2",
                            "--max-batches", "1", "--cpu", "--log-format", "none", "--out", out, check=False)
    assert refused.returncode == 2 and "built from another checkpoint's weights" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_build_datastore_log_interval_below_one_is_one_sentence(tmp_path):
    result = run_command(sys.executable, REPO / "scripts" / "build_datastore.py", tmp_path, "--checkpoint",
                         tmp_path / "none.pt", "--out", tmp_path / "store", "--log-interval", "0", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("--log-interval must be at least 1")
