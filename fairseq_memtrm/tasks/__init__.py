"""Tasks of the plugin; importing them registers them with fairseq."""

from . import document_lm  # noqa: F401
from . import repeat_lm  # noqa: F401
