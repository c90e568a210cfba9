"""fairseq-memtrm: Memorizing Transformers as a fairseq ``--user-dir`` plugin.

Importing the package fills fairseq's registries: the ``memorizing_transformer_lm``
model and archs, and the ``document_lm`` task.
"""

from . import models, tasks  # noqa: F401
