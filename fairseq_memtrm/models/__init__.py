from . import memorizing_transformer_lm  # noqa: F401
from . import longmem_sidenet_lm  # noqa: F401
from . import gptm_lm  # noqa: F401
