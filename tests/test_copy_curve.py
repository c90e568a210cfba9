"""scripts/copy_curve.py: one row per saved checkpoint, in training order, with the copy
score computed as fairseq_memtrm.diagnostics computes it, tokens counted across
folders, and a cache that rescoring only what changed."""

import json
import os

import pytest
import torch
from fairseq import checkpoint_utils
from lm_builders import BIN, build, run_command, save_checkpoint

from fairseq_memtrm.diagnostics import copy_score, load_passages


def tiny_checkpoint(data, path, tokens_per_sample, seed):
    cfg, _, model = build(data, "transformer_lm", ["--decoder-layers", "2", "--decoder-embed-dim", "32",
                                                   "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
                                                   "--tokens-per-sample", str(tokens_per_sample),
                                                   "--batch-size", "4"], seed=seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_checkpoint(cfg, model, path)


def curve(data, out, *folders):
    result = run_command(BIN / "python", "scripts/copy_curve.py", data, *folders, "--out", out, "--span", "8",
                         "--count", "4", "--long-span", "48", "--in-context-segments", "2", "--in-context-last-only")
    return json.loads(open(f"{out}.json").read())["checkpoints"], result.stderr


@pytest.fixture(scope="module")
def run(prepared_data_bin, tmp_path_factory):
    work = tmp_path_factory.mktemp("curve")
    # a short-context phase (64 tokens) saved at 2 and 4 updates, then a 512-token phase at 3
    tiny_checkpoint(prepared_data_bin, work / "short" / "checkpoint_1_2.pt", 64, seed=1)
    tiny_checkpoint(prepared_data_bin, work / "short" / "checkpoint_1_4.pt", 64, seed=2)
    tiny_checkpoint(prepared_data_bin, work / "long" / "checkpoint_1_3.pt", 512, seed=3)
    rows, log = curve(prepared_data_bin, work / "curve", work / "short", work / "long")
    return work, prepared_data_bin, rows, log


def test_one_row_per_checkpoint_with_tokens_counted_across_folders(run):
    work, _, rows, _ = run
    assert [(r["folder"], r["updates"]) for r in rows] == [("short", 2), ("short", 4), ("long", 3)]
    # updates x batch 4 x tokens per sample, the later folder counted after the earlier one's 4 updates
    assert [r["tokens"] for r in rows] == [2 * 4 * 64, 4 * 4 * 64, 4 * 4 * 64 + 3 * 4 * 512]
    assert (work / "curve.png").stat().st_size > 10_000


def test_scores_are_the_diagnostics_scores_of_each_checkpoint(run):
    work, data, rows, _ = run
    for row, path in zip(rows, ["short/checkpoint_1_2.pt", "short/checkpoint_1_4.pt", "long/checkpoint_1_3.pt"]):
        models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(work / path)],
                                                                        arg_overrides={"data": str(data)})
        model = models[0].eval()
        expected = copy_score(model, load_passages(str(data), "valid", task.source_dictionary, 4, 8))
        assert row["first_copy_loss"] == pytest.approx(expected["first_copy_loss"], abs=1e-4)
        assert row["copy_ratio"] == pytest.approx(row["second_copy_loss"] / row["first_copy_loss"], abs=1e-4)
        if model.max_positions() >= 96:  # two 48-token passages fit: the long-span ratio too
            long = copy_score(model, load_passages(str(data), "valid", task.source_dictionary, 16, 48))
            assert row["long_span_copy_ratio"] == pytest.approx(
                long["second_copy_loss"] / long["first_copy_loss"], abs=1e-3)
        else:
            assert "long_span_copy_ratio" not in row
    # Olsson's score only where the context reaches token 500, and only for the last checkpoint
    assert "in_context_score" in rows[2] and "in_context_score" not in rows[0]


def test_a_rerun_rescoring_only_the_checkpoints_written_since(run):
    work, data, rows, _ = run
    again, _ = curve(data, work / "curve", work / "short", work / "long")
    assert again == rows
    torch.manual_seed(0)
    tiny_checkpoint(data, work / "short" / "checkpoint_1_4.pt", 64, seed=7)  # trained anew: other weights
    stamp = os.path.getmtime(work / "short" / "checkpoint_1_4.pt") + 5
    os.utime(work / "short" / "checkpoint_1_4.pt", (stamp, stamp))
    third, _ = curve(data, work / "curve", work / "short", work / "long")
    assert third[0] == rows[0] and third[2] == rows[2]
    assert third[1]["first_copy_loss"] != rows[1]["first_copy_loss"]


def test_copy_score_key_ranks_report_every_layer_and_head(run, tmp_path):
    """copy_score.py --key-ranks: one median rank and one found share per layer and head and
    kind of passage; a k larger than the memory's keys finds every copy; a gap no document
    holds is one sentence."""
    work, data, _, _ = run
    command = [BIN / "python", "scripts/copy_score.py", work / "short" / "checkpoint_1_2.pt", data, "--span", "8",
               "--count", "4", "--key-ranks", "--probe-at", "10", "--probe-gap", "200", "--probe-length", "8",
               "--tokens-per-sample", "64"]
    small = json.loads(run_command(*command, "--knn-k", "1").stdout)
    every = json.loads(run_command(*command, "--knn-k", "100000", "--memory-query", "key",
                                   "--memory-shift-keys").stdout)
    assert set(small["key_ranks"]) == {"random", "text"}
    for kind, report in every["key_ranks"].items():
        assert report["found"] == [[1.0, 1.0], [1.0, 1.0]]
        assert len(small["key_ranks"][kind]["median"]) == 2 and len(small["key_ranks"][kind]["median"][0]) == 2
        assert all(0.0 <= share <= 1.0 for layer in small["key_ranks"][kind]["found"] for share in layer)
    assert every["key_rank_layer"] in (0, 1)
    failed = run_command(*command[:-6], "--probe-gap", "10000000", check=False)
    assert failed.returncode != 0 and "lower --probe-gap" in failed.stderr and "Traceback" not in failed.stderr
