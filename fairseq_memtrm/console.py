"""What the plugin's commands print: fairseq's log format, without the pinned stack's noise.

fairseq 0.12's ``fairseq/models/wav2vec/wav2vec2_classification.py`` calls
``logging.basicConfig(level=logging.DEBUG)`` when fairseq is imported. Every later
``basicConfig`` (fairseq_cli's own, which asks for INFO, ``LOGLEVEL`` and fairseq's
``date | LEVEL | name | message`` lines on stdout) is then a no-op: ``fairseq-train`` and
``fairseq-eval-lm`` log in Python's bare ``LEVEL:name:message`` form at DEBUG, faiss's
loader prints its search for a CPU-specific library, and hydra adds DEBUG lines.
:func:`repair_fairseq_logging` (run when the plugin is imported) restores what
fairseq_cli asks for, only when the root logger is still in exactly that state.

The pinned versions (fairseq 0.12, hydra 1.0, torch 2.13) also warn, on every run, about
APIs that this project cannot change: hydra's deprecated compose options, the data
loader's ``pin_memory`` on a machine without an accelerator, and the mixed mask types of
fairseq's attention. :data:`PINNED_STACK_WARNINGS` lists them; nothing else is silenced.
"""

import logging
import os
import sys
import warnings

FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"  # fairseq_cli's
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

#: (message regex, category) of warnings that the pinned stack raises on every run and no
#: user can act on.
PINNED_STACK_WARNINGS = (
    (r"hydra\.experimental\.(initialize|compose)\(\) is no longer experimental", UserWarning),
    (r"\s*The version_base parameter is not specified", UserWarning),
    (r"In 'config': Usage of deprecated keyword in package header", UserWarning),
    (r"\s*'config' is validated against ConfigStore schema", UserWarning),
    (r"\s*The strict flag in the compose API is deprecated", UserWarning),
    (r"'pin_memory' argument is set as true but no accelerator is found", UserWarning),
    (r"Support for mismatched key_padding_mask and attn_mask is deprecated", UserWarning),
)

#: Loggers whose INFO lines describe the libraries' own loading, not the run.
NOISY_LOGGERS = ("faiss.loader", "hydra")


def silence_pinned_stack() -> None:
    for message, category in PINNED_STACK_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _left_by_fairseq_import(root: logging.Logger) -> bool:
    """The root logger as wav2vec2_classification's ``basicConfig(level=DEBUG)`` leaves it."""
    if root.level != logging.DEBUG or len(root.handlers) != 1:
        return False
    handler = root.handlers[0]
    return (type(handler) is logging.StreamHandler and handler.stream is sys.stderr
            and handler.formatter is not None and handler.formatter._fmt == logging.BASIC_FORMAT)


def repair_fairseq_logging() -> None:
    """fairseq_cli's logging (INFO or ``$LOGLEVEL``, its format, stdout), if fairseq's import took it."""
    if _left_by_fairseq_import(logging.getLogger()):
        configure_logging(os.environ.get("LOGLEVEL", "INFO").upper())
    silence_pinned_stack()


def configure_logging(level=logging.INFO, fmt: str = FORMAT, stream=None) -> None:
    """A script's logging: fairseq's line format at ``level`` on ``stream`` (stdout; stderr for a
    script whose stdout is its result), replacing any earlier set-up."""
    logging.basicConfig(format=fmt, datefmt=DATE_FORMAT, level=level, stream=stream or sys.stdout, force=True)
    for name in ("matplotlib", "PIL"):  # NOISY_LOGGERS were silenced when the package was imported
        logging.getLogger(name).setLevel(logging.WARNING)
