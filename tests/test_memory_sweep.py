"""The fine-tuning experiment's whole chain on a tiny slice of real documents:
prepare -> vanilla -> memory fine-tune + control -> sweep. The real numbers come
from the scripts (docs/results.md); this checks the chain and its bookkeeping."""

import json
import math
import os
import re
from pathlib import Path

import pytest
from lm_builders import BIN, run_command

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "BIN": str(BIN), "TOKENS_PER_SAMPLE": "64", "BATCH_SIZE": "2",
       "MAX_UPDATE": "3", "REPEAT_PROB": "0.5", "COPY_UPDATES": "2", "COPY_TOKENS_PER_SAMPLE": "32"}
# both phases of the vanilla recipe: a copy phase (--task repeat_lm), then the context phase


def run(*cmd, env=ENV):
    result = run_command(*cmd, env=env)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    work = tmp_path_factory.mktemp("sweep")
    stdlib = sorted(Path(os.__file__).parent.glob("*.py"))
    run(BIN / "python", "scripts/prepare_data.py", "--name", "code", "--dest-dir", work, "--vocab-size", "400",
        "--train", *stdlib[:12], "--valid", *stdlib[12:14], "--test", *stdlib[14:17],
        "--max-chars-per-doc", "6000", "--quiet")
    data = work / "code"
    run("bash", "scripts/train_vanilla.sh", data, work / "vanilla")
    vanilla = work / "vanilla" / "checkpoint_last.pt"
    trained = vanilla.read_bytes()
    again = run("bash", "scripts/train_vanilla.sh", data, work / "vanilla")  # a finished step: nothing to do
    assert "nothing to train" in again and vanilla.read_bytes() == trained
    run("bash", "scripts/finetune_memory.sh", data, vanilla, work / "memory", env={**ENV, "MEMORY_SIZE": "1024"})
    run("bash", "scripts/finetune_memory.sh", data, vanilla, work / "control", env={**ENV, "MEMORY_SIZE": "0"})
    run("bash", "scripts/finetune_memory.sh", data, vanilla, work / "copying", "--memory-query", "key",
        "--memory-shift-keys", env={**ENV, "MEMORY_SIZE": "1024"})
    out = run(*SWEEP(work))
    return work, out


def SWEEP(work, *runs, out=None):
    runs = runs or ("--memory-checkpoint", work / "memory" / "checkpoint_last.pt", "--copying-memory-checkpoint",
                    work / "copying" / "checkpoint_last.pt", "--control-checkpoint",
                    work / "control" / "checkpoint_last.pt", "--vanilla-checkpoint",
                    work / "vanilla" / "checkpoint_last.pt")
    return (BIN / "python", "scripts/eval_memory_sweep.py", work / "code", *runs, "--memory-sizes", "0,256",
            "--tokens-per-sample", "64", "--batch-size", "2", "--far-position", "256", "--probe-gap", "300",
            "--probe-at", "20", "--probe-length", "8", "--out", out or work / "results", "--cpu", "--log-format", "none")


def test_checkpoint_folders_keep_their_vocabulary_and_refuse_another(chain, tmp_path):
    """A data-bin rebuilt with a new SentencePiece model has other ids under the same
    vocabulary size: resuming or fine-tuning on it is refused in one sentence."""
    import filecmp
    import shutil

    work, _ = chain
    for folder in ("vanilla", "memory", "control"):
        for name in ("dict.txt", "spm.model"):
            assert filecmp.cmp(work / folder / name, work / "code" / name, shallow=False)
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(work / "code", rebuilt)
    lines = (rebuilt / "dict.txt").read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]  # the same symbols, two ids swapped
    (rebuilt / "dict.txt").write_text("\n".join(lines) + "\n")
    vanilla = work / "vanilla" / "checkpoint_last.pt"
    for command in (["scripts/train_vanilla.sh", rebuilt, work / "vanilla"],
                    ["scripts/finetune_memory.sh", rebuilt, vanilla, tmp_path / "new"],
                    ["scripts/finetune_longmem.sh", rebuilt, vanilla, tmp_path / "side"]):
        result = run_command("bash", *command, env=ENV, check=False)
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert "was trained with another dict.txt" in result.stderr and "--spm-model" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "new").exists()


def test_sweep_report_has_every_run_with_finite_numbers(chain):
    work, _ = chain
    report = json.loads((work / "results" / "memory_sweep.json").read_text())
    runs = {(r["name"], r["memory_size"]): r for r in report["runs"]}
    assert set(runs) == {("paper-memory", 0), ("paper-memory", 256), ("copying-memory", 0), ("copying-memory", 256),
                         ("control", 0), ("vanilla", 0)}
    tokens = {r["tokens"] for r in report["runs"]}
    assert len(tokens) == 1 and tokens.pop() > 1000  # every run scores the same tokens
    for row in report["runs"]:
        assert math.isfinite(row["ppl"]) and row["ppl"] > 1
        assert row["ppl_past_far_position"] is None or math.isfinite(row["ppl_past_far_position"])
        assert row["tokens_per_second"] > 0
    assert len(runs[("paper-memory", 256)]["gates"]["3"]) == 4  # layer 3 of 6, 4 heads
    assert runs[("vanilla", 0)]["gates"] == {} and runs[("control", 0)]["gates"] == {}
    assert 0 < runs[("paper-memory", 256)]["retrieval"]["mean_top1_distance"]
    assert runs[("paper-memory", 0)]["ppl"] != runs[("paper-memory", 256)]["ppl"]
    assert report["biggest_gains"] and "token" in report["biggest_gains"][0]
    copy = report["vanilla_copy_score"]  # 16 passages of 32 tokens (half a 64-token segment)
    assert copy["span"] == 32 and math.isfinite(copy["copy_gain"]) and copy["first_copy_loss"] > 0
    assert (work / "results" / "memory_sweep.png").stat().st_size > 10_000
    assert "| paper-memory | 256 |" in (work / "results" / "memory_sweep.md").read_text()
    probe = report["planted_passage"]  # every test document holds a passage at 20 and at 320
    assert probe == {"documents": {"random": 3, "text": 3}, "at": 20, "gap": 300, "length": 8}
    for row in report["runs"]:
        for key in ("planted_passage", "planted_text"):  # random tokens; a span of another document
            losses = row[key]
            assert math.isfinite(losses["first_copy_loss"]) and math.isfinite(losses["second_copy_loss"])
    # without memory, a copy 300 tokens (5 segments) back is out of reach: both copies cost alike
    no_memory = runs[("paper-memory", 0)]["planted_passage"]
    assert no_memory["second_copy_loss"] == pytest.approx(no_memory["first_copy_loss"], rel=0.2)
    # natural text is cheaper than random tokens for a model trained on text, in either copy
    assert runs[("vanilla", 0)]["planted_text"]["first_copy_loss"] < no_memory["first_copy_loss"]
    table = (work / "results" / "memory_sweep.md").read_text()
    assert "Planted passages: 8 tokens written at token 20" in table and "text: a span of another document" in table
    assert "| random: 1st copy | random: 2nd copy | text: 1st copy | text: 2nd copy |" in table
    # what the memory retrieved for the second copy: nothing at memory 0; at 256 the first copy,
    # 300 tokens back, has been evicted, so no (layer, head, query) finds it
    assert "second_copy_next_found" not in no_memory
    evicted = runs[("paper-memory", 256)]["planted_passage"]
    assert evicted["second_copy_next_found"] == evicted["second_copy_next_weight"] == 0.0
    assert "| paper-memory | 256 | random | 0.0% |" in table


def test_a_rerun_sweep_reads_every_finished_run_from_its_cache(chain):
    """A sweep killed after hours resumes: finished runs are not evaluated again, and
    the report is the same; a checkpoint trained anew (new mtime) is evaluated again."""
    work, _ = chain
    before = json.loads((work / "results" / "memory_sweep.json").read_text())
    again = run(*SWEEP(work))
    assert again.count("(cached in") == len(before["runs"]) and "evaluating" not in again
    after = json.loads((work / "results" / "memory_sweep.json").read_text())
    assert after == before
    control = work / "control" / "checkpoint_last.pt"
    os.utime(control, (control.stat().st_atime, control.stat().st_mtime + 10))
    third = run(*SWEEP(work))
    assert third.count("(cached in") == len(before["runs"]) - 1 and "evaluating control" in third


def test_keep_runs_adds_a_run_to_an_earlier_report_and_refuses_other_settings(chain, tmp_path):
    """A run trained later joins a report: --keep-runs scores only that run and keeps every
    other row (and the copy score, probe counts and per-token gains measured beside them);
    a report measured with other settings is refused in one sentence."""
    import shutil

    work, _ = chain
    full = json.loads((work / "results" / "memory_sweep.json").read_text())
    out = tmp_path / "results"
    shutil.copytree(work / "results", out)  # with its cache: the added run is read from there
    without = dict(full, runs=[row for row in full["runs"] if row["name"] != "copying-memory"])
    (out / "memory_sweep.json").write_text(json.dumps(without))
    copying = ("--copying-memory-checkpoint", work / "copying" / "checkpoint_last.pt")
    log = run(*SWEEP(work, *copying, out=out), "--keep-runs")
    assert log.count("(cached in") == 2 and "evaluating" not in log  # copying-memory at 0 and 256 only
    merged = json.loads((out / "memory_sweep.json").read_text())
    assert merged["runs"] == full["runs"]  # every row back, in the order of a whole sweep
    for key in ("vanilla_copy_score", "planted_passage", "biggest_gains", "gains_between"):
        assert merged[key] == full[key], key
    assert "| copying-memory | 256 |" in (out / "memory_sweep.md").read_text()
    again = run(*SWEEP(work, "--memory-checkpoint", work / "memory" / "checkpoint_last.pt", out=out), "--keep-runs")
    assert json.loads((out / "memory_sweep.json").read_text())["runs"] == full["runs"]  # rows replaced, not doubled
    assert "(cached in" in again
    vanilla = ("--vanilla-checkpoint", work / "vanilla" / "checkpoint_last.pt")
    alone = run(*SWEEP(work, *vanilla, out=out), "--keep-runs")  # a run without memory, re-timed on its own
    assert json.loads((out / "memory_sweep.json").read_text())["runs"] == full["runs"] and "(cached in" in alone
    for extra, said in (([], "or --keep-runs to re-score"), (["--keep-runs"], "no report in")):
        refused = run_command(*SWEEP(work, *vanilla, out=tmp_path / "empty"), *extra, env=ENV, check=False)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr and said in refused.stderr
    other = [str(a) for a in SWEEP(work, *copying, out=out)]
    other[other.index("--far-position") + 1] = "128"
    refused = run_command(*other, "--keep-runs", env=ENV, check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "--keep-runs: " in refused.stderr and "was measured with --far-position 256" in refused.stderr


def test_sweep_perplexity_is_fairseq_eval_lm_perplexity(chain):
    work, _ = chain
    report = json.loads((work / "results" / "memory_sweep.json").read_text())
    expected = next(r for r in report["runs"] if r["name"] == "paper-memory" and r["memory_size"] == 256)
    out = run(BIN / "fairseq-eval-lm", work / "code", "--user-dir", "fairseq_memtrm", "--task", "document_lm",
              "--path", work / "memory" / "checkpoint_last.pt", "--gen-subset", "test", "--tokens-per-sample", "64",
              "--batch-size", "2", "--model-overrides", "{'memory_size': 256}", "--cpu")
    match = re.search(r"Evaluated ([\d,]+) tokens.*Perplexity: (\d+\.\d+)", out, re.S)
    assert match, out[-2000:]
    assert int(match.group(1).replace(",", "")) == expected["tokens"]
    assert float(match.group(2)) == pytest.approx(expected["ppl"], rel=1e-3)


def test_retrieval_quality_checks_the_retrieved_tokens_against_the_targets():
    """By hand: two segments of one document; the second retrieves known positions."""
    from types import SimpleNamespace

    import torch
    from fairseq_memtrm.memory import Retrieval

    sweep = load_sweep_script()
    doc_tokens = {}
    first = {"net_input": {"src_tokens": torch.tensor([[2, 5, 6, 7]])}, "doc_id": torch.tensor([0]),
             "target": torch.tensor([[5, 6, 7, 8]])}
    mask = torch.ones(1, 4, dtype=torch.bool)
    sweep.remember_source_tokens(doc_tokens, first, torch.arange(4)[None], mask)
    assert doc_tokens[0].tolist() == [2, 5, 6, 7]
    second = {"net_input": {"src_tokens": torch.tensor([[8, 5, 9, 1]])}, "doc_id": torch.tensor([0]),
              "target": torch.tensor([[5, 6, 9, 1]])}
    mask = torch.tensor([[True, True, True, False]])  # the last token is padding
    # 2 heads x 4 queries: the top-1 document positions found (-1: nothing)
    positions = torch.tensor([[[1, 2, 3, 0], [0, 2, -1, 0]]])
    retrieval = Retrieval(keys=None, values=None, scores=None, positions=positions[..., None],
                          mask=(positions >= 0)[..., None])
    holds, seen = sweep.retrieval_quality(SimpleNamespace(retrieval=retrieval), doc_tokens, second, mask)
    # head 0: tokens 5, 6, 7 against targets 5, 6, 9; head 1: 2, 6, (none) against 5, 6
    assert holds.tolist() == [True, True, False, False, True]
    assert seen.tolist() == [True, True, False]  # 5 and 6 came before, 9 did not
    sweep.remember_source_tokens(doc_tokens, second, torch.arange(4, 8)[None], mask)
    assert doc_tokens[0].tolist() == [2, 5, 6, 7, 8, 5, 9]


def load_sweep_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep", Path(__file__).parents[1] / "scripts" / "eval_memory_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    return sweep


def test_a_report_with_every_kind_of_run_is_written(tmp_path):
    """The committed books report holds all seven runs (four memory sweeps, GPTm, control, vanilla);
    writing it again gives a table row and planted-passage row per run and a plot (a fifth sweep
    line once had no marker, and the sweep crashed after scoring every run)."""
    sweep = load_sweep_script()
    report = json.loads((Path(__file__).parents[1] / "results" / "books" / "memory_sweep.json").read_text())
    names = [run["name"] for run in report["runs"]]
    assert set(sweep.MEMORY_RUNS) <= set(names) and {"gptm", "control", "vanilla"} <= set(names)
    sweep.write_outputs(tmp_path, report)
    table = (tmp_path / "memory_sweep.md").read_text()
    for name in names:
        assert len(re.findall(rf"^\| {name} \|", table, re.M)) >= 2, name  # perplexity and planted passages
    assert (tmp_path / "memory_sweep.png").stat().st_size > 10_000


def test_an_exported_vanilla_is_installed_instead_of_trained(chain, tmp_path):
    """make_demo_model.py --export-vanilla, then VANILLA_FROM: train_vanilla.sh installs the
    export (no phase trains), a rerun keeps it, fine-tuning from it works, and an export
    whose vocabulary differs from the data-bin's is refused in one sentence."""
    import shutil

    import torch

    work, _ = chain
    exported = tmp_path / "assets"
    run(BIN / "python", "scripts/make_demo_model.py", "--checkpoint", work / "vanilla" / "checkpoint_last.pt",
        "--data-bin", work / "code", "--assets", exported, "--export-vanilla")
    env = {**ENV, "VANILLA_FROM": str(exported / "vanilla.pt")}
    out = run("bash", "scripts/train_vanilla.sh", work / "code", tmp_path / "vanilla", env=env)
    installed = tmp_path / "vanilla" / "checkpoint_last.pt"
    assert "exported weights, not trained here" in out and "nothing to train" in out
    assert installed.read_bytes() == (exported / "vanilla.pt").read_bytes()
    assert not (tmp_path / "vanilla" / "copy-phase").exists()
    trained = torch.load(work / "vanilla" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    restored = torch.load(installed, map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(restored[name], weights.half() if weights.is_floating_point() else weights)
               for name, weights in trained.items())
    assert "nothing to train" in run("bash", "scripts/train_vanilla.sh", work / "code", tmp_path / "vanilla", env=env)
    run("bash", "scripts/finetune_memory.sh", work / "code", installed, tmp_path / "memory",
        env={**ENV, "MEMORY_SIZE": "256", "MAX_UPDATE": "1"})
    assert (tmp_path / "memory" / "checkpoint_last.pt").is_file()

    short = run_command("bash", "scripts/train_vanilla.sh", work / "code", tmp_path / "short",
                        env={**env, "MAX_UPDATE": "100"}, check=False)  # more updates than the export holds
    assert short.returncode == 2 and "an export keeps no optimizer state" in short.stderr
    assert "Traceback" not in short.stderr and not (tmp_path / "short" / "copy-phase").exists()

    other = tmp_path / "other"  # the same export beside another vocabulary
    shutil.copytree(exported, other)
    lines = (other / "dict.txt").read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    (other / "dict.txt").write_text("\n".join(lines) + "\n")
    result = run_command("bash", "scripts/train_vanilla.sh", work / "code", tmp_path / "refused",
                         env={**ENV, "VANILLA_FROM": str(other / "vanilla.pt")}, check=False)
    assert result.returncode == 2 and "was trained with another dict.txt" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "refused").exists()
