"""``option(default, help)``: one flag of a ``FairseqDataclass`` config, written
in one expression.

fairseq turns every dataclass field into a command-line flag whose help text is
``metadata["help"]``; ``option`` is ``field(default=..., metadata={"help": ...})``
without the boilerplate, so that a config reads as a list of flags::

    @dataclass
    class MyConfig(FairseqDataclass):
        memory_size: int = option(65536, "tokens of kNN memory per stream")
"""

from dataclasses import field
from typing import Any


def option(default: Any, help: str) -> Any:
    """A dataclass field: the flag's default and its help text."""
    return field(default=default, metadata={"help": help})
