"""The recency benefit during training (fairseq_memtrm/recency.py, scripts/recency_benefit.py):
the same segments in both orders, the same initial weights, the measure equal to its
definition computed by hand, and the CLI on real documents."""

import json
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lm_builders import REPO, TINY, run_command

from fairseq_memtrm.recency import (collate, next_segment, row_losses, shuffled, train_and_measure,
                                    training_segments, unrelated_segments)



@pytest.fixture(scope="module")
def setup(prepared_data_bin):
    import importlib.util

    spec = importlib.util.spec_from_file_location("recency_benefit", REPO / "scripts" / "recency_benefit.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args([str(prepared_data_bin), "--out", "unused", "--updates", "6", "--tokens-per-sample",
                              "32", "--batch-size", "2", "--", "--arch", "transformer_lm", *TINY])
    return script, args


def test_both_orders_hold_the_same_segments_from_the_same_weights(setup):
    script, args = setup
    model_a, task = script.build(args)
    model_b, _ = script.build(args)
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name
    streams = script.streams_of(task, "train", args, shuffle=True)
    batches = training_segments(streams, 6)
    mixed = shuffled(batches, seed=1)
    assert len(mixed) == len(batches) and all(len(b) == 2 for b in mixed)
    assert Counter(s for b in batches for s in b if s) == Counter(s for b in mixed for s in b if s)
    assert mixed != batches  # really permuted
    # document order: each row's next batch is its next segment while the document lasts
    for this, following in zip(batches, batches[1:]):
        for row, after in zip(this, following):
            if next_segment(streams, row) is not None:
                assert after == next_segment(streams, row)


def test_unrelated_segments_come_from_documents_outside_the_batch(setup):
    script, args = setup
    _, task = script.build(args)
    streams = script.streams_of(task, "train", args, shuffle=True)
    generator = np.random.default_rng(0)
    for rows in training_segments(streams, 6):
        busy = {row[0] for row in rows if row}
        for doc, segment in unrelated_segments(streams, rows, generator):
            assert doc not in busy and 0 <= segment < streams.doc_segments[doc]


def test_the_measure_equals_its_definition_by_hand(setup):
    script, args = setup
    model, task = script.build(args)
    streams = script.streams_of(task, "train", args, shuffle=True)
    batches = training_segments(streams, 2)
    reference, _ = script.build(args)  # the same weights, trained by hand below
    result = train_and_measure(model, streams, batches[:1], torch.optim.SGD(model.parameters(), lr=0.5),
                               lambda update: 0.5, measure_every=1, seed=7, log_every=0)
    measure = result["measures"][0]
    rows = batches[0]
    a2 = collate(streams, [next_segment(streams, r) for r in rows])
    u = collate(streams, unrelated_segments(streams, rows, np.random.default_rng(7)))
    reference.eval()
    with torch.no_grad():
        a2_before, u_before = row_losses(reference, *a2, streams.pad), row_losses(reference, *u, streams.pad)
    source, target = collate(streams, rows)
    reference.train()
    loss = F.cross_entropy(reference(source)[0].float().transpose(1, 2), target, ignore_index=streams.pad)
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.5 * p.grad
    reference.eval()
    with torch.no_grad():
        a2_after, u_after = row_losses(reference, *a2, streams.pad), row_losses(reference, *u, streams.pad)
    assert np.allclose(measure["a2_before"], a2_before.tolist(), equal_nan=True)
    assert np.allclose(measure["a2_after"], a2_after.tolist(), atol=1e-5, equal_nan=True)
    assert np.allclose(measure["u_after"], u_after.tolist(), atol=1e-5)
    real = ~torch.isnan(a2_before)
    expected = ((a2_before - a2_after) - (u_before - u_after))[real].mean().item()
    assert result["benefit"][0] == pytest.approx(expected, abs=1e-5)
    assert result["train_loss"][0] == pytest.approx(loss.item(), rel=1e-5)


def test_no_update_means_no_benefit(setup):
    script, args = setup
    model, task = script.build(args)
    streams = script.streams_of(task, "train", args, shuffle=True)
    result = train_and_measure(model, streams, training_segments(streams, 3), torch.optim.SGD(model.parameters(), lr=0),
                               lambda update: 0.0, measure_every=1, log_every=0)
    assert all(b == 0.0 for b in result["benefit"] if b is not None) and len(result["benefit"]) == 3


def test_cli_trains_both_orders_and_resumes(prepared_data_bin, tmp_path):
    out = tmp_path / "recency"
    command = [sys.executable, REPO / "scripts" / "recency_benefit.py", prepared_data_bin, "--out", out, "--updates",
               "12", "--measure-every", "2", "--tokens-per-sample", "32", "--batch-size", "2", "--warmup", "4",
               "--valid-batches", "3", "--smooth", "2", "--", "--arch", "transformer_lm", *TINY]
    run_command(*command, timeout=600)
    report = json.loads((out / "recency.json").read_text())
    assert set(report["summary"]) == {"documents", "shuffled"}
    for order in ("documents", "shuffled"):
        saved = json.loads((out / f"recency-{order}.json").read_text())
        assert len(saved["train_loss"]) == 12 and len(saved["measures"]) == 6
        assert np.isfinite(report["summary"][order]["valid_ppl"])
    # the same segments, so the same number of training tokens
    tokens = {json.loads((out / f"recency-{o}.json").read_text())["train_tokens"] for o in ("documents", "shuffled")}
    assert len(tokens) == 1
    assert (out / "recency.png").stat().st_size > 5_000 and "| documents |" in (out / "recency.md").read_text()
    again = run_command(*command, timeout=600)
    assert (again.stdout + again.stderr).count("done before with these settings") == 2
    bad = run_command(*command[:-len(TINY) - 2], "--arch", "no_such_arch", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
