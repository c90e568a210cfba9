"""Bad numbers on the command line: each gets one sentence or a warning with the
numbers, never a crash or a silent waste (real fairseq-train runs, a few seconds each)."""

import sys

import torch
from lm_builders import BIN, run_command

from fairseq_memtrm.memory import KNNMemory

TINY_RUN = ["--user-dir", "fairseq_memtrm", "--task", "document_lm", "--arch", "memorizing_transformer_lm_tiny",
            "--tokens-per-sample", "64", "--optimizer", "adam", "--lr", "1e-3", "--cpu", "--max-update", "2",
            "--train-subset", "valid", "--disable-validation", "--no-save", "--log-format", "simple"]

# Runs a command and prints the peak resident memory of its process tree's largest member (MiB).
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print('peak MiB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024); sys.exit(code)")


def train(data_bin, *extra, check=True):
    result = run_command(sys.executable, "-c", PEAK_RSS, BIN / "fairseq-train", data_bin, *TINY_RUN, *extra,
                         check=check, timeout=300)
    return result, result.stdout + result.stderr


def test_search_buffers_are_no_wider_than_the_memory():
    memory = KNNMemory(2, 2, 4, memory_size=64)
    keys = torch.nn.functional.normalize(torch.randn(2, 2, 5, 4), dim=-1)
    memory.add(keys, keys, torch.tensor([[True] * 5, [True] * 3 + [False] * 2]))
    found = memory.search(keys, 100_000)
    assert found.keys.shape == (2, 2, 5, 5, 4)  # the fuller stream holds 5 entries
    assert found.mask[0].all() and found.mask[1].sum(-1).eq(3).all()


def test_knn_k_beyond_the_memory_size_is_clamped_with_a_warning(prepared_data_bin):
    result, log = train(prepared_data_bin, "--memory-size", "64", "--knn-k", "100000", "--batch-size", "2")
    assert "--knn-k 100000 exceeds --memory-size 64: clamped to 64" in log
    peak = int(log.split("peak MiB")[1].split()[0])
    assert peak < 2000, f"{peak} MiB: buffers sized by k, not by the memory"


def test_knn_k_zero_with_a_memory_is_one_sentence(prepared_data_bin):
    result, log = train(prepared_data_bin, "--memory-size", "64", "--knn-k", "0", "--batch-size", "2", check=False)
    assert result.returncode == 1 and "Traceback" not in log
    assert "fairseq-memtrm: error: --knn-k must be >= 1 to read the memory, got 0; to turn the memory off use " \
           "--memory-size 0" in result.stderr


def test_more_streams_than_documents_is_a_warning_with_the_numbers(prepared_data_bin):
    _, log = train(prepared_data_bin, "--memory-size", "64", "--batch-size", "8")
    assert "valid: 8 streams (--batch-size 8 x 1 ranks) but only 3 documents: 5 rows of every batch are " \
           "padding; use --batch-size 3 or less" in log


def test_unknown_model_overrides_are_one_sentence(prepared_data_bin, tmp_path):
    """fairseq drops an override key that no config group has: a typo, or a memory
    setting given to a vanilla model, would evaluate something else than asked."""
    vanilla = tmp_path / "vanilla"
    run_command(BIN / "fairseq-train", prepared_data_bin, "--task", "language_modeling", "--arch", "transformer_lm",
                "--decoder-layers", "1", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
                "--decoder-attention-heads", "2", "--tokens-per-sample", "32", "--batch-size", "2", "--optimizer",
                "adam", "--lr", "1e-3", "--cpu", "--max-update", "1", "--save-dir", vanilla, timeout=300)
    for overrides, expected in (("{'memory_sizee': 0}", "'memory_sizee'"), ("{'memory_size': 1024}", "'memory_size'")):
        result = run_command(BIN / "fairseq-eval-lm", prepared_data_bin, "--path", vanilla / "checkpoint_last.pt",
                             "--user-dir", "fairseq_memtrm", "--cpu", "--tokens-per-sample", "32",
                             "--model-overrides", overrides, check=False, timeout=300)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"fairseq-memtrm: error: --model-overrides key {expected} is not a setting of" in result.stderr
    ok = run_command(BIN / "fairseq-eval-lm", prepared_data_bin, "--path", vanilla / "checkpoint_last.pt",
                     "--user-dir", "fairseq_memtrm", "--cpu", "--tokens-per-sample", "32", "--gen-subset", "valid",
                     "--model-overrides", "{'dropout': 0.0}", timeout=300)
    assert "Perplexity" in ok.stdout + ok.stderr


def test_an_error_at_the_first_training_step_exits_1_every_time(prepared_data_bin):
    """A plugin error raised mid-training (here: the memory would not fit in RAM, found
    when the first batch allocates it) prints its sentence and exits 1, every run: the
    process leaves without the interpreter teardown that can abort (status 134) while
    the data loader's threads still run."""
    for _ in range(3):
        result, log = train(prepared_data_bin, "--memory-size", "1000000000", "--batch-size", "2", check=False)
        assert result.returncode == 1, log[-2000:]
        assert "Traceback" not in log and "terminate called" not in log
        assert result.stderr.strip().splitlines()[-1].startswith("fairseq-memtrm: error: the kNN memory needs")
