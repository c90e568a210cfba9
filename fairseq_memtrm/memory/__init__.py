from .knn_memory import KNNMemory, Retrieval, memory_bytes  # noqa: F401
from .bank import MemoryBank  # noqa: F401
