"""Datasets of the ``document_lm`` task: the documents of a split, and the
streams that read them in order, one stream per batch row."""

from .distant_repeats import DistantRepeats  # noqa: F401
from .document_streams import DocumentStreamDataset, StreamLayout, assign_streams  # noqa: F401
from .documents import DocumentDataset  # noqa: F401
