"""Faults and bad input, through the real command lines: a checkpoint_last.pt left broken by a
run killed while fairseq copied it, two runs sharing one save dir, and files that are not
fairseq checkpoints given where one is expected."""

import fcntl
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from lm_builders import BIN, REPO, run_command

TINY_SHAPE = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-input-dim", "32",
              "--decoder-output-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "4",
              "--log-interval", "1"]
SCRIPT_ENV = {"BIN": str(BIN), "OMP_NUM_THREADS": "1", "TOKENS_PER_SAMPLE": "64", "BATCH_SIZE": "4",
              "COPY_UPDATES": "0", "WARMUP": "1", "SAVE_EVERY": "2"}


def script(name, *args, check=False, **env):
    """Run scripts/NAME with the tiny settings (env overrides them)."""
    return run_command("bash", REPO / "scripts" / name, *args, check=check, timeout=600,
                       env={**os.environ, **SCRIPT_ENV, **{k: str(v) for k, v in env.items()}})


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    """A small binarized corpus (whitespace-tokenised standard library source), ~100 updates an epoch."""
    work = tmp_path_factory.mktemp("faults")
    sources = sorted(Path(os.__file__).parent.glob("*.py"))[:20]
    (work / "train.txt").write_text("\n".join(" ".join(p.read_text(errors="replace").split()[:1500])
                                              for p in sources) + "\n")
    run_command(BIN / "fairseq-preprocess", "--only-source", "--trainpref", work / "train.txt", "--destdir",
                work / "bin", "--nwordssrc", "2000", "--workers", "1")
    return work / "bin"


BAD_FILES = {"empty": b"", "random": random.Random(0).randbytes(4096)}
BAD_SENTENCE = {"empty": "is not a fairseq checkpoint: it is empty (0 bytes)",
                "random": "is not a fairseq checkpoint: it is not a torch file"}


@pytest.fixture(params=sorted(BAD_FILES))
def bad_file(request, tmp_path):
    path = tmp_path / f"{request.param}.pt"
    path.write_bytes(BAD_FILES[request.param])
    return request.param, path


def one_sentence(result, expected, status=2):
    """Exit ``status``, ``expected`` on stderr's one error line, no traceback anywhere."""
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    return errors[0]


# ------------------------------------------------------------- what is wrong with a file
def test_checkpoint_problem_names_what_is_wrong(tmp_path):
    from fairseq_memtrm.checkpoint_files import checkpoint_problem

    torch.save({"model": {"w": torch.zeros(500)}, "cfg": None}, tmp_path / "good.pt")
    whole = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(whole[: len(whole) // 2])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(BAD_FILES["random"])
    assert checkpoint_problem(str(tmp_path / "good.pt")) is None
    assert checkpoint_problem(str(tmp_path / "empty.pt")) == "it is empty (0 bytes)"
    assert checkpoint_problem(str(tmp_path / "random.pt")).startswith("it is not a torch file")
    assert checkpoint_problem(str(tmp_path / "half.pt")).startswith("it is a truncated torch file")
    assert checkpoint_problem(str(tmp_path / "other.pt")).startswith("it is a torch file without a 'model' entry")


# ------------------------------------------------------------- checkpoint_last.pt killed mid-copy
def test_fairseq_copy_to_checkpoint_last_is_atomic(tmp_path, monkeypatch):
    """With the plugin imported, fairseq's copy of checkpoint_E_N.pt to checkpoint_last.pt
    killed half-way leaves the old checkpoint_last.pt whole (and no temporary file)."""
    import fairseq_memtrm  # noqa: F401  (installs fairseq_patches)
    from fairseq import checkpoint_utils

    src, dst = tmp_path / "checkpoint_1_4.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(os.urandom(1 << 20))
    dst.write_bytes(b"old checkpoint")

    def killed(source, target, length=0):
        target.write(source.read(1000))
        raise KeyboardInterrupt  # what a kill mid-copy leaves, in-process

    with monkeypatch.context() as patch:
        patch.setattr(shutil, "copyfileobj", killed)
        with pytest.raises(KeyboardInterrupt):
            checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"old checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1_4.pt", "checkpoint_last.pt"]
    assert checkpoint_utils.PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == src.read_bytes()


def updates(checkpoint):
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["optimizer_history"][-1]["num_updates"]


def test_resume_survives_a_broken_checkpoint_last(data_bin, tmp_path):
    """train_vanilla.sh (stock fairseq: the copy is not atomic there) rerun over an empty, then
    a truncated checkpoint_last.pt resumes from the newest whole checkpoint_1_N.pt with one
    sentence; with none left it moves the broken file aside and starts over."""
    save = tmp_path / "vanilla"
    last = save / "checkpoint_last.pt"
    first = script("train_vanilla.sh", data_bin, save, *TINY_SHAPE, MAX_UPDATE=4)
    assert first.returncode == 0, first.stderr[-3000:]
    assert updates(last) == 4 and (save / "checkpoint_1_4.pt").is_file()

    for kind, max_update in (("empty", 6), ("truncated", 8)):
        resumed_from = max_update - 2
        size = last.stat().st_size
        with open(last, "r+b") as f:  # what a kill during fairseq's copy leaves
            f.truncate(0 if kind == "empty" else size // 3)
        out = script("train_vanilla.sh", data_bin, save, *TINY_SHAPE, MAX_UPDATE=max_update)
        log = out.stdout + out.stderr
        assert out.returncode == 0 and "Traceback" not in log, log[-3000:]
        notes = [line for line in log.splitlines() if "is unreadable" in line]
        assert len(notes) == 1, log[-3000:]
        expected_kind = "it is empty (0 bytes)" if kind == "empty" else "it is a truncated torch file"
        assert notes[0].startswith(f"{last} is unreadable ({expected_kind}"), notes
        assert notes[0].endswith(f"resuming from {save}/checkpoint_1_{resumed_from}.pt, the newest whole "
                                 f"checkpoint ({resumed_from} updates)"), notes
        assert re.search(rf"[Ll]oaded checkpoint \S*checkpoint_last\.pt \(epoch 1 @ {resumed_from} updates\)", log)
        steps = [int(n) for n in re.findall(r"num_updates=(\d+)", log)]
        assert steps and steps[0] == resumed_from + 1 and updates(last) == max_update, steps

    for old in save.glob("checkpoint_1_*.pt"):
        old.unlink()
    last.write_bytes(b"")
    out = script("train_vanilla.sh", data_bin, save, *TINY_SHAPE, MAX_UPDATE=2)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "Traceback" not in log, log[-3000:]
    aside = list(save.glob("checkpoint_last.pt.corrupt-*"))
    assert len(aside) == 1 and aside[0].stat().st_size == 0
    assert (f"{last} is unreadable (it is empty (0 bytes)) and no whole checkpoint_*_N.pt is left to resume from: "
            f"moved it to {aside[0]}, training starts over") in log
    assert updates(last) == 2  # from scratch


# ------------------------------------------------------------- one run per save dir
def test_second_run_into_a_save_dir_in_use_stops(data_bin, tmp_path):
    save = tmp_path / "shared"
    first = subprocess.Popen(["bash", str(REPO / "scripts" / "train_vanilla.sh"), str(data_bin), str(save),
                              *TINY_SHAPE], cwd=REPO, env={**os.environ, **SCRIPT_ENV, "MAX_UPDATE": "100000"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (save / ".lock.pid").is_file() and time.time() < deadline:
            time.sleep(0.2)
        second = script("train_vanilla.sh", data_bin, save, *TINY_SHAPE, MAX_UPDATE=4)
        assert first.poll() is None  # still training
    finally:
        os.killpg(first.pid, signal.SIGTERM)  # the run this test started, and its fairseq-train
        first.wait(timeout=60)
    assert second.returncode == 2, second.stderr[-3000:]
    assert re.search(rf"train_vanilla\.sh: another run is training into {re.escape(str(save))} "
                     rf"\(pid {first.pid}, train_vanilla\.sh, started [-0-9: ]+\); wait for it or choose another "
                     r"save dir", second.stderr), second.stderr[-3000:]
    assert "fairseq_cli.train" not in second.stdout + second.stderr  # it never started training


@pytest.mark.parametrize("name", ["finetune_memory.sh", "finetune_longmem.sh"])
def test_finetune_into_a_locked_save_dir_stops(name, tmp_path):
    """A run holding SAVE/.lock (here this test, as flock(1) would) stops the fine-tune: exit 2."""
    save = tmp_path / "save"
    save.mkdir()
    (tmp_path / "from.pt").write_bytes(b"")
    (save / ".lock.pid").write_text(f"pid {os.getpid()}, finetune_memory.sh, started 2024-01-01 00:00:00\n")
    with open(save / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        out = script(name, tmp_path, tmp_path / "from.pt", save)
    assert out.returncode == 2, out.stderr[-3000:]
    assert (f"{name}: another run is training into {save} (pid {os.getpid()}, finetune_memory.sh, started "
            "2024-01-01 00:00:00); wait for it or choose another save dir") in out.stderr


# ------------------------------------------------------------- files that are not checkpoints
@pytest.mark.parametrize("name,flag", [("finetune_memory.sh", "--finetune-from-model"),
                                       ("finetune_longmem.sh", "--backbone-checkpoint")])
def test_finetune_scripts_refuse_a_bad_checkpoint(name, flag, bad_file, tmp_path):
    kind, path = bad_file
    out = script(name, tmp_path, path, tmp_path / "save")
    line = one_sentence(out, BAD_SENTENCE[kind])
    assert line.startswith(f"{name}: error: {flag} {path} is not a fairseq checkpoint")


def test_run_experiment_refuses_a_bad_vanilla_before_any_step(bad_file, tmp_path):
    """VANILLA_CKPT (or step 1's vanilla, when it was never trained) is checked before the
    induction layer is measured from it: one sentence, exit 2, nothing trained."""
    kind, path = bad_file
    out = script("run_experiment.sh", "code", tmp_path, tmp_path, STEPS="memory", VANILLA_CKPT=path,
                 CKPT=tmp_path / "ckpt", RESULTS=tmp_path / "results")
    line = one_sentence(out, BAD_SENTENCE[kind])
    assert line.startswith(f"run_experiment.sh: error: VANILLA_CKPT {path} is not a fairseq checkpoint")
    untrained = script("run_experiment.sh", "code", tmp_path, tmp_path, STEPS="control", CKPT=tmp_path / "ckpt",
                       RESULTS=tmp_path / "results")
    assert one_sentence(untrained, "there is no such file").startswith(
        "run_experiment.sh: error: the vanilla (STEPS=vanilla trains it) ")
    assert not (tmp_path / "ckpt" / "code" / "memory").exists()


def test_eval_lm_path_bad_checkpoint(data_bin, bad_file):
    kind, path = bad_file
    out = run_command(BIN / "fairseq-eval-lm", data_bin, "--user-dir", "fairseq_memtrm", "--path", path,
                      "--task", "language_modeling", "--tokens-per-sample", "64", "--cpu", check=False)
    line = one_sentence(out, BAD_SENTENCE[kind])
    assert line.startswith(f"fairseq-memtrm: error: {path} {BAD_SENTENCE[kind]}")


def test_train_finetune_from_bad_checkpoint(data_bin, bad_file, tmp_path):
    kind, path = bad_file
    out = run_command(BIN / "fairseq-train", data_bin, "--user-dir", "fairseq_memtrm", "--task",
                      "language_modeling", "--arch", "transformer_lm", *TINY_SHAPE, "--tokens-per-sample", "64",
                      "--batch-size", "4", "--optimizer", "adam", "--lr", "1e-3", "--max-update", "1", "--cpu",
                      "--disable-validation", "--finetune-from-model", path, "--save-dir", tmp_path / "save",
                      check=False)
    assert one_sentence(out, BAD_SENTENCE[kind]).startswith(f"fairseq-memtrm: error: {path} ")


def test_longmem_backbone_bad_checkpoint(data_bin, bad_file, tmp_path):
    kind, path = bad_file
    out = run_command(BIN / "fairseq-train", data_bin, "--user-dir", "fairseq_memtrm", "--task",
                      "language_modeling", "--arch", "longmem_sidenet_lm", "--backbone-checkpoint", path,
                      "--tokens-per-sample", "64", "--batch-size", "4", "--optimizer", "adam", "--lr", "1e-3", "--max-update", "1",
                      "--cpu", "--save-dir", tmp_path / "save", check=False)
    assert one_sentence(out, BAD_SENTENCE[kind]).startswith(
        f"fairseq-memtrm: error: --backbone-checkpoint {path} is not a fairseq checkpoint")


def test_demo_bad_checkpoint(bad_file):
    kind, path = bad_file
    out = run_command(BIN / "python", REPO / "demo" / "app.py", "--checkpoint", path, "--cpu", check=False)
    assert one_sentence(out, BAD_SENTENCE[kind]).startswith(
        f"demo/app.py: error: --checkpoint {path} is not a fairseq checkpoint")


# ------------------------------------------------------------- prefetch threads alive at exit
PREFETCH_AT_EXIT = """
import os, sys, threading
import torch
if os.environ["WITH_PLUGIN"] == "1":
    import fairseq_memtrm  # noqa: F401
from fairseq.data import iterators

def batches():  # every batch a torch operator of some milliseconds, without end
    a = torch.randn(600, 600)
    while True:
        yield a @ a

itr = iterators.BufferedIterator(1000, range(10**6))
itr._iterable = batches()
next(itr)
print("consumer alive:", any(isinstance(t, iterators.BackgroundConsumer) and t.is_alive()
                             for t in threading.enumerate()), flush=True)
"""


@pytest.mark.parametrize("with_plugin", [False, True])
def test_prefetch_thread_alive_at_exit(tmp_path, with_plugin):
    """A process that ends while fairseq's prefetch thread is inside a torch operator (a
    training or validation iterator stopped early): stock, Python's teardown aborts it
    (SIGABRT, "terminate called without an active exception"); with the plugin imported it
    ends with status 0."""
    program = tmp_path / "prefetch.py"
    program.write_text(PREFETCH_AT_EXIT)
    result = run_command(BIN / "python", program, check=False, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "WITH_PLUGIN": str(int(with_plugin))})
    assert "consumer alive: True" in result.stdout
    if with_plugin:
        assert result.returncode == 0, result.stderr[-2000:]
    else:
        assert result.returncode == -signal.SIGABRT
        assert "terminate called without an active exception" in result.stderr


def test_stop_background_consumers_ends_every_prefetch_thread():
    """Prefetch threads blocked on a full queue or still producing all end, and no other thread is touched."""
    from fairseq.data import iterators

    from fairseq_memtrm.fairseq_patches import stop_background_consumers

    def endless():
        while True:
            yield torch.zeros(4)

    full, busy = iterators.BufferedIterator(2, range(100)), iterators.BufferedIterator(1000, range(10**6))
    full._iterable, busy._iterable = endless(), endless()
    next(full), next(busy)
    time.sleep(0.2)  # `full` now waits on its put
    bystander_done = threading.Event()
    bystander = threading.Thread(target=bystander_done.wait, daemon=True)
    bystander.start()
    consumers = [full._consumer, busy._consumer]
    assert all(consumer.is_alive() for consumer in consumers)
    assert stop_background_consumers(timeout=30)
    assert not any(consumer.is_alive() for consumer in consumers)
    assert bystander.is_alive()
    bystander_done.set()
