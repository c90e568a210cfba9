"""Two real fairseq-train processes on gloo (legacy_ddp, CPU) training with --task document_lm:
each rank reads its own documents, as many batches as the other, keeps its own memory; the weights
stay bit-identical; only rank 0 saves; a resumed run continues the same streams; a bad launch or
a lost peer ends with one sentence, not a traceback or a hang.

Every rank writes ``--stream-log PREFIX``: one JSON line per training batch (documents, segments,
loss, a digest of the weights the batch was computed with)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fairseq.data import Dictionary, data_utils

from fairseq_memtrm.data import DocumentDataset
from lm_builders import BIN, REPO, TINY

T = 256
COMMON = ["--user-dir", "fairseq_memtrm", "--task", "document_lm", "--tokens-per-sample", str(T),
          "--batch-size", "1", "--optimizer", "adam", "--lr", "1e-3", "--seed", "3", "--dropout", "0",
          "--log-format", "simple", "--log-interval", "1", "--no-epoch-checkpoints"]
MEMORY = ["--arch", "memorizing_transformer_lm_tiny", "--memory-size", "512"]
PLAIN = ["--arch", "transformer_lm", *TINY]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
    [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_flags(rank, world, port):
    return ["--cpu", "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-world-size",
            str(world), "--distributed-rank", str(rank), "--distributed-no-spawn", "--device-id", "0",
            "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]


def start_ranks(data, args_of_rank, world=2, env=None):
    """One fairseq-train per rank, the launch given explicitly; returns the Popen objects."""
    port = free_port()
    return [subprocess.Popen([str(BIN / "fairseq-train"), str(data), *args_of_rank(rank), *launch_flags(rank, world, port)],
                             cwd=REPO, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
            for rank in range(world)]


def finish(procs, timeout=150):
    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise AssertionError("a rank hung")
    return outs


def read_log(prefix, rank):
    return [json.loads(line) for line in Path(f"{prefix}.rank{rank}.jsonl").read_text().splitlines()]


def train_segments(data):
    """Every (doc, segment) of the train split."""
    docs = DocumentDataset(data_utils.load_indexed_dataset(str(data / "train"), Dictionary.load(str(data / "dict.txt"))),
                           "train")
    return {(d, s) for d in range(len(docs)) for s in range(-(-int(docs.sizes[d]) // T))}


@pytest.fixture(scope="module")
def memory_epoch(prepared_data_bin, tmp_path_factory):
    """One epoch of the memory model on 2 ranks, each with its own save dir (only rank 0 may write)."""
    work = tmp_path_factory.mktemp("dist-memory")
    procs = start_ranks(prepared_data_bin, lambda rank: [*COMMON, *MEMORY, "--max-epoch", "1", "--save-dir",
                                                         str(work / f"save{rank}"), "--stream-log", str(work / "streams")])
    outs = finish(procs)
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-3000:]
    return work, outs


def test_ranks_read_disjoint_streams_covering_the_epoch_in_equal_batches(memory_epoch, prepared_data_bin):
    work, outs = memory_epoch
    logs = [read_log(work / "streams", rank) for rank in range(2)]
    assert len(logs[0]) == len(logs[1]) > 0, "every rank gets as many batches"
    assert [r["update"] for r in logs[0]] == list(range(len(logs[0])))
    docs = [{d for r in log for d in r["doc_id"] if d >= 0} for log in logs]
    assert docs[0] and docs[1] and not docs[0] & docs[1], f"ranks share documents: {docs}"
    read = [(d, s) for log in logs for r in log for d, s in zip(r["doc_id"], r["segment"]) if d >= 0]
    assert len(read) == len(set(read)) and set(read) == train_segments(prepared_data_bin), \
        "the two ranks together read every segment of the epoch exactly once"
    for rank, out in enumerate(outs):  # per-rank lines on every rank, rank 1's included
        assert re.search(rf"rank {rank} of 2: train streams {rank}-{rank} of 2", out), out[-3000:]
        assert re.search(rf"rank {rank} of 2: valid streams {rank}-{rank} of 2", out)
        assert re.search(rf"rank {rank}: kNN memory .* 2 rank\(s\) on this host", out)
        assert "kNN memory for stream set 'train': 1 streams" in out


def test_weights_stay_identical_and_only_rank_0_saves(memory_epoch):
    work, _ = memory_epoch
    logs = [read_log(work / "streams", rank) for rank in range(2)]
    digests = [[r["weights_sha1"] for r in log] for log in logs]
    assert digests[0] == digests[1], "the ranks' weights diverged: gradients were not synchronised"
    assert len(set(digests[0])) == len(digests[0]), "the weights must change at every update"
    assert (work / "save0" / "checkpoint_last.pt").is_file()
    assert not list((work / "save1").glob("*.pt")), "rank 1 wrote a checkpoint"


def test_resumed_run_continues_the_same_streams(memory_epoch, prepared_data_bin, tmp_path):
    """3 updates, stop, resume to 6 (the launcher, one save dir): the same documents and segments as
    the uninterrupted epoch, from the same weights (the memory restarts empty, so later losses differ)."""
    reference = [read_log(memory_epoch[0] / "streams", rank) for rank in range(2)]
    for max_update in (3, 6):
        result = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "train_distributed.py"), "--nproc", "2", "--", str(prepared_data_bin),
             *COMMON, *MEMORY, "--max-update", str(max_update), "--save-dir", str(tmp_path / "save"),
             "--stream-log", str(tmp_path / "streams"), "--disable-validation"],
            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=150)
        assert result.returncode == 0, result.stdout[-3000:]
    assert "[rank 1] " in result.stdout and "loaded checkpoint" in result.stdout.lower()
    for rank in range(2):
        resumed = read_log(tmp_path / "streams", rank)
        assert [r["update"] for r in resumed] == list(range(6))
        for got, want in zip(resumed, reference[rank][:6]):
            assert (got["doc_id"], got["segment"]) == (want["doc_id"], want["segment"])
        assert [r["weights_sha1"] for r in resumed[:4]] == [r["weights_sha1"] for r in reference[rank][:4]], \
            "the resumed run starts from the weights saved at update 3"


def first_update(out):
    line = next(line for line in out.splitlines() if "train_inner" in line and "num_updates=1," in line)
    return float(re.search(r"loss=([\d.]+)", line).group(1)), float(re.search(r"gnorm=([\d.]+)", line).group(1))


def test_plain_transformer_lm_two_ranks_match_one_process_with_the_same_global_batch(prepared_data_bin, tmp_path):
    args = [*COMMON, *PLAIN, "--max-update", "2", "--disable-validation"]
    procs = start_ranks(prepared_data_bin, lambda rank: [*args, "--save-dir", str(tmp_path / "two"),
                                                         "--stream-log", str(tmp_path / "two")])
    two = finish(procs)
    assert all(p.returncode == 0 for p in procs), two[0][-3000:] + two[1][-3000:]
    single = subprocess.run([str(BIN / "fairseq-train"), str(prepared_data_bin), *args, "--cpu", "--batch-size", "2",
                             "--save-dir", str(tmp_path / "one"), "--stream-log", str(tmp_path / "one")],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=150)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    logs = [read_log(tmp_path / "two", rank) for rank in range(2)]
    one = read_log(tmp_path / "one", 0)
    assert [r["weights_sha1"] for r in logs[0]] == [r["weights_sha1"] for r in logs[1]]
    assert not {d for r in logs[0] for d in r["doc_id"]} & {d for r in logs[1] for d in r["doc_id"]}
    # 2 ranks x 1 row read what 1 process x 2 rows reads, row for row
    assert [r0["doc_id"] + r1["doc_id"] for r0, r1 in zip(*logs)] == [r["doc_id"] for r in one]
    loss_two, gnorm_two = first_update(two[0])
    loss_one, gnorm_one = first_update(single.stdout + single.stderr)
    assert loss_two == pytest.approx(loss_one, abs=2e-3) and gnorm_two == pytest.approx(gnorm_one, rel=2e-3)


def one_sentence(result_code, out, pattern):
    assert result_code == 2, out[-3000:]
    assert "Traceback" not in out and "frame #" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(pattern, errors[0]), out[-3000:]


@pytest.mark.parametrize("case", ["c10d", "no-launch"])
def test_refused_launch_is_one_sentence(prepared_data_bin, tmp_path, case):
    args = [str(BIN / "fairseq-train"), str(prepared_data_bin), *COMMON, *MEMORY, "--max-update", "1",
            "--save-dir", str(tmp_path)]
    if case == "c10d":
        args += [*launch_flags(0, 2, free_port()), "--ddp-backend", "c10d"]
        pattern = r"--ddp-backend c10d does not run on CPU.*use --ddp-backend legacy_ddp"
    else:
        args += ["--cpu", "--distributed-world-size", "2"]
        pattern = r"--distributed-world-size 2 on CPU needs an explicit launch"
    result = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    one_sentence(result.returncode, result.stdout + result.stderr, pattern)


def test_world_size_two_with_one_process_gives_up_with_one_sentence(prepared_data_bin, tmp_path):
    procs = start_ranks(prepared_data_bin, lambda rank: [*COMMON, *MEMORY, "--max-update", "1",
                                                         "--save-dir", str(tmp_path)],
                        env={"MEMTRM_DIST_INIT_TIMEOUT": "5"})
    procs[1].kill()  # rank 1 never comes
    out = finish(procs[:1], timeout=120)[0]
    procs[1].wait()
    one_sentence(procs[0].returncode, out, r"rank 0 of 2: the other ranks did not all join .* within 5 s")


def test_a_killed_rank_ends_the_other_with_one_sentence(prepared_data_bin, tmp_path):
    procs = start_ranks(prepared_data_bin, lambda rank: [*COMMON, *PLAIN, "--tokens-per-sample", "32",
                                                         "--max-update", "5000", "--disable-validation",
                                                         "--save-dir", str(tmp_path),
                                                         "--stream-log", str(tmp_path / "streams")])
    log0 = tmp_path / "streams.rank0.jsonl"
    deadline = time.monotonic() + 120
    while not (log0.exists() and len(log0.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and procs[0].poll() is None, "rank 0 did not start training"
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    out = finish(procs[:1], timeout=60)[0]
    procs[1].wait()
    assert time.monotonic() - killed_at < 60
    assert procs[0].returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and "rank 0 of 2 lost the other ranks" in errors[0] and "resume" in errors[0]


def test_eval_lm_of_a_two_rank_checkpoint_runs_on_one_process(memory_epoch, prepared_data_bin):
    """fairseq-eval-lm never sums the ranks' scores: asked for 2 ranks it says so and scores on one,
    the same perplexity as a plain single-process run."""
    checkpoint = memory_epoch[0] / "save0" / "checkpoint_last.pt"
    command = [str(BIN / "fairseq-eval-lm"), str(prepared_data_bin), "--user-dir", "fairseq_memtrm", "--task",
               "document_lm", "--path", str(checkpoint), "--gen-subset", "valid", "--batch-size", "2",
               "--tokens-per-sample", str(T), "--cpu"]
    outs = [subprocess.run(command + extra, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=150)
            for extra in ([], ["--distributed-world-size", "2"])]
    ppl = []
    for result in outs:
        assert result.returncode == 0, result.stderr[-3000:]
        ppl.append(re.search(r"Perplexity: ([\d.]+)", result.stdout + result.stderr).group(1))
    assert ppl[0] == ppl[1]
    assert "runs on one process: --distributed-world-size 2 -> 1" in outs[1].stdout + outs[1].stderr


def test_torchrun_on_cpu_trains_two_ranks(prepared_data_bin, tmp_path):
    """fairseq's own inference of a torchrun launch divides by the GPU count; the plugin takes it from
    torchrun's environment on CPU (without it, each process trained alone)."""
    result = subprocess.run(
        [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()), str(BIN / "fairseq-train"),
         str(prepared_data_bin), *COMMON, *PLAIN, "--max-update", "2", "--disable-validation", "--cpu",
         "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", "--save-dir", str(tmp_path),
         "--stream-log", str(tmp_path / "streams")],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = [read_log(tmp_path / "streams", rank) for rank in range(2)]
    assert all(r["world"] == 2 for log in logs for r in log) and len(logs[0]) == len(logs[1]) == 2
    assert [r["weights_sha1"] for r in logs[0]] == [r["weights_sha1"] for r in logs[1]]
    assert not {d for r in logs[0] for d in r["doc_id"]} & {d for r in logs[1] for d in r["doc_id"]}
