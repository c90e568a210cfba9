from .store import MemoryStore, Retrieval, StoredEntries  # noqa: F401  (the interface every store implements)
from .knn_memory import KNNMemory, memory_bytes  # noqa: F401
from .chunked_memory import ChunkedKNNMemory  # noqa: F401
from .bank import MemoryBank  # noqa: F401
from . import faiss_search  # noqa: F401  (registers the faiss-* search backends)
from .bank import StreamSetBank  # noqa: F401
from .matrix_memory import MatrixMemory, MatrixMemoryBank  # noqa: F401
