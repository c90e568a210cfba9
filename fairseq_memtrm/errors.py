"""User-facing errors.

A wrong flag, a missing file or an incompatible checkpoint is the user's to fix,
not a bug: it must end the command with one clear sentence that names the fix,
not a stack trace. ``MemtrmUserError`` derives from ``SystemExit`` so that the
fairseq CLIs (which wrap model loading in ``except Exception``) let it through
and Python prints only its message.
"""


class MemtrmUserError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"fairseq-memtrm: error: {message}")
        self.message = message

    def __str__(self) -> str:
        return self.message
