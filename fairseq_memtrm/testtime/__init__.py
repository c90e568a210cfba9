"""Test-time baselines beside the kNN memory, on the same ``document_lm`` streams (issue #19).

* :mod:`.scoring`: the per-token scoring loop every method shares, and the static
  (vanilla) scorer;
* :mod:`.dynamic_eval`: dynamic evaluation (Krause et al. 2018, 2019): gradient
  steps on each scored segment, per stream, weights restored at document starts;
* :mod:`.neural_cache`: the neural cache (Grave et al. 2017) over a per-stream
  :class:`~fairseq_memtrm.memory.KNNMemory`;
* :mod:`.knn_lm`: kNN-LM (Khandelwal et al. 2020): a datastore of the train
  split's (final hidden state, next token) searched with faiss;
* :mod:`.cache_knnlm`: the cache and kNN-LM in one three-way interpolation.

Every method is a *scorer*: ``scorer.score(sample)`` takes one ``document_lm``
batch and returns ``{run name: (B, T) loss in nats}`` (0 at padding), and
``scorer.extra_bytes()`` is the memory it holds beside the model.
``scripts/eval_testtime.py`` runs them and writes the reports.
"""

from .scoring import StaticScorer, planted_passage_losses, score_streams, target_nll  # noqa: F401
from .dynamic_eval import DynamicEvaluator, gradient_rms  # noqa: F401
from .neural_cache import NeuralCache  # noqa: F401
from .knn_lm import KNNLM, build_datastore  # noqa: F401
from .cache_knnlm import CacheKNNLM, mix3  # noqa: F401
