"""fairseq-memtrm: Memorizing Transformers as a fairseq ``--user-dir`` plugin.

Importing the package fills fairseq's registries: the ``memorizing_transformer_lm``
model and archs, and the ``document_lm`` task; and makes fairseq's copy to
``checkpoint_last.pt`` atomic and its unreadable checkpoints one sentence
(``fairseq_patches``).
"""

from . import fairseq_patches, models, tasks  # noqa: F401

fairseq_patches.install()
