from . import memorizing_transformer_lm  # noqa: F401
