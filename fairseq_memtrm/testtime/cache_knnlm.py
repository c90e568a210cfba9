"""The neural cache and kNN-LM together: one three-way interpolation.

For a token with a cache (an earlier position of its document) and kNN-LM
neighbours (the train split's datastore)::

    p(w) = (1 - lambda_c - lambda_k) p_model(w) + lambda_c p_cache(w) + lambda_k p_knn(w)

and ``(1 - lambda_k) p_model + lambda_k p_knn`` where the cache holds nothing (a
document's first token). The cache brings the document's own recent words, the
datastore the train split's contexts; Khandelwal et al. (2020) report that the two
add up on Wikitext-103. Both read one forward pass of the model per batch. One run per pair of ``cache_lambdas`` x
``knnlm_lambdas`` whose sum is below 1, all from one pass.
"""

from typing import Dict, List, Tuple

import torch
from torch import Tensor

from fairseq_memtrm.errors import MemtrmUserError

from .neural_cache import log_weight
from .scoring import features_and_nll


def mix3(model_nll: Tensor, cache_logp: Tensor, has_cache: Tensor, knn_logp: Tensor,
         lambda_cache: float, lambda_knn: float) -> Tensor:
    """-log p of the three-way mixture (module docstring); every argument (B, T)."""
    with_cache = torch.logsumexp(torch.stack([
        log_weight(1 - lambda_cache - lambda_knn) - model_nll, log_weight(lambda_cache) + cache_logp,
        log_weight(lambda_knn) + knn_logp]), dim=0)
    without = torch.logaddexp(log_weight(1 - lambda_knn) - model_nll, log_weight(lambda_knn) + knn_logp)
    return -torch.where(has_cache, with_cache, without)


class CacheKNNLM:
    """Scores batches with :class:`~.neural_cache.NeuralCache` and :class:`~.knn_lm.KNNLM`
    mixed (module docstring); both must wrap the same model. Their own lambdas are
    the grids the pairs are drawn from."""

    def __init__(self, cache, knnlm, name: str = "cache+knnlm"):
        if cache.model is not knnlm.model:
            raise ValueError("the cache and kNN-LM must score the same model")
        self.cache, self.knnlm, self.model, self.name = cache, knnlm, cache.model, name
        self.pairs: List[Tuple[float, float]] = [(c, k) for c in cache.lambdas for k in knnlm.lambdas if c + k < 1]
        if not self.pairs:
            raise MemtrmUserError(f"no --cache-lambda and --knnlm-lambda pair sums below 1 "
                                  f"({cache.lambdas} x {knnlm.lambdas})")

    def run_names(self) -> List[str]:
        return [f"{self.name} lambda={c:g},{k:g}" for c, k in self.pairs]

    def extra_bytes(self) -> int:
        return self.cache.extra_bytes() + self.knnlm.extra_bytes()

    def score(self, sample) -> Dict[str, Tensor]:
        with torch.no_grad():
            forward = features_and_nll(self.model, sample)
        cached = self.cache.cache_scores(sample, forward)
        _, knn_logp, _, _ = self.knnlm.knn_scores(sample, forward)
        real = sample["target"].ne(self.model.decoder.padding_idx)
        return {name: mix3(cached.model_nll, cached.cache_logp, cached.has_cache, knn_logp, c, k).masked_fill(~real, 0.0)
                for name, (c, k) in zip(self.run_names(), self.pairs)}
