"""Launch checks for fairseq's own distributed training (docs/distributed.md).

fairseq-train and fairseq-eval-lm run their ``main`` through
``distributed_utils.call_main``; ``fairseq_patches`` makes the plugin's
version call :func:`check_launch` first and :func:`bounded_init` around it,
so that a launch that cannot work ends with one sentence and exit status 2
instead of a traceback or a hang:

- ``--distributed-world-size N`` on CPU without an explicit launch: fairseq
  infers CPU launches from ``torch.cuda.device_count()`` (it divides by it
  under torchrun, and starts no process at all otherwise). Under torchrun the
  launch is filled in from its environment (``RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``) instead; otherwise the error names the
  flags and ``scripts/train_distributed.py``.
- ``--ddp-backend c10d``/``pytorch_ddp`` on CPU: fairseq hands
  ``DistributedDataParallel`` the GPU index ``--device-id``, which torch
  refuses for CPU modules (for every model); ``legacy_ddp`` works.
- ``c10d`` on GPU with a memory model and without ``--find-unused-parameters``:
  the memory gate and temperature get no gradient while a row's memory is
  empty (every first segment), and torch's DDP stops at the next update.
- a rank whose peers never come (world size 2, one process started): the
  rendezvous waits ``MEMTRM_DIST_INIT_TIMEOUT`` seconds (default 300), not
  torch's 30 minutes; collectives keep torch's 30-minute timeout.
- ``fairseq-eval-lm --task document_lm`` on several ranks (its default on a
  machine with several GPUs): it runs on one process instead, since fairseq
  would print each rank's own perplexity and never their sum.
- a peer that dies mid-run (its sockets close): the other ranks stop at their
  next collective with one sentence (exit 1) saying how to resume.
"""

import contextlib
import datetime
import inspect
import logging
import os
import re
from typing import Optional

import torch

from fairseq_memtrm.errors import MemtrmUserError

logger = logging.getLogger(__name__)

INIT_TIMEOUT_ENV = "MEMTRM_DIST_INIT_TIMEOUT"
TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


class LaunchError(MemtrmUserError):
    """A distributed launch that cannot work: exit status 2, as a bad command line."""

    exit_status = 2


class LostPeerError(MemtrmUserError):
    """Another rank went away in the middle of training."""


def rank_and_world() -> tuple:
    """(rank, world size) of torch.distributed, or (0, 1) when it is not initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _model_reads_streams(cfg) -> bool:
    """Whether ``cfg``'s model has a kNN memory (its forward takes ``doc_start``)."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    model_cfg = getattr(cfg, "model", None)
    arch = getattr(model_cfg, "arch", None) or getattr(model_cfg, "_name", None)
    cls = ARCH_MODEL_REGISTRY.get(arch)
    return cls is not None and "doc_start" in inspect.signature(cls.forward).parameters


def check_launch(cfg, main=None) -> None:
    """Refuse (exit 2) or complete a launch before fairseq acts on it; see the module doc."""
    dt = cfg.distributed_training
    if getattr(cfg.common, "tpu", False):
        return
    on_cpu = bool(cfg.common.cpu) or not torch.cuda.is_available()
    eval_lm = getattr(main, "__module__", "") == "fairseq_cli.eval_lm"
    if (on_cpu and not eval_lm and dt.distributed_init_method is None
            and all(key in os.environ for key in TORCHRUN_ENV) and int(os.environ["WORLD_SIZE"]) > 1):
        # torchrun (or torch.distributed.launch) on CPU: take its launch as it is (fairseq's
        # inference divides by the GPU count, and its default world size on CPU is 1).
        dt.distributed_init_method = "env://"
        dt.distributed_world_size = int(os.environ["WORLD_SIZE"])
        dt.distributed_rank = int(os.environ["RANK"])
        dt.distributed_no_spawn = True
        dt.device_id = 0
    world = dt.distributed_world_size or 1
    if world <= 1:
        return
    if eval_lm and getattr(cfg.task, "_name", "") == "document_lm":
        # fairseq-eval-lm shards the streams over the ranks but never sums their scores: each rank
        # would print the perplexity of its own streams. Its world size defaults to the GPU count.
        logger.warning("fairseq-eval-lm with --task document_lm runs on one process: --distributed-world-size "
                       "%d -> 1 (each rank would report only its own streams' perplexity)", world)
        dt.distributed_world_size = 1
        dt.distributed_init_method = None
        return
    ddp = str(dt.ddp_backend)
    if on_cpu:
        if dt.distributed_init_method is None:
            raise LaunchError(
                f"--distributed-world-size {world} on CPU needs an explicit launch, one process per rank: "
                "scripts/train_distributed.py --nproc N -- ARGS, torchrun, or per process "
                "--distributed-init-method tcp://HOST:PORT --distributed-rank R --distributed-no-spawn "
                "--device-id 0 --distributed-backend gloo --ddp-backend legacy_ddp"
            )
        if not dt.distributed_no_spawn:
            raise LaunchError(
                "on CPU fairseq spawns one process per GPU, i.e. none: add --distributed-no-spawn and start "
                "one process per rank (scripts/train_distributed.py does)"
            )
        if dt.distributed_rank is None or not 0 <= dt.distributed_rank < world:
            raise LaunchError(f"give every process its own --distributed-rank, 0 to {world - 1}")
        if dt.distributed_backend != "gloo":
            raise LaunchError(
                f"--distributed-backend {dt.distributed_backend} does not run on CPU: use "
                "--distributed-backend gloo"
            )
        if ddp in ("c10d", "pytorch_ddp"):
            raise LaunchError(
                f"--ddp-backend {ddp} does not run on CPU (fairseq gives torch's DistributedDataParallel the "
                "GPU index --device-id, which it refuses for CPU modules): use --ddp-backend legacy_ddp"
            )
    elif ddp in ("c10d", "pytorch_ddp") and not dt.find_unused_parameters and _model_reads_streams(cfg):
        raise LaunchError(
            f"--ddp-backend {ddp} with a kNN-memory model needs --find-unused-parameters (the memory gate "
            "and temperature get no gradient while a row's memory is empty); add it, or use "
            "--ddp-backend legacy_ddp"
        )


def init_timeout() -> datetime.timedelta:
    value = os.environ.get(INIT_TIMEOUT_ENV, "300")
    try:
        seconds = float(value)
    except ValueError:
        raise LaunchError(f"{INIT_TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def bounded_init(cfg):
    """Within it, torch.distributed's rendezvous gives up after ``init_timeout()``
    with one sentence; the process group then gets torch's default timeout back."""
    original = torch.distributed.init_process_group
    dt = cfg.distributed_training

    def init_process_group(*args, timeout: Optional[datetime.timedelta] = None, **kwargs):
        wait = init_timeout()
        try:
            with held_stderr() as held:  # torch's C++ retries print stack frames while it waits
                original(*args, timeout=wait, **kwargs)
                held.keep = True
        except (RuntimeError, ValueError, TimeoutError) as error:
            raise LaunchError(
                f"rank {dt.distributed_rank} of {dt.distributed_world_size}: the other ranks did not all join "
                f"{dt.distributed_init_method} within {wait.total_seconds():.0f} s ({first_line(error)}); start "
                f"one process per rank, each with its own --distributed-rank (scripts/train_distributed.py "
                f"does), or raise {INIT_TIMEOUT_ENV}"
            ) from None
        from torch.distributed import distributed_c10d

        distributed_c10d._set_pg_timeout(timeout or distributed_c10d.default_pg_timeout, None)

    torch.distributed.init_process_group = init_process_group
    try:
        yield
    finally:
        torch.distributed.init_process_group = original


@contextlib.contextmanager
def held_stderr():
    """File descriptor 2 goes to a temporary file; written back on exit if ``.keep`` was set."""
    import sys
    import tempfile

    class Held:
        keep = False

    held = Held()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buffer:
        os.dup2(buffer.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if held.keep:
                buffer.seek(0)
                text = buffer.read()
                if text:
                    os.write(2, text)


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", lines[0]) if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def as_lost_peer(error: BaseException) -> Optional[LostPeerError]:
    """The one-sentence error for a collective that failed because another rank
    went away, or None for any other error (which keeps its traceback)."""
    rank, world = rank_and_world()
    if world <= 1 or not isinstance(error, RuntimeError):
        return None
    text = str(error)
    markers = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout",
               "Timed out waiting", "timed out", "DistBackendError", "Gloo")
    if not isinstance(error, torch.distributed.DistError) and not any(m in text for m in markers):
        return None
    return LostPeerError(
        f"rank {rank} of {world} lost the other ranks ({first_line(error)}): a process died or was "
        "stopped; run the same command again to resume from checkpoint_last.pt"
    )


def broadcast_object_slow(obj, src_rank, group, dist_device):
    """fairseq's ``distributed_utils._broadcast_object_slow``, receiving with
    ``weights_only=False``. fairseq sends rank 0's loaded checkpoint state (its
    ``cfg`` is an omegaconf ``DictConfig``) to the other ranks this way when a
    run resumes; torch >= 2.6 refuses that by default, so without this every
    resumed multi-process run died on rank 1. The bytes are what rank 0 of the
    same job serialised itself, after its own checked load of the file."""
    import io

    from fairseq.distributed.utils import broadcast, get_rank

    if get_rank(group) == src_rank:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer = torch.ByteTensor(buffer.getbuffer()).to(dist_device)
        broadcast(torch.LongTensor([len(buffer)]).to(dist_device), src=src_rank, group=group)
        broadcast(buffer, src=src_rank, group=group)
        return obj
    length = torch.LongTensor([0]).to(dist_device)
    broadcast(length, src=src_rank, group=group)
    buffer = torch.ByteTensor(int(length.item())).to(dist_device)
    broadcast(buffer, src=src_rank, group=group)
    return torch.load(io.BytesIO(buffer.cpu().numpy()), map_location="cpu", weights_only=False)
