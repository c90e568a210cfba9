"""Checkpoint files that are not what they claim: one sentence, not a torch traceback.

A checkpoint can be empty or truncated (a copy or download cut short, a run killed
while fairseq copied ``checkpoint_last.pt``), not a torch file at all, or a torch
file that is no fairseq checkpoint. torch then raises ``PytorchStreamReader failed``
or an ``UnpicklingError`` whose advice (retry with ``weights_only=False``) is wrong
for a file one does not trust. :func:`checkpoint_problem` says which of these a file
is, reading it the way fairseq does here (torch's safe ``weights_only`` loader);
:func:`load_checkpoint_to_cpu` is fairseq's loader that turns an unreadable file
into :class:`~fairseq_memtrm.errors.BadCheckpointFile` (exit status 2).

From the shell (scripts/common.sh's ``checkpoint_files``; ``python -m`` works too, with a
runpy warning, since importing the package imports this module)::

    main(["check", NAME, FLAG, PATH])   # exit 2 with one sentence if PATH is no fairseq checkpoint
    main(["recover", SAVE_DIR])         # repair SAVE_DIR/checkpoint_last.pt (recover_last_checkpoint)
"""

import os
import pickle
import re
import sys
import time
import zipfile
from typing import Optional

from fairseq_memtrm.errors import BadCheckpointFile
from fairseq_memtrm.overrides import check_overrides

PICKLE_PROTOCOL_2 = b"\x80\x02"  # torch's legacy (pre-1.6, not zip) format starts with a pickle
INTERVAL_CHECKPOINT = re.compile(r"checkpoint_(\d+)_(\d+)\.pt$")  # --save-interval-updates


def damage(path: str) -> Optional[str]:
    """What is wrong with the bytes of ``path`` as a torch file (empty, not a torch
    file, truncated, damaged), or None when they are whole. Reads the file, checks
    every zip member's CRC, and unpickles nothing."""
    size = os.path.getsize(path)
    if size == 0:
        return "it is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(PICKLE_PROTOCOL_2):
        return None  # legacy format: only unpickling can tell (see checkpoint_problem)
    if head != b"PK\x03\x04":
        return "it is not a torch file (torch saves a zip archive, this file does not start like one)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return f"it is a truncated torch file ({size} bytes, its end is missing: a copy or save was cut short)"
    if bad is not None:
        return f"it is a damaged torch file (its part {bad!r} fails its checksum)"
    return None


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a fairseq checkpoint, or None when it is one (a torch file
    that torch's safe loader reads into a dict with a ``model`` entry)."""
    import torch

    if not os.path.isfile(path):
        return "there is no such file"
    problem = damage(path)
    if problem is not None:
        return problem
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not str(error).startswith("Weights only load failed"):
            return "it is a damaged torch file (it does not unpickle)"
        # torch's own advice here (weights_only=False) would run whatever code the file holds
        found = re.search(r"GLOBAL (\S+)", str(error))
        return ("torch's safe loader refuses it: it holds Python objects besides tensors and plain values"
                + (f" ({found.group(1)})" if found else ""))
    except (EOFError, RuntimeError, ValueError, OSError):
        return "it is a truncated or damaged torch file (torch cannot read it)"
    if not isinstance(state, dict):
        return f"it is a torch file holding a {type(state).__name__}, not a checkpoint's dict"
    if "model" not in state:
        return f"it is a torch file without a 'model' entry (it has {sorted(map(str, state))[:6]})"
    return None


def describe(path: str, problem: str, flag: Optional[str] = None) -> str:
    """The one sentence: ``[FLAG ]PATH is not a fairseq checkpoint: PROBLEM``."""
    return f"{flag + ' ' if flag else ''}{path} is not a fairseq checkpoint: {problem}"


def require_checkpoint(path: str, flag: Optional[str] = None) -> None:
    """Raise :class:`BadCheckpointFile` unless ``path`` is a readable fairseq checkpoint."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise BadCheckpointFile(describe(path, problem, flag))


def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False, flag: Optional[str] = None):
    """fairseq's ``checkpoint_utils.load_checkpoint_to_cpu``, but a file that is not a
    fairseq checkpoint raises :class:`BadCheckpointFile` naming it and what is wrong,
    and an override the checkpoint has no setting for is an error (``overrides``).
    The file is diagnosed only when fairseq fails, so a good checkpoint is read once."""
    from fairseq import checkpoint_utils

    load = getattr(checkpoint_utils.load_checkpoint_to_cpu, "fairseq_original", checkpoint_utils.load_checkpoint_to_cpu)
    try:
        state = load(path, arg_overrides, load_on_all_ranks)
    except Exception:
        problem = checkpoint_problem(path) if isinstance(path, str) and os.path.isfile(path) else None
        if problem is None:
            raise
        raise BadCheckpointFile(describe(path, problem, flag)) from None
    if not isinstance(state, dict) or "model" not in state:
        raise BadCheckpointFile(describe(path, "it is a torch file without a 'model' entry", flag))
    check_overrides(state, arg_overrides, path)
    return state


# ------------------------------------------------------------ checkpoint_last.pt
def copy_atomically(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` so that ``dst`` is, at every instant, either its old
    content or the whole of ``src``: write a temporary file in ``dst``'s folder, then
    rename it over ``dst`` (a rename within one file system is atomic)."""
    import shutil

    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        with open(src, "rb") as source, open(tmp, "wb") as target:
            shutil.copyfileobj(source, target, 16 << 20)
            target.flush()
            os.fsync(target.fileno())
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def recover_last_checkpoint(save_dir: str) -> Optional[str]:
    """Repair ``save_dir/checkpoint_last.pt`` when its bytes are broken (empty, truncated:
    a run killed while fairseq copied it): copy the newest whole ``checkpoint_E_N.pt``
    (highest N) over it, or, with none, move it aside so that training starts over.
    Returns the one sentence that says what was done, or None when there was nothing
    to do (no checkpoint_last.pt, or a whole one)."""
    last = os.path.join(save_dir, "checkpoint_last.pt")
    if not os.path.isfile(last):
        return None
    problem = damage(last)
    if problem is None:
        return None
    found = [(int(m.group(2)), int(m.group(1)), name) for name in os.listdir(save_dir)
             for m in [INTERVAL_CHECKPOINT.match(name)] if m]
    for updates, _, name in sorted(found, reverse=True):
        candidate = os.path.join(save_dir, name)
        if damage(candidate) is None:
            copy_atomically(candidate, last)
            return (f"{last} is unreadable ({problem}; a run was probably killed while saving it): "
                    f"resuming from {candidate}, the newest whole checkpoint ({updates} updates)")
    aside = f"{last}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(last, aside)
    return (f"{last} is unreadable ({problem}) and no whole checkpoint_*_N.pt is left to resume from: "
            f"moved it to {aside}, training starts over")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: checkpoint_files.main([check NAME FLAG PATH | recover SAVE_DIR])"
    if argv[:1] == ["check"] and len(argv) == 4:
        name, flag, path = argv[1:]
        problem = checkpoint_problem(path)
        if problem is not None:
            print(f"{name}: error: {describe(path, problem, flag)}", file=sys.stderr)
            return 2
        return 0
    if argv[:1] == ["recover"] and len(argv) == 2:
        message = recover_last_checkpoint(argv[1])
        if message:
            print(message, file=sys.stderr)
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
