"""Tasks of the plugin; importing them registers them with fairseq."""

from . import document_lm  # noqa: F401
