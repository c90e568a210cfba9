"""The user's path through the shell: prepare_data.py (the session fixture, on a
slice of real documents) -> fairseq-train --task document_lm -> fairseq-eval-lm,
for the memorizing model and for a vanilla transformer_lm baseline."""

import math
import re
from pathlib import Path

import pytest
from fairseq.data import Dictionary, data_utils

from fairseq_memtrm.data import DocumentDataset
from lm_builders import BIN, run_command

TRAIN = ["--user-dir", "fairseq_memtrm", "--task", "document_lm", "--tokens-per-sample", "64", "--batch-size", "2",
         "--optimizer", "adam", "--lr", "1e-3", "--cpu", "--max-update", "3", "--no-epoch-checkpoints",
         "--max-valid-steps", "2", "--log-format", "simple", "--log-interval", "1", "--no-save-optimizer-state"]
VANILLA_SHAPE = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
                 "--decoder-attention-heads", "4"]


def run(tool, *args, check=True):
    return run_command(BIN / tool, *args, check=check, timeout=600)


def evaluated(result):
    """(tokens scored, loss) from fairseq-eval-lm's log."""
    log = result.stdout + result.stderr
    tokens = int(re.search(r"Evaluated ([\d,]+) tokens", log).group(1).replace(",", ""))
    loss = float(re.search(r"Loss \(base 2\): ([\d.]+)", log).group(1))
    return tokens, loss


def split_tokens(data_bin: Path, split: str) -> int:
    dictionary = Dictionary.load(str(data_bin / "dict.txt"))
    lines = data_utils.load_indexed_dataset(str(data_bin / split), dictionary)
    # every binarized token but the empty lines between documents
    return int(lines.sizes.sum()) - int((lines.sizes == 1).sum())


@pytest.fixture(scope="module")
def checkpoints(prepared_data_bin, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("checkpoints")
    run("fairseq-train", prepared_data_bin, *TRAIN, "--arch", "memorizing_transformer_lm_tiny", "--memory-size", "1024",
        "--save-dir", save_dir / "memorizing")
    run("fairseq-train", prepared_data_bin, *TRAIN, "--arch", "transformer_lm", *VANILLA_SHAPE,
        "--save-dir", save_dir / "vanilla")
    return save_dir


def test_eval_lm_scores_every_test_token_once_with_memory_override(prepared_data_bin, checkpoints):
    expected = split_tokens(prepared_data_bin, "test")
    assert expected == DocumentDataset(
        data_utils.load_indexed_dataset(str(prepared_data_bin / "test"),
                                        Dictionary.load(str(prepared_data_bin / "dict.txt"))), "test").total_tokens()
    result = run("fairseq-eval-lm", prepared_data_bin, "--user-dir", "fairseq_memtrm", "--task", "document_lm",
                 "--path", checkpoints / "memorizing" / "checkpoint_last.pt", "--gen-subset", "test",
                 "--batch-size", "3", "--tokens-per-sample", "64", "--cpu",
                 "--model-overrides", "{'memory_size': 8192}")
    tokens, loss = evaluated(result)
    assert tokens == expected
    assert math.isfinite(loss) and loss > 0
    log = result.stdout + result.stderr
    assert "memory 8192 tokens/stream" in log and "stream set 'test'" in log


def test_vanilla_transformer_lm_is_the_baseline_under_the_same_segmentation(prepared_data_bin, checkpoints):
    result = run("fairseq-eval-lm", prepared_data_bin, "--user-dir", "fairseq_memtrm", "--task", "document_lm",
                 "--path", checkpoints / "vanilla" / "checkpoint_last.pt", "--gen-subset", "test",
                 "--batch-size", "3", "--tokens-per-sample", "64", "--cpu")
    tokens, loss = evaluated(result)
    assert tokens == split_tokens(prepared_data_bin, "test")
    assert math.isfinite(loss) and loss > 0
    # fairseq_cli's own log lines, without the pinned libraries' warnings and import-time DEBUG lines
    assert "| INFO | fairseq_cli.eval_lm |" in result.stdout
    for noise in ("DEBUG:", "UserWarning", "DeprecationWarning", "faiss.loader"):
        assert noise not in result.stdout + result.stderr, noise


def test_context_window_is_a_clear_error(prepared_data_bin, checkpoints):
    result = run("fairseq-eval-lm", prepared_data_bin, "--user-dir", "fairseq_memtrm", "--task", "document_lm",
                 "--path", checkpoints / "vanilla" / "checkpoint_last.pt", "--gen-subset", "test",
                 "--batch-size", "3", "--tokens-per-sample", "64", "--context-window", "16", "--cpu", check=False)
    assert result.returncode != 0
    assert "--context-window does not apply to --task document_lm" in result.stderr
    assert "Traceback" not in result.stderr
