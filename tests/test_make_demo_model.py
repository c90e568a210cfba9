"""scripts/make_demo_model.py's plan: which vanilla it fine-tunes and which vocabulary the
data-bin gets (the commands it would run, recorded instead of run)."""

import argparse
import importlib.util

import pytest

from lm_builders import REPO


@pytest.fixture
def make_demo_model(monkeypatch):
    spec = importlib.util.spec_from_file_location("make_demo_model", REPO / "scripts" / "make_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    commands = []
    monkeypatch.setattr(module, "run", lambda command, **env: commands.append(([str(c) for c in command], env)))
    return module, commands


def plan(module, commands, assets, **flags):
    args = argparse.Namespace(corpus="code", books_dir=None, assets=str(assets), vanilla=None, train_vanilla=False,
                              vanilla_updates=None, finetune_updates=None, memory_size=None, force=False)
    vars(args).update(flags)
    module.build(args, module.RECIPES["code"])
    prepare = next(c for c, _ in commands if "scripts/prepare_data.py" in c)
    trained = any("scripts/train_vanilla.sh" in c for c, _ in commands)
    finetune = next(env for c, env in commands if "scripts/run_experiment.sh" in c)
    return prepare, trained, finetune


def test_the_committed_vanilla_is_fine_tuned_with_its_own_vocabulary(make_demo_model, tmp_path):
    module, commands = make_demo_model
    for name in ("vanilla.pt", "spm.model", "dict.txt"):
        (tmp_path / name).write_text("x")
    prepare, trained, finetune = plan(module, commands, tmp_path)
    assert not trained
    assert finetune["VANILLA_CKPT"] == str(tmp_path / "vanilla.pt")
    assert finetune["STEPS"] == "memory" and finetune["CKPT"] == str(REPO / "checkpoints")
    assert "FINETUNE_UPDATES" not in finetune and "TRAIN_MEMORY" not in finetune  # run_experiment.sh's budget
    assert prepare[prepare.index("--spm-model") + 1] == str(tmp_path / "spm.model")
    assert prepare[prepare.index("--dict") + 1] == str(tmp_path / "dict.txt")


def test_without_a_committed_vanilla_or_with_train_vanilla_one_is_trained_on_a_new_vocabulary(
        make_demo_model, tmp_path):
    module, commands = make_demo_model
    prepare, trained, finetune = plan(module, commands, tmp_path)
    assert trained and "--spm-model" not in prepare
    (tmp_path / "vanilla.pt").write_text("x")
    commands.clear()
    prepare, trained, finetune = plan(module, commands, tmp_path, train_vanilla=True)
    assert trained and "--spm-model" not in prepare
    assert finetune["VANILLA_CKPT"].endswith("checkpoints/code/vanilla/checkpoint_last.pt")


def test_a_failing_step_stops_with_its_exit_code_and_no_traceback(tmp_path):
    """The step's own message is the user's; make_demo_model adds one line and exits with its code."""
    import subprocess
    import sys

    (tmp_path / "train").mkdir()
    result = subprocess.run([sys.executable, "scripts/make_demo_model.py", "--corpus", "books", "--books-dir",
                             str(tmp_path), "--assets", str(tmp_path / "assets"), "--train-vanilla"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "prepare_data.py failed" in result.stderr and "Traceback" not in result.stderr


def test_the_fine_tune_is_run_experiments_step_with_the_budget_given(make_demo_model, tmp_path):
    """The recipe (layer, gates, budget) is written once, in run_experiment.sh: make_demo_model
    names the corpus's step and passes only what the user set."""
    module, commands = make_demo_model
    for name in ("vanilla.pt", "spm.model", "dict.txt"):
        (tmp_path / name).write_text("x")
    _, _, finetune = plan(module, commands, tmp_path, finetune_updates=7, memory_size=256)
    assert (finetune["FINETUNE_UPDATES"], finetune["TRAIN_MEMORY"]) == ("7", "256")
    assert module.RECIPES["books"]["step"] == "copying-memory"  # the step that adds the copying options
    recipe = (REPO / "scripts" / "run_experiment.sh").read_text()
    assert 'step copying-memory && timed copying-memory' in recipe and "--memory-query key --memory-shift-keys" in recipe
    assert not any("--memory-layers" in c or "--memory-gate-init" in c for c, _ in commands)
