from .knn_memory import KNNMemory, Retrieval, memory_bytes  # noqa: F401
from .bank import MemoryBank  # noqa: F401
from . import faiss_search  # noqa: F401  (registers the faiss-* search backends)
