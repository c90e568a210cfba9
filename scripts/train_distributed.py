#!/usr/bin/env python3
"""Start N fairseq-train processes on CPU that train together (gloo, legacy_ddp).

fairseq cannot infer a CPU launch (it divides by ``torch.cuda.device_count()``),
so this passes every process its launch explicitly, as docs/distributed.md
explains: ``--distributed-init-method tcp://ADDR:PORT --distributed-world-size W
--distributed-rank R --distributed-no-spawn --device-id 0 --distributed-backend
gloo --ddp-backend legacy_ddp --cpu``. Everything after the options goes to
fairseq-train as it is (the data folder first)::

    scripts/train_distributed.py --nproc 2 -- data-bin/books --user-dir fairseq_memtrm \\
        --task document_lm --arch memorizing_transformer_lm_tiny --batch-size 4 ...

Several CPU nodes: run it once per node with the same ``--nnodes``,
``--master-addr`` and ``--master-port`` and that node's ``--node-rank``.

Every line a rank prints reaches stdout prefixed ``[rank R]`` (and, with
``--log-dir``, that rank's ``rank-R.log``). When a process fails, the others
are given ``--grace`` seconds to end on their own (they stop at their next
collective with a one-sentence error) and are then terminated; the exit status
is the first failure's. Ctrl-C or SIGTERM is passed on to every process.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Start N CPU fairseq-train processes (gloo, legacy_ddp) that train together.",
        usage="%(prog)s [--nproc N] [--nnodes M --node-rank K --master-addr HOST --master-port PORT] "
              "[--log-dir DIR] -- DATA [fairseq-train args...]",
    )
    parser.add_argument("--nproc", type=int, default=2, help="processes on this node (default 2)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes in all (default 1)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1")
    parser.add_argument("--master-addr", default="127.0.0.1", help="host of rank 0 (default 127.0.0.1)")
    parser.add_argument("--master-port", type=int, default=0,
                        help="free TCP port on the master (default: one picked here; required with --nnodes > 1)")
    parser.add_argument("--log-dir", help="also write each rank's output to DIR/rank-R.log")
    parser.add_argument("--grace", type=float, default=60.0,
                        help="seconds the other ranks get to stop after one fails (default 60)")
    parser.add_argument("fairseq_args", nargs=argparse.REMAINDER, help="-- then fairseq-train's arguments")
    args = parser.parse_args(argv)
    if args.fairseq_args[:1] == ["--"]:
        args.fairseq_args = args.fairseq_args[1:]
    if not args.fairseq_args:
        parser.error("give fairseq-train's arguments after --, the data folder first")
    if args.nproc < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        parser.error("need --nproc >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes")
    if args.nnodes > 1 and not args.master_port:
        parser.error("--nnodes > 1 needs the same --master-port on every node")
    return args


def rank_command(args, rank: int, world_size: int, port: int):
    launch = ["--distributed-init-method", f"tcp://{args.master_addr}:{port}",
              "--distributed-world-size", str(world_size), "--distributed-rank", str(rank),
              "--distributed-no-spawn", "--device-id", "0"]
    # --data-buffer-size 0: batches read on the main thread, as scripts/common.sh explains
    defaults = ["--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", "--cpu", "--data-buffer-size", "0"]
    # defaults first (the user's arguments may change them), the launch last (it may not be changed)
    return [sys.executable, "-m", "fairseq_cli.train", *args.fairseq_args[:1], *defaults,
            *args.fairseq_args[1:], *launch]


def pump(stream, rank: int, log_file, lock):
    for line in iter(stream.readline, ""):
        with lock:
            sys.stdout.write(f"[rank {rank}] {line}")
            sys.stdout.flush()
            if log_file:
                log_file.write(line)
                log_file.flush()
    stream.close()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    world_size = args.nproc * args.nnodes
    port = args.master_port or free_port()
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    env = {**os.environ, "LOCAL_WORLD_SIZE": str(args.nproc)}
    env.setdefault("OMP_NUM_THREADS", "1")
    lock = threading.Lock()
    procs, pumps, logs = {}, [], []
    print(f"train_distributed: {world_size} ranks ({args.nnodes} node(s) x {args.nproc}), "
          f"tcp://{args.master_addr}:{port}", flush=True)
    for local in range(args.nproc):
        rank = args.node_rank * args.nproc + local
        log_file = open(os.path.join(args.log_dir, f"rank-{rank}.log"), "w") if args.log_dir else None
        logs.append(log_file)
        proc = subprocess.Popen(rank_command(args, rank, world_size, port), env={**env, "LOCAL_RANK": str(local)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)
        procs[rank] = proc
        thread = threading.Thread(target=pump, args=(proc.stdout, rank, log_file, lock), daemon=True)
        thread.start()
        pumps.append(thread)

    def forward(signum, frame):
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)

    status, failed_at, terminated_at = 0, None, None
    while any(proc.poll() is None for proc in procs.values()):
        for rank, proc in procs.items():
            code = proc.poll()
            if code not in (None, 0) and failed_at is None:
                status, failed_at = code, time.monotonic()
                print(f"train_distributed: rank {rank} exited with status {code}; the other ranks get "
                      f"{args.grace:.0f} s to stop", file=sys.stderr, flush=True)
        if failed_at is not None and time.monotonic() - failed_at > args.grace:
            for rank, proc in procs.items():
                if proc.poll() is None:
                    print(f"train_distributed: terminating rank {rank}", file=sys.stderr, flush=True)
                    os.killpg(proc.pid, signal.SIGTERM)
            failed_at, terminated_at = float("inf"), time.monotonic()
        if terminated_at is not None and time.monotonic() - terminated_at > 15:
            for proc in procs.values():
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
            terminated_at = float("inf")
        time.sleep(0.2)
    for thread in pumps:
        thread.join(timeout=5)
    for log_file in logs:
        if log_file:
            log_file.close()
    if not status:
        status = next((proc.returncode for proc in procs.values() if proc.returncode), 0)
    if status < 0:  # killed by a signal
        status = 128 - status
    return status


if __name__ == "__main__":
    sys.exit(main())
