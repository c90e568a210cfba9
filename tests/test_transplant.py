"""scripts/transplant_vanilla.py and train_vanilla.sh's INIT_FROM: a vanilla that copies,
moved to another vocabulary, still copies; the move keeps every layer and the shared pieces."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from fairseq.data import Dictionary
from lm_builders import BIN, REPO, run_command

ASSETS = REPO / "demo" / "assets"
STDLIB = Path(os.__file__).parent


def load_script():
    spec = importlib.util.spec_from_file_location("transplant_vanilla", REPO / "scripts" / "transplant_vanilla.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dictionary(*symbols) -> Dictionary:
    d = Dictionary()
    for s in symbols:
        d.add_symbol(s)
    return d


def test_shared_pieces_keep_their_vector_new_ones_take_unused_ones_by_frequency():
    transplant = load_script().transplant
    source, target = dictionary("the", "a", "of", "x", "and"), dictionary("def", "a", "x", "self", "return", "if")
    g = torch.Generator().manual_seed(0)
    embeddings = torch.randn(len(source), 16, generator=g)
    layer = torch.randn(16, 16, generator=g)
    state = {"model": {"decoder.embed_tokens.weight": embeddings.clone(), "decoder.layers.0.fc1.weight": layer.clone(),
                       "decoder.output_projection.weight": embeddings.clone()}}
    kept = transplant(state, source, target)
    new = state["model"]["decoder.embed_tokens.weight"]
    assert new.shape == (len(target), 16) and kept == target.nspecial + 2  # specials, "a", "x"
    for symbol in ("a", "x", "</s>", "<unk>", "<pad>"):
        assert torch.equal(new[target.index(symbol)], embeddings[source.index(symbol)])
    # the new pieces, in dict order, take the unused source pieces in dict order; then reuse them
    for symbol, taken in (("def", "the"), ("self", "of"), ("return", "and"), ("if", "the")):
        assert torch.equal(new[target.index(symbol)], embeddings[source.index(taken)])
    assert torch.equal(state["model"]["decoder.layers.0.fc1.weight"], layer)
    assert state["model"]["decoder.output_projection.weight"] is new  # still tied

    state["model"]["decoder.output_projection.weight"] = torch.zeros_like(new)
    with pytest.raises(SystemExit, match="not tied"):
        transplant(state, target, source)
    with pytest.raises(SystemExit, match="pass the dict.txt it was trained with"):
        transplant({"model": {"decoder.embed_tokens.weight": embeddings}}, target, source)


@pytest.fixture(scope="module")
def code_bin(tmp_path_factory):
    """A few standard-library modules encoded with the committed code demo model's vocabulary."""
    dest = tmp_path_factory.mktemp("code-bin")
    run_command(sys.executable, "scripts/prepare_data.py", "--name", "code", "--dest-dir", dest,
                "--train", STDLIB / "argparse.py", "--valid", STDLIB / "[a-d]*.py", "--test", STDLIB / "json" / "*.py",
                "--spm-model", ASSETS / "code" / "spm.model", "--dict", ASSETS / "code" / "dict.txt", "--quiet")
    return dest / "code"


def copy_ratio(checkpoint, data_bin):
    out = run_command(BIN / "python", "scripts/copy_score.py", checkpoint, data_bin, "--split", "valid",
                      "--span", "60", "--count", "16")
    score = json.loads(out.stdout.strip().splitlines()[-1])
    return score["second_copy_loss"] / score["first_copy_loss"]


def test_the_books_vanilla_moved_to_the_code_vocabulary_copies_code(code_bin, tmp_path):
    """The committed books vanilla (88% of the code pieces are new to it) copies a code passage
    shown twice; its layers re-initialised, the same model does not; nor does it with random
    vectors of the same scale for the new pieces."""
    out = tmp_path / "transplanted.pt"
    result = run_command(BIN / "python", "scripts/transplant_vanilla.py", "--from", ASSETS / "books" / "vanilla.pt",
                         "--dict", code_bin / "dict.txt", "--out", out)
    assert "pieces keep their embedding" in result.stdout
    assert copy_ratio(out, code_bin) < 0.6

    state = torch.load(out, weights_only=False, map_location="cpu")
    g = torch.Generator().manual_seed(0)
    for name, weight in state["model"].items():
        if ".layers." in name and weight.dim() == 2:
            state["model"][name] = (torch.randn(weight.shape, generator=g) * weight.float().std()).to(weight.dtype)
    torch.save(state, tmp_path / "scrambled.pt")
    assert copy_ratio(tmp_path / "scrambled.pt", code_bin) > 0.9

    state = torch.load(out, weights_only=False, map_location="cpu")
    embeddings = state["model"]["decoder.embed_tokens.weight"]
    shared = set(Dictionary.load(str(ASSETS / "books" / "dict.txt")).symbols)
    code = Dictionary.load(str(code_bin / "dict.txt"))
    fresh = torch.tensor([i for i, s in enumerate(code.symbols) if s not in shared])
    embeddings[fresh] = (torch.randn(len(fresh), embeddings.shape[1], generator=g) * embeddings.float().std()).half()
    state["model"]["decoder.output_projection.weight"] = embeddings
    torch.save(state, tmp_path / "random.pt")
    assert copy_ratio(tmp_path / "random.pt", code_bin) > 0.85


def test_train_vanilla_init_from_trains_the_context_phase_from_the_transplant(code_bin, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BIN": str(BIN), "TOKENS_PER_SAMPLE": "128", "BATCH_SIZE": "2",
           "MAX_UPDATE": "2", "WARMUP": "1", "INIT_FROM": str(ASSETS / "books" / "vanilla.pt")}
    save = tmp_path / "vanilla"
    run_command("bash", "scripts/train_vanilla.sh", code_bin, save, env=env)
    assert not (save / "copy-phase").exists()
    transplanted = torch.load(save / "transplanted.pt", weights_only=False, map_location="cpu")["model"]
    trained = torch.load(save / "checkpoint_last.pt", weights_only=False, map_location="cpu")
    assert trained["optimizer_history"][-1]["num_updates"] == 2
    assert trained["cfg"]["checkpoint"]["finetune_from_model"] == str(save / "transplanted.pt")
    name = "decoder.layers.3.fc1.weight"
    change = (trained["model"][name].float() - transplanted[name].float()).abs().max().item()
    assert 0 < change < 0.05  # two small steps from the transplant, not from scratch
    again = run_command("bash", "scripts/train_vanilla.sh", code_bin, save, env=env)
    assert "already" in again.stdout + again.stderr  # a finished vanilla is a no-op

    both = run_command("bash", "scripts/train_vanilla.sh", code_bin, tmp_path / "other",
                       env={**env, "VANILLA_FROM": str(ASSETS / "books" / "vanilla.pt")}, check=False)
    assert both.returncode == 2 and "Traceback" not in both.stderr
    assert "set INIT_FROM (train from a transplanted vanilla) or VANILLA_FROM" in both.stderr
    (tmp_path / "empty.pt").write_bytes(b"")
    bad = run_command("bash", "scripts/train_vanilla.sh", code_bin, tmp_path / "third",
                      env={**env, "INIT_FROM": str(tmp_path / "empty.pt")}, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "INIT_FROM" in bad.stderr and "is not a fairseq checkpoint: it is empty" in bad.stderr
