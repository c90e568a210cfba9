"""End to end through fairseq's own CLIs: train, fine-tune a vanilla checkpoint, evaluate."""

import math
import os
import re
from pathlib import Path

import pytest
import torch
from lm_builders import BIN, run_command

SHAPE = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-input-dim", "32",
         "--decoder-output-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "4"]
COMMON = ["--task", "language_modeling", "--tokens-per-sample", "64", "--batch-size", "4", "--optimizer", "adam",
          "--lr", "1e-3", "--cpu", "--no-epoch-checkpoints", "--log-format", "simple", "--log-interval", "1",
          "--no-save-optimizer-state", "--seed", "3"]


def run(tool, *args, check=True):
    return run_command(BIN / tool, *args, check=check, timeout=600)


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    """Whitespace-tokenised Python standard library source: real text on every machine."""
    work = tmp_path_factory.mktemp("lm")
    sources = sorted(Path(os.__file__).parent.glob("*.py"))
    texts = [" ".join(p.read_text(errors="replace").split()[:1500]) for p in sources[:24]]
    (work / "train.txt").write_text("\n".join(texts[:20]) + "\n")
    (work / "valid.txt").write_text("\n".join(texts[20:]) + "\n")
    run("fairseq-preprocess", "--only-source", "--trainpref", work / "train.txt", "--validpref",
        work / "valid.txt", "--destdir", work / "bin", "--nwordssrc", "3000", "--workers", "1")
    return work


def train_losses(log):
    return [float(x) for x in re.findall(r"\| loss (\d+\.\d+)", log)]


def test_memorizing_model_trains_from_the_cli(data_bin):
    out = run("fairseq-train", data_bin / "bin", "--user-dir", "fairseq_memtrm", "--arch",
              "memorizing_transformer_lm_tiny", *COMMON, "--max-update", "4", "--memory-size", "512",
              "--save-dir", data_bin / "tiny")
    log = out.stdout + out.stderr
    losses = train_losses(log)
    assert losses and all(math.isfinite(x) for x in losses)
    assert "memorizing layers [2]" in log
    state = torch.load(data_bin / "tiny" / "checkpoint_last.pt", weights_only=False)
    assert "decoder.layers.2.self_attn.memory_gate" in state["model"]


def test_finetune_vanilla_checkpoint_and_evaluate(data_bin):
    run("fairseq-train", data_bin / "bin", "--arch", "transformer_lm", *SHAPE, *COMMON, "--max-update", "3",
        "--save-dir", data_bin / "vanilla")
    vanilla = torch.load(data_bin / "vanilla" / "checkpoint_last.pt", weights_only=False)["model"]

    run("fairseq-train", data_bin / "bin", "--user-dir", "fairseq_memtrm", "--arch", "memorizing_transformer_lm",
        *SHAPE, *COMMON, "--max-update", "1", "--lr", "1e-9", "--memory-size", "512", "--memory-layers", "1",
        "--finetune-from-model", data_bin / "vanilla" / "checkpoint_last.pt", "--save-dir", data_bin / "finetuned")
    finetuned = torch.load(data_bin / "finetuned" / "checkpoint_last.pt", weights_only=False)["model"]
    for key, tensor in vanilla.items():  # every vanilla weight was loaded (lr ~ 0: barely moved)
        torch.testing.assert_close(finetuned[key].float(), tensor.float(), atol=1e-6, rtol=0)
    assert torch.equal(finetuned["decoder.layers.1.self_attn.memory_gate"], torch.zeros(4))

    out = run("fairseq-eval-lm", data_bin / "bin", "--user-dir", "fairseq_memtrm", "--path",
              data_bin / "finetuned" / "checkpoint_last.pt", "--task", "language_modeling",
              "--tokens-per-sample", "64", "--batch-size", "4", "--cpu", "--gen-subset", "valid")
    match = re.search(r"Loss \(base 2\): (\d+\.\d+), Perplexity: (\d+\.\d+)", out.stdout + out.stderr)
    assert match and math.isfinite(float(match.group(2)))


def test_incompatible_checkpoint_is_one_clear_sentence(data_bin):
    if not (data_bin / "vanilla" / "checkpoint_last.pt").exists():
        run("fairseq-train", data_bin / "bin", "--arch", "transformer_lm", *SHAPE, *COMMON, "--max-update", "1",
            "--save-dir", data_bin / "vanilla")
    wrong_width = [("64" if arg == "32" else arg) for arg in SHAPE]
    out = run("fairseq-train", data_bin / "bin", "--user-dir", "fairseq_memtrm", "--arch",
              "memorizing_transformer_lm", *wrong_width, *COMMON, "--max-update", "1",
              "--finetune-from-model", data_bin / "vanilla" / "checkpoint_last.pt",
              "--save-dir", data_bin / "wrong", check=False)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert re.search(r"fairseq-memtrm: error: tensor decoder\.\S+ has shape", out.stderr)
