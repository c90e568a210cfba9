"""Distant repeats (``document_lm --distant-repeat-prob``): a replaced span copies
exactly what the stream showed at least min_distance tokens earlier in the same
document, the stream stays a stream (each source is its target shifted by one),
only the train split changes, and the same (seed, epoch) gives the same data."""

import torch
import pytest

from fairseq_memtrm.data import DistantRepeats, DocumentStreamDataset
from fairseq_memtrm.errors import MemtrmUserError

from lm_builders import BIN, PLUGIN, run_command
from test_document_lm import EOS, PAD, build_task, dict_dir, synthetic_documents  # noqa: F401

LENGTHS = [300, 41, 170, 95, 260, 12, 133]


def read_streams(documents, tokens_per_sample, repeats, batch_size=3, epoch=1, seed=4):
    """Per document: (the concatenated targets it was shown, the concatenated sources)."""
    streams = DocumentStreamDataset(documents, tokens_per_sample, batch_size, PAD, EOS, shuffle=True, seed=seed,
                                    distant_repeats=repeats)
    streams.set_epoch(epoch)
    targets, sources = {}, {}
    for i in range(len(streams)):
        batch = streams[i]
        for row, doc in enumerate(batch["doc_id"].tolist()):
            if doc < 0:
                continue
            keep = batch["target"][row].ne(PAD)
            targets.setdefault(doc, []).append(batch["target"][row][keep])
            sources.setdefault(doc, []).append(batch["net_input"]["src_tokens"][row][keep])
    return ({d: torch.cat(t) for d, t in targets.items()}, {d: torch.cat(s) for d, s in sources.items()})


@pytest.mark.parametrize("tokens_per_sample,min_distance,max_distance", [
    (16, 16, None), (10, 25, None), (32, 0, None), (16, 16, 60)])
def test_a_replaced_span_copies_what_the_stream_showed_far_enough_back(tokens_per_sample, min_distance, max_distance):
    documents, docs = synthetic_documents(LENGTHS)  # every original token is unique
    repeats = DistantRepeats(prob=1.0, min_len=3, max_len=9, min_distance=min_distance, max_distance=max_distance,
                             seed=2)
    shown, sources = read_streams(documents, tokens_per_sample, repeats)
    copies = 0
    for doc, original in enumerate(docs):
        text = shown[doc]
        assert len(text) == len(original)
        # the stream is a stream: source = </s>, then the shown targets shifted by one
        assert torch.equal(sources[doc], torch.cat([torch.tensor([EOS]), text[:-1]]))
        changed = (text != original).nonzero().flatten().tolist()
        for segment in range(-(-len(original) // tokens_per_sample)):
            plan = repeats.plan(doc, segment, tokens_per_sample, len(original), epoch=1)
            if plan is None:
                continue
            position, origin, length = plan
            copies += 1
            assert origin + length + min_distance <= position
            assert max_distance is None or position - origin <= max_distance
            assert position // tokens_per_sample == (position + length - 1) // tokens_per_sample == segment
            assert position + length < min(len(original), (segment + 1) * tokens_per_sample)  # last token kept
            assert torch.equal(text[position : position + length], text[origin : origin + length])
            assert torch.equal(text[origin : origin + length], original[origin : origin + length])
        # nothing else changed: every changed position lies in a planned copy
        planned = {p for s in range(-(-len(original) // tokens_per_sample))
                   for plan in [repeats.plan(doc, s, tokens_per_sample, len(original), epoch=1)] if plan
                   for p in range(plan[0], plan[0] + plan[2])}
        assert set(changed) <= planned
    assert copies >= 10


def test_first_segments_and_documents_too_short_are_left_alone():
    documents, docs = synthetic_documents([20, 5, 7])
    repeats = DistantRepeats(prob=1.0, min_len=2, max_len=4, min_distance=8)
    shown, _ = read_streams(documents, 8, repeats)
    assert torch.equal(shown[0][:8], docs[0][:8])
    assert torch.equal(shown[1], docs[1]) and torch.equal(shown[2], docs[2])


def test_the_probability_is_the_share_of_segments_with_a_copy():
    repeats = DistantRepeats(prob=0.3, min_len=4, max_len=8, min_distance=64)
    planned = [repeats.plan(0, s, 64, 64 * 500, epoch=1) is not None for s in range(1, 500)]
    assert abs(sum(planned) / len(planned) - 0.3) < 0.07


def test_same_seed_and_epoch_same_data_and_another_epoch_other_copies():
    documents, _ = synthetic_documents(LENGTHS)
    repeats = DistantRepeats(prob=0.5, min_len=3, max_len=9, min_distance=16, seed=9)
    first, _ = read_streams(documents, 16, repeats)
    again, _ = read_streams(documents, 16, DistantRepeats(prob=0.5, min_len=3, max_len=9, min_distance=16, seed=9))
    other, _ = read_streams(documents, 16, repeats, epoch=2)
    assert all(torch.equal(first[d], again[d]) for d in first)
    assert any(not torch.equal(first[d], other[d]) for d in first)


def test_the_task_changes_only_the_train_split(dict_dir):  # noqa: F811
    task, _ = build_task(dict_dir, "--arch", "transformer_lm", "--tokens-per-sample", "16", "--batch-size", "2",
                         "--distant-repeat-prob", "1", "--distant-repeat-min-len", "3",
                         "--distant-repeat-max-len", "6")
    assert task.distant_repeats.min_distance == 16  # the default: one segment
    for split in ("train", "valid"):
        documents, docs = synthetic_documents(LENGTHS, split=split)
        batches = list(task.get_batch_iterator(documents, seed=1).next_epoch_itr())
        tokens = sorted(int(t) for b in batches for t in b["target"].flatten() if t != PAD)
        originals = sorted(int(t) for d in docs for t in d)
        assert (tokens == originals) == (split == "valid")


@pytest.mark.parametrize("flags,message", [
    (["--distant-repeat-prob", "1.5"], "must lie in \\[0, 1\\]"),
    (["--distant-repeat-prob", "-0.1"], "must lie in \\[0, 1\\]"),
    (["--distant-repeat-prob", "0.5", "--distant-repeat-min-len", "9", "--distant-repeat-max-len", "4"],
     "need 2 <= min <= max"),
    (["--distant-repeat-prob", "0.5", "--distant-repeat-min-distance", "-1"], "must be >= 0"),
    (["--distant-repeat-prob", "0.5", "--distant-repeat-max-distance", "100"], "at least .* = 576"),
])
def test_bad_options_are_clear_errors(dict_dir, flags, message):  # noqa: F811
    with pytest.raises(MemtrmUserError, match=message):
        build_task(dict_dir, "--arch", "transformer_lm", "--batch-size", "2", *flags)


def test_fairseq_train_reads_distant_repeats_and_names_a_bad_flag_in_one_sentence(prepared_data_bin, tmp_path):
    common = ["--user-dir", PLUGIN, "--task", "document_lm", "--tokens-per-sample", "64", "--batch-size", "2",
              "--optimizer", "adam", "--lr", "1e-3", "--cpu", "--max-update", "3", "--disable-validation",
              "--save-dir", tmp_path / "ckpt", "--no-save"]
    run_command(BIN / "fairseq-train", prepared_data_bin, *common, "--arch", "memorizing_transformer_lm_tiny",
                "--memory-size", "256", "--distant-repeat-prob", "1", "--distant-repeat-max-distance", "1000",
                "--stream-log", tmp_path / "log")
    assert len((tmp_path / "log.rank0.jsonl").read_text().splitlines()) == 3
    result = run_command(BIN / "fairseq-train", prepared_data_bin, *common, "--arch", "transformer_lm",
                         "--distant-repeat-prob", "2", check=False)
    assert result.returncode != 0 and "--distant-repeat-prob must lie in [0, 1]" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
