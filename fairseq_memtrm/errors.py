"""User-facing errors.

A wrong flag, a missing file or an incompatible checkpoint is the user's to fix,
not a bug: it must end the command with one clear sentence that names the fix,
not a stack trace. ``MemtrmUserError`` derives from ``SystemExit`` so that the
fairseq CLIs (which wrap model loading in ``except Exception``) let it through
and Python prints only its message (exit status 1). An error whose
``exit_status`` is not 1 (``BadCheckpointFile``: 2, a bad input file, as the
scripts' own checks) keeps it where the plugin's entry points print it: the
fairseq CLIs (``fairseq_patches``), ``demo/app.py``, ``checkpoint_files.main``
(scripts/common.sh).
"""


class MemtrmUserError(SystemExit):
    exit_status = 1

    def __init__(self, message: str):
        super().__init__(f"fairseq-memtrm: error: {message}")
        self.message = message

    def __str__(self) -> str:
        return self.message


class BadCheckpointFile(MemtrmUserError):
    """A file given as a checkpoint is empty, truncated, not a torch file or not a fairseq checkpoint."""

    exit_status = 2


def run_script(main, prog: str, status: int = 2) -> None:
    """Run a script's ``main()``; a :class:`MemtrmUserError` ends it with one line,
    ``PROG: error: MESSAGE``, and exit ``status`` (2, a bad input, as argparse's)."""
    import sys

    try:
        main()
    except MemtrmUserError as error:
        print(f"{prog}: error: {error.message}", file=sys.stderr)
        sys.exit(status)


def check_repeat_flags(flag: str, prob: float, min_len: int, max_len: int) -> None:
    """The flags of a repeated-span curriculum (``--FLAG-prob``, ``--FLAG-min-len``, ``--FLAG-max-len``)."""
    if not 0.0 <= prob <= 1.0:
        raise MemtrmUserError(f"--{flag}-prob must lie in [0, 1], got {prob}")
    if not 2 <= min_len <= max_len:
        raise MemtrmUserError(f"--{flag}-min-len {min_len} / --{flag}-max-len {max_len}: need 2 <= min <= max")
