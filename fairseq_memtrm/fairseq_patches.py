"""Five small changes to fairseq 0.12, made when the plugin is imported (``--user-dir``).

Why: fairseq saves ``checkpoint_E_N.pt`` atomically (a ``.tmp`` file renamed), then
copies it to ``checkpoint_last.pt`` with a plain ``shutil.copyfile``; a run killed
during that copy leaves ``checkpoint_last.pt`` empty or truncated, and the next run
(which resumes from it) dies with an ``EOFError`` traceback. And a checkpoint that is
not one (empty, random bytes, another tool's file) ends ``--path``,
``--finetune-from-model`` or ``--restore-file`` with torch's traceback and its advice
to retry with ``weights_only=False``, wrong for a file one does not trust.

What (each only replaces a name fairseq looks up at call time, nothing else changes):

1. ``checkpoint_utils.PathManager`` (that module's name only) becomes a subclass whose
   ``copy`` of a local file writes a temporary file in the destination's folder and
   renames it over the destination (:func:`~fairseq_memtrm.checkpoint_files.copy_atomically`):
   ``checkpoint_last.pt`` is always a whole checkpoint.
2. ``checkpoint_utils.load_checkpoint_to_cpu`` becomes
   :func:`~fairseq_memtrm.checkpoint_files.load_checkpoint_to_cpu`: a file that is not a
   fairseq checkpoint raises ``BadCheckpointFile``, one sentence naming it.
3. ``distributed_utils.call_main`` (how fairseq-train and fairseq-eval-lm run their
   ``main``) ends on a plugin error by printing its one sentence and leaving at once
   with the error's exit status (1; 2 for ``BadCheckpointFile``, as the scripts'
   checks): Python's own handling of ``SystemExit`` knows only status 1, and its
   teardown, with worker threads still running, can abort with status 134. It also
   checks a distributed launch first, bounds the wait for the other ranks, and turns
   a lost peer into one sentence (:mod:`fairseq_memtrm.distributed`).
4. ``distributed_utils._broadcast_object_slow`` (rank 0 sends a resumed checkpoint's
   state to the other ranks) unpickles with ``weights_only=False``: torch >= 2.6
   refused fairseq's ``DictConfig`` there, so a resumed multi-process run died.
5. At interpreter exit (``atexit``), fairseq's data-prefetch threads
   (``iterators.BackgroundConsumer``, daemon threads that keep loading batches for a
   training or validation iterator that was stopped early, as ``--max-update`` and
   ``--max-valid-steps`` do) are told to stop and are joined. Left running, one caught
   inside a torch operator when Python's finalization ends daemon threads aborts the
   process ("terminate called without an active exception", status 134) after a run
   that succeeded.

The scripts (scripts/common.sh) also repair a broken ``checkpoint_last.pt`` left by a
run without the plugin (stock fairseq), before they train.
"""

import atexit
import multiprocessing
import os
import queue
import sys
import threading
import time

from fairseq import checkpoint_utils
from fairseq.data import iterators
from fairseq.distributed import utils as distributed_utils
from fairseq.file_io import PathManager

from fairseq_memtrm import checkpoint_files, distributed
from fairseq_memtrm.errors import MemtrmUserError


class AtomicCopyPathManager(PathManager):
    @staticmethod
    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if PathManager.path_requires_pathmanager(dst_path):  # a remote path: ioPath copies it
            return PathManager.copy(src_path, dst_path, overwrite=overwrite)
        checkpoint_files.copy_atomically(src_path, dst_path)
        return True


def _call_main(cfg, main, **kwargs):
    try:
        try:
            distributed.check_launch(cfg, main)
            with distributed.bounded_init(cfg):
                return _call_main.fairseq_original(cfg, main, **kwargs)
        except RuntimeError as error:  # a collective whose peer went away: one sentence, not a traceback
            lost = distributed.as_lost_peer(error)
            if lost is None:
                raise
            raise lost from None
    except MemtrmUserError as error:
        print(error.code, file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not SystemExit: the interpreter's teardown would then run with the data loader's
        # and the thread pools' threads still alive, which can abort ("terminate called
        # without an active exception", status 134) after the sentence was printed. The
        # data loader's worker processes go first, or they print tracebacks of their own.
        workers = multiprocessing.active_children()
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join(timeout=10)
        os._exit(error.exit_status)


def stop_background_consumers(timeout: float = 60.0) -> bool:
    """Stop fairseq's live data-prefetch threads: each leaves its loop after its next
    batch, and its queue is emptied so that no ``put`` keeps it waiting. True when all
    of them ended within ``timeout`` seconds."""
    consumers = [thread for thread in threading.enumerate()
                 if isinstance(thread, iterators.BackgroundConsumer) and thread.is_alive()]
    for consumer in consumers:
        consumer._max_len = 0  # its loop breaks after the next put
    deadline = time.monotonic() + timeout
    while consumers and time.monotonic() < deadline:
        for consumer in consumers:
            try:
                while True:
                    consumer._queue.get_nowait()
            except queue.Empty:
                pass
            consumer.join(timeout=0.01)
        consumers = [consumer for consumer in consumers if consumer.is_alive()]
    return not consumers


def install() -> None:
    """Apply the changes (once)."""
    if checkpoint_utils.PathManager is not AtomicCopyPathManager:
        checkpoint_utils.PathManager = AtomicCopyPathManager
    if not hasattr(checkpoint_utils.load_checkpoint_to_cpu, "fairseq_original"):
        checkpoint_files.load_checkpoint_to_cpu.fairseq_original = checkpoint_utils.load_checkpoint_to_cpu
        checkpoint_utils.load_checkpoint_to_cpu = checkpoint_files.load_checkpoint_to_cpu
    if not hasattr(distributed_utils.call_main, "fairseq_original"):
        _call_main.fairseq_original = distributed_utils.call_main
        distributed_utils.call_main = _call_main
    # 4. how rank 0 hands a resumed checkpoint to the other ranks (see the function)
    distributed_utils._broadcast_object_slow = distributed.broadcast_object_slow
    if not getattr(install, "exit_hook", False):
        atexit.register(stop_background_consumers)
        install.exit_hook = True
