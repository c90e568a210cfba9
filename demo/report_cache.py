"""Reports of the built-in samples, kept on disk so that a sample opens at once.

A report is found again only for the same model file (path, size, modification
time), the same token ids (the document as read: text, tokenizer and length
limit) and the same settings (segment length, memory size, k, layer). One
``.npz`` per report, written whole (temporary name, then rename), so a killed
app never leaves half a report. Only samples are cached: a user's pasted or
uploaded text is never written to disk.

    python demo/app.py --precompute      # read every sample once, fill the cache, exit
"""

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from demo.report import DocumentReport

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "fairseq_memtrm", "demo")
SCALARS = ("layer", "memory_size", "knn_k", "shift_keys")


class ReportCache:
    def __init__(self, folder: str = DEFAULT_CACHE_DIR):
        self.folder = Path(folder)

    def key(self, checkpoint: str, token_ids, **settings) -> str:
        status = os.stat(checkpoint)
        ids = np.ascontiguousarray(np.asarray(token_ids, dtype=np.int64))
        blob = json.dumps([os.path.abspath(checkpoint), status.st_size, status.st_mtime_ns,
                           hashlib.sha256(ids.tobytes()).hexdigest(), settings], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def has(self, key: str) -> bool:
        return (self.folder / f"{key}.npz").is_file()

    def get(self, key: str, stream_id: str) -> Optional[DocumentReport]:
        path = self.folder / f"{key}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path) as stored:
                arrays = {name: stored[name] for name in stored.files}
        except (OSError, ValueError) as error:  # a damaged file: read the document again
            logger.warning("ignoring the cached report %s: %s", path, error)
            return None
        scalars = json.loads(str(arrays.pop("scalars")))
        return DocumentReport(**arrays, **scalars, stream_id=stream_id)

    def put(self, key: str, report: DocumentReport) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fields = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
            arrays = {name: value for name, value in fields.items() if isinstance(value, np.ndarray)}
            scalars = {name: fields[name] if name != "shift_keys" else bool(fields[name]) for name in SCALARS}
            temporary = self.folder / f"{key}.tmp-{os.getpid()}.npz"
            np.savez(temporary, scalars=json.dumps(scalars), **arrays)
            os.replace(temporary, self.folder / f"{key}.npz")
        except OSError as error:  # a read-only or full disk costs speed, not the answer
            logger.warning("could not cache the report in %s: %s", self.folder, error)
