from .knn_attention import KNNAugmentedAttention  # noqa: F401
