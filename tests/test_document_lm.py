"""The document_lm task as a specification: documents are read in order, one
stream per batch row, every token is a target exactly once, ``doc_start``
marks exactly the document starts, streams are balanced and sharded, and the
kNN memory never carries anything across documents or from train to valid."""

from pathlib import Path

import numpy as np
import pytest
import torch
from fairseq import options, tasks
from fairseq.data import ListDataset
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from fairseq_memtrm.data import DocumentDataset, DocumentStreamDataset, assign_streams
from fairseq_memtrm.errors import MemtrmUserError
from fairseq_memtrm.memory import MemoryBank

from lm_builders import PLUGIN, write_dictionary

PAD, EOS = 1, 2
TINY_MEMORIZING = [
    "--arch", "memorizing_transformer_lm", "--decoder-layers", "2", "--decoder-embed-dim", "32",
    "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "4", "--dropout", "0",
    "--attention-dropout", "0", "--memory-layers", "1", "--knn-k", "8", "--memory-size", "512",
]


def documents_from_lines(line_lists, split="train"):
    """A DocumentDataset over lines (each a list of ints ending with EOS); ``None``
    is an empty line. Returns (dataset, list of document token tensors)."""
    lines, docs, current = [], [], []
    for line in line_lists:
        if line is None:
            lines.append(torch.tensor([EOS]))
            if current:
                docs.append(torch.tensor(current))
            current = []
        else:
            lines.append(torch.tensor(line))
            current.extend(line)
    if current:
        docs.append(torch.tensor(current))
    sizes = np.array([len(line) for line in lines])
    return DocumentDataset(ListDataset(lines, sizes), split), docs


def synthetic_documents(doc_lengths, split="train", line_length=7, seed=0):
    """Documents of the given lengths; every token value is unique, so a token
    names its (document, position). Extra separators test document detection."""
    rng = np.random.RandomState(seed)
    line_lists, next_token = [None], 10  # a leading separator is no document
    for n in doc_lengths:
        assert n >= 2
        remaining = n
        while remaining:
            size = remaining if remaining <= line_length + 1 else int(rng.randint(2, line_length + 1))
            line_lists.append(list(range(next_token, next_token + size - 1)) + [EOS])
            next_token += size - 1
            remaining -= size
        line_lists += [None] * int(rng.randint(1, 3))  # double separators: no empty document
    return documents_from_lines(line_lists, split)


def read_shards(documents, tokens_per_sample, batch_size, num_shards, shuffle=False, epoch=1, seed=7):
    shards = []
    for shard_id in range(num_shards):
        streams = DocumentStreamDataset(documents, tokens_per_sample, batch_size, PAD, EOS, shuffle=shuffle,
                                        seed=seed, num_shards=num_shards, shard_id=shard_id)
        streams.set_epoch(epoch)
        shards.append([streams[i] for i in range(len(streams))])
    return shards


@pytest.mark.parametrize("tokens_per_sample,batch_size,num_shards,shuffle", [
    (8, 1, 1, False), (8, 3, 1, True), (5, 2, 2, False), (16, 2, 3, True), (4, 4, 2, True),
])
def test_every_token_once_in_order_with_doc_start_at_starts(tokens_per_sample, batch_size, num_shards, shuffle):
    lengths = [2, 3, 8, 9, 17, 40, 41, 64, 5, 33, 12]
    documents, docs = synthetic_documents(lengths)
    assert [len(d) for d in docs] == lengths and documents.sizes.tolist() == lengths
    shards = read_shards(documents, tokens_per_sample, batch_size, num_shards, shuffle)
    assert len({len(batches) for batches in shards}) == 1, "every rank must get as many batches"

    seen_tokens = []
    for batches in shards:
        for row in range(batch_size):
            reading = []  # (doc, segment) in the order this stream reads them
            for batch in batches:
                doc, segment = int(batch["doc_id"][row]), int(batch["segment"][row])
                source = batch["net_input"]["src_tokens"][row]
                target = batch["target"][row]
                assert bool(batch["net_input"]["doc_start"][row]) == (segment <= 0)
                assert batch["net_input"]["stream_id"] == "train"
                if doc < 0:  # exhausted stream: nothing to score, attention stays finite
                    assert target.eq(PAD).all() and source[0] == EOS and source[1:].eq(PAD).all()
                    reading.append(None)
                    continue
                start = segment * tokens_per_sample
                expected = docs[doc][start : start + tokens_per_sample]
                real = target.ne(PAD)
                assert torch.equal(target[real], expected), "target = the segment's tokens"
                assert not real[real.sum():].any(), "padding only at the right end"
                previous = EOS if segment == 0 else int(docs[doc][start - 1])
                assert torch.equal(source[real], torch.cat([torch.tensor([previous]), expected[:-1]]))
                assert int(batch["net_input"]["src_lengths"][row]) == int(real.sum())
                reading.append((doc, segment))
                seen_tokens.append(expected)
            # A stream reads whole documents, segment after segment, then runs empty.
            used = [r for r in reading if r is not None]
            assert reading[: len(used)] == used
            for (doc, segment), (next_doc, next_segment) in zip(used, used[1:]):
                if next_doc == doc:
                    assert next_segment == segment + 1
                else:
                    assert next_segment == 0 and segment == -(-lengths[doc] // tokens_per_sample) - 1
    all_seen = torch.cat(seen_tokens)
    all_tokens = torch.cat(docs)
    # Unique token values: every token appears exactly once, separators never.
    assert all_seen.numel() == all_tokens.numel() == documents.total_tokens()
    content = all_tokens[all_tokens != EOS]
    assert torch.equal(torch.sort(all_seen[all_seen != EOS]).values, torch.sort(content).values)


def test_separator_lines_make_no_document_and_no_token():
    documents, docs = documents_from_lines([None, None, [5, 6, EOS], [7, EOS], None, None, [8, EOS], None])
    assert len(documents) == 2 and documents.num_separators == 5
    assert documents[0].tolist() == [5, 6, EOS, 7, EOS] and documents[1].tolist() == [8, EOS]
    assert documents.tokens(0, 1, 4).tolist() == [6, EOS, 7]
    with pytest.raises(MemtrmUserError, match="no document"):
        documents_from_lines([None, None])


@pytest.mark.parametrize("num_streams", [1, 2, 5, 8])
def test_streams_are_balanced_within_the_longest_document(num_streams):
    rng = np.random.RandomState(num_streams)
    doc_segments = rng.randint(1, 60, size=37)
    for order in (np.arange(37), rng.permutation(37)):
        streams = assign_streams(doc_segments, num_streams, order)
        assert sorted(d for s in streams for d in s) == list(range(37))
        loads = [int(doc_segments[s].sum()) for s in streams]
        assert max(loads) - min(loads) <= doc_segments.max()


def test_train_shuffles_per_epoch_from_the_seed_and_valid_never():
    documents, _ = synthetic_documents([9, 30, 12, 18, 25, 7, 40, 16, 22])

    def reading(epoch, shuffle, seed=7):
        streams = DocumentStreamDataset(documents, 4, 3, PAD, EOS, shuffle=shuffle, seed=seed)
        return [list(map(int, s)) for s in streams.layout(epoch).streams]

    assert reading(1, True) == reading(1, True), "same seed and epoch: same streams"
    assert reading(1, True) != reading(2, True) or reading(2, True) != reading(3, True)
    assert reading(1, True) != reading(1, True, seed=8) or reading(2, True) != reading(2, True, seed=8)
    assert reading(1, False) == reading(2, False) == reading(5, False)


def build_task(data_dir, *extra):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [str(data_dir), "--user-dir", PLUGIN, "--task", "document_lm", "--cpu", *extra])
    cfg = convert_namespace_to_omegaconf(args)
    return tasks.setup_task(cfg.task), cfg


@pytest.fixture(scope="module")
def dict_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("dict")
    write_dictionary(directory, num_symbols=60)
    return directory


def summary(batch):
    return (batch["net_input"]["src_tokens"].tolist(), batch["doc_id"].tolist(),
            batch["net_input"]["doc_start"].tolist())


def test_resume_mid_epoch_continues_with_the_next_batch_of_the_same_streams(dict_dir):
    task, _ = build_task(dict_dir, "--arch", "transformer_lm", "--tokens-per-sample", "4", "--batch-size", "2")
    documents, _ = synthetic_documents([9, 30, 12, 18, 25, 7, 40, 16])
    task.datasets["train"] = documents

    uninterrupted = task.get_batch_iterator(documents, seed=5, epoch=1)
    list(uninterrupted.next_epoch_itr())
    epoch2 = [summary(b) for b in uninterrupted.next_epoch_itr()]

    interrupted = task.get_batch_iterator(documents, seed=5, epoch=1)
    list(interrupted.next_epoch_itr())
    itr = interrupted.next_epoch_itr()
    for _ in range(3):
        next(itr)
    state = interrupted.state_dict()  # what checkpoint_last.pt holds
    assert state["epoch"] == 2 and state["iterations_in_epoch"] == 3

    resumed = task.get_batch_iterator(documents, seed=5, epoch=state["epoch"])
    resumed.load_state_dict(state)
    rest = [summary(b) for b in resumed.next_epoch_itr()]
    assert rest == epoch2[3:]


def test_each_rank_gets_its_own_streams_and_as_many_batches(dict_dir):
    """What the trainer asks for under data parallel: num_shards = world size, shard_id = rank."""
    task, _ = build_task(dict_dir, "--arch", "transformer_lm", "--tokens-per-sample", "4", "--batch-size", "2")
    documents, _ = synthetic_documents([9, 30, 12, 18, 25, 7, 40, 16, 3])
    docs_per_rank, batches_per_rank = [], []
    for rank in range(2):
        batches = list(task.get_batch_iterator(documents, num_shards=2, shard_id=rank, seed=3).next_epoch_itr())
        batches_per_rank.append(len(batches))
        docs_per_rank.append({int(d) for b in batches for d in b["doc_id"] if d >= 0})
        assert all(b["id"].tolist() == [2 * rank, 2 * rank + 1] for b in batches)
    assert batches_per_rank[0] == batches_per_rank[1]
    assert not docs_per_rank[0] & docs_per_rank[1] and docs_per_rank[0] | docs_per_rank[1] == set(range(9))


def test_eval_lm_dataloader_scores_every_token_once_and_rejects_context_window(dict_dir):
    task, _ = build_task(dict_dir, "--arch", "transformer_lm", "--tokens-per-sample", "8", "--batch-size", "3")
    documents, docs = synthetic_documents([9, 30, 12, 18, 25, 7, 40, 16], split="test")
    batches = list(task.eval_lm_dataloader(documents, batch_size=3))
    assert all(b["net_input"]["stream_id"] == "test" for b in batches)
    scored = sum(int(b["target"].ne(PAD).sum()) for b in batches)
    assert scored == sum(b["ntokens"] for b in batches) == sum(len(d) for d in docs)
    with pytest.raises(MemtrmUserError, match="--context-window"):
        task.eval_lm_dataloader(documents, batch_size=3, context_window=4)


def test_missing_batch_size_and_missing_split_are_clear_errors(dict_dir, tmp_path):
    with pytest.raises(MemtrmUserError, match="--batch-size"):
        build_task(dict_dir, "--arch", "transformer_lm", "--tokens-per-sample", "8")
    task, _ = build_task(dict_dir, "--arch", "transformer_lm", "--batch-size", "2")
    with pytest.raises(MemtrmUserError, match="prepare_data.py"):
        task.load_dataset("valid")
    with pytest.raises(MemtrmUserError, match="dict.txt"):
        build_task(tmp_path, "--arch", "transformer_lm", "--batch-size", "2")


def test_vanilla_transformer_lm_ignores_the_stream_keys(dict_dir):
    task, cfg = build_task(dict_dir, "--arch", "transformer_lm", "--decoder-layers", "1",
                           "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
                           "--decoder-attention-heads", "2", "--tokens-per-sample", "8", "--batch-size", "2")
    model = task.build_model(cfg.model).eval()
    tokens = torch.randint(4, 60, (2, 8))
    with torch.no_grad():
        plain = model(tokens)[0]
        with_streams = model(tokens, src_lengths=torch.tensor([8, 8]), doc_start=torch.tensor([True, False]),
                             stream_id="valid")[0]
    assert torch.equal(plain, with_streams)


# ------------------------------------------------------------------ memory
def planted_documents(tokens_per_sample, seed=0):
    """Three single-line documents sharing one rare block of ``tokens_per_sample``
    tokens. With 2 streams: stream 0 reads A (6 segments); stream 1 reads C (4)
    then B (3), so B follows C in the same row. Token ids lie in [4, 60)."""
    g = torch.Generator().manual_seed(seed)
    rare = torch.randint(4, 60, (tokens_per_sample,), generator=g)

    def document(num_segments, planted_segment):
        tokens = torch.randint(4, 60, (num_segments * tokens_per_sample - 1,), generator=g)
        start = planted_segment * tokens_per_sample
        tokens[start : start + tokens_per_sample] = rare
        return tokens.tolist() + [EOS]

    lines = [document(6, 4), None, document(3, 1), None, document(4, 2)]  # A, B, C
    return documents_from_lines(lines, split="valid")


def retrieval_positions(model, streams, keep_doc_start=True):
    """Per (batch, row) with a document: (doc, segment, retrieved positions) of every memory layer."""
    found = []
    model.memory_bank.clear()
    for index in range(len(streams)):
        batch = streams[index]
        net_input = dict(batch["net_input"], record_retrievals=True)
        if not keep_doc_start:  # the control: never reset after the first batch
            net_input["doc_start"] = torch.full_like(net_input["doc_start"], index == 0)
        with torch.no_grad():
            _, extra = model(**net_input)
        for layer in model.memory_layer_ids:
            record = extra["retrievals"].get(layer)
            for row in range(len(batch["doc_id"])):
                doc, segment = int(batch["doc_id"][row]), int(batch["segment"][row])
                if doc < 0:
                    continue
                if record is None:
                    positions = torch.empty(0, dtype=torch.long)
                else:
                    positions = record.retrieval.positions[row][record.retrieval.mask[row]]
                found.append((doc, segment, positions))
    return found


def test_memory_resets_at_doc_start_and_never_retrieves_another_document(dict_dir):
    tokens_per_sample = 16
    task, cfg = build_task(dict_dir, *TINY_MEMORIZING, "--tokens-per-sample", str(tokens_per_sample),
                           "--batch-size", "2")
    torch.manual_seed(0)
    model = task.build_model(cfg.model).eval()
    documents, docs = planted_documents(tokens_per_sample)
    streams = DocumentStreamDataset(documents, tokens_per_sample, 2, PAD, EOS)
    assert [list(map(int, s)) for s in streams.layout().streams] == [[0], [2, 1]], "B must follow C in a row"

    found = retrieval_positions(model, streams)
    for doc, segment, positions in found:
        # Positions count from the document's start: anything at or past this
        # segment's start would come from another document (or this segment).
        assert (positions >= 0).all() and (positions < segment * tokens_per_sample).all(), (doc, segment)
        if segment == 0:
            assert positions.numel() == 0, "a document starts with an empty memory"
    planted_in_b = [p for doc, segment, p in found if doc == 1 and segment == 1]
    assert planted_in_b and planted_in_b[0].numel() > 0, "B's planted segment must retrieve (from B only)"

    # Control: without the per-row reset, B's rows retrieve C's entries, and the check above would fail.
    leaked = [(doc, segment) for doc, segment, positions in retrieval_positions(model, streams, keep_doc_start=False)
              if (positions >= segment * tokens_per_sample).any()]
    assert (1, 1) in leaked


def test_validation_during_fairseq_train_neither_reads_nor_clobbers_train_memory(prepared_data_bin, monkeypatch):
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli import train

    calls = []
    original_select = MemoryBank.select

    def snapshot(bank, stream_set):
        return [(m.written.clone(), None if m.keys is None else m.keys.clone()) for m in bank.memories(stream_set)]

    def spy(bank, stream_set, num_streams, doc_start, device):
        train_before = snapshot(bank, "train")
        memories = original_select(bank, stream_set, num_streams, doc_start, device)
        calls.append((stream_set, doc_start.clone(), train_before, {id(m) for m in memories.values()}))
        return memories

    monkeypatch.setattr(MemoryBank, "select", spy)
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(prepared_data_bin), "--user-dir", PLUGIN, "--task", "document_lm", *TINY_MEMORIZING,
        "--tokens-per-sample", "32", "--batch-size", "2", "--optimizer", "adam", "--lr", "1e-3", "--cpu",
        "--max-update", "4", "--validate-interval-updates", "2", "--max-valid-steps", "3", "--no-save",
        "--log-interval", "1", "--no-progress-bar", "--seed", "2",
    ])
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), train.main)

    sets = [c[0] for c in calls]
    first_valid = sets.index("valid")
    resumed_train = next(i for i in range(first_valid, len(calls)) if sets[i] == "train")
    assert sets[:first_valid] == ["train"] * first_valid and first_valid == 2
    train_ids = calls[0][3]
    for stream_set, _, _, ids in calls[first_valid:resumed_train]:
        assert stream_set == "valid" and not ids & train_ids, "validation got the train streams' memory"
    before, after = calls[first_valid][2], calls[resumed_train][2]
    assert before and all(int(w.sum()) > 0 for w, _ in before), "the train memory must hold something"
    for (written_before, keys_before), (written_after, keys_after) in zip(before, after):
        assert torch.equal(written_before, written_after) and torch.equal(keys_before, keys_after)
    assert not calls[resumed_train][1].all(), "training resumes mid-document after validation"
    assert calls[resumed_train][3] == train_ids
