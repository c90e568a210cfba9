"""scripts/bench_memory.py end to end, at toy size: the rows it promises, recall
measured against exact search, and one-sentence errors."""

import json
import sys

import pytest
from lm_builders import REPO, TINY, build, run_command, save_checkpoint

MEMORIZING = ["--memory-size", "64", "--knn-k", "4", "--memory-layers", "1"]
SIZES = (700, 1400)  # both above faiss-ivf's training threshold of 39 * nlist = 624 keys
TOY = ["--segment", "32", "--knn-k", "4", "--repeats", "1", "--warmup", "0", "--recall-segments", "2",
       "--threads", "1", "--profile-size", "0", "--memory-sizes", ",".join(map(str, SIZES))]


def bench_memory(*args, check=True):
    return run_command(sys.executable, REPO / "scripts" / "bench_memory.py", *args, check=check, timeout=600)


@pytest.fixture(scope="module")
def memorizing_checkpoint(prepared_data_bin, tmp_path_factory):
    cfg, _, model = build(prepared_data_bin, "memorizing_transformer_lm", [*TINY, *MEMORIZING])
    path = tmp_path_factory.mktemp("bench") / "memorizing.pt"
    save_checkpoint(cfg, model, path)
    return path


def test_checkpoint_run_reports_every_row_and_full_probe_ivf_recalls_everything(
        prepared_data_bin, memorizing_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    bench_memory("--checkpoint", memorizing_checkpoint, "--data", prepared_data_bin, *TOY,
                 "--backends", "exact,faiss-ivf:nlist=16", "--ivf-nprobe", "2,16", "--output", out)
    report = json.loads(out.read_text())
    assert report["model"]["heads"] == 4 and report["model"]["head_dim"] == 8 and report["model"]["layers"] == 3
    rows = {(r["memory_size"], r["backend"], r["options"].get("nprobe")): r for r in report["search"]}
    assert set(rows) == {(size, backend, nprobe) for size in SIZES
                         for backend, nprobe in (("naive", None), ("exact", None),
                                                 ("faiss-ivf:nlist=16", 2), ("faiss-ivf:nlist=16", 16))}
    for size in SIZES:
        # probing all 16 lists scans every key: exact search's answers
        assert rows[size, "faiss-ivf:nlist=16", 16]["recall"] == pytest.approx(1.0)
        assert rows[size, "faiss-ivf:nlist=16", 2]["recall"] <= rows[size, "faiss-ivf:nlist=16", 16]["recall"]
        assert 0 < rows[size, "faiss-ivf:nlist=16", 2]["recall"]
        assert rows[size, "exact", None]["estimated_bytes_per_stream"] < \
            rows[size, "faiss-ivf:nlist=16", 2]["estimated_bytes_per_stream"]  # IVF keeps its own copy
    steps = {(s["memory_size"], s["backend"]): s for s in report["steps"]}
    evals = {(e["memory_size"], e["backend"]): e for e in report["eval"]}
    expected = {(size, backend) for size in SIZES for backend in ("exact", "faiss-ivf:nlist=16")}
    assert set(steps) == expected and set(evals) == expected
    for step in steps.values():
        assert step["step_s"] > 0 and step["vanilla_step_s"] > 0
        assert step["relative_to_vanilla"] == pytest.approx(step["step_s"] / step["vanilla_step_s"], rel=1e-6)
    for result in evals.values():
        assert result["tokens_per_s_relative_to_vanilla"] == pytest.approx(
            result["eval_tokens_per_s"] / result["vanilla_eval_tokens_per_s"], rel=1e-6)
    assert str(memorizing_checkpoint) in report["corpus"]


def test_step_split_accounts_for_the_memory_time_inside_a_step(prepared_data_bin, memorizing_checkpoint, tmp_path):
    """``--step-split``: the backend's search is part of the memory's search, both part of
    the step; with cached searches the step is timed again against the vanilla's."""
    out = tmp_path / "split.json"
    bench_memory("--checkpoint", memorizing_checkpoint, "--data", prepared_data_bin, *TOY, "--memory-sizes", "700",
                 "--backends", "exact", "--step-split", "--output", out)
    (step,) = json.loads(out.read_text())["steps"]
    split = step["split"]
    assert 0 < split["backend_search"] < step["step_s"] * 2  # one step's worth, not a sum over steps
    assert split["gather_and_rest_of_search"] >= 0 and split["memory_add"] > 0
    assert split["backend_search"] + split["gather_and_rest_of_search"] + split["memory_add"] < 2 * step["step_s"]
    assert split["cached_search_relative_to_vanilla"] == pytest.approx(
        split["cached_search_step_s"] / split["cached_search_vanilla_step_s"], rel=1e-6)


def test_captured_keys_saved_and_loaded_give_the_same_search_answers(tmp_path):
    saved, first, second = tmp_path / "captured.pt", tmp_path / "first.json", tmp_path / "second.json"
    byte_model = ["--layers", "1", "--embed-dim", "32", "--heads", "4", "--train-updates", "2", "--corpus", "stdlib",
                  "--skip-steps", "--backends", "exact,faiss-ivf:nlist=16", "--ivf-nprobe", "2"]
    bench_memory(*TOY, *byte_model, "--save-captured", saved, "--output", first)
    bench_memory(*TOY, *byte_model, "--load-captured", saved, "--output", second)
    recalls = [{(r["memory_size"], r["backend"]): r["recall"] for r in json.loads(path.read_text())["search"]}
               for path in (first, second)]
    assert recalls[0] == recalls[1]
    assert json.loads(second.read_text())["steps"] == []  # --skip-steps


def test_a_missing_checkpoint_is_one_sentence(prepared_data_bin, tmp_path):
    result = bench_memory("--checkpoint", tmp_path / "nowhere.pt", "--data", prepared_data_bin, *TOY,
                          "--output", tmp_path / "out.json", check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("bench_memory.py: error:") and "nowhere.pt" in last_line
    assert not (tmp_path / "out.json").exists()
