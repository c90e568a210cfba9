"""fairseq-memtrm: Memorizing Transformers as a fairseq ``--user-dir`` plugin.

Importing the package fills fairseq's registries: the ``memorizing_transformer_lm``
model and archs, and the ``document_lm`` task; makes fairseq's copy to
``checkpoint_last.pt`` atomic and its unreadable checkpoints one sentence
(``fairseq_patches``); and gives fairseq's commands back their log format without the
pinned libraries' noise (``console``).
"""

import fairseq  # noqa: F401  (its import is what leaves the root logger at DEBUG)

from . import console

console.repair_fairseq_logging()

from . import fairseq_patches, models, tasks  # noqa: E402,F401

fairseq_patches.install()
