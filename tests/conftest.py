"""Shared fixtures. ``prepared_data_bin``: a small data-bin written once per
session by ``scripts/prepare_data.py`` from a slice of real documents: the
PG-19-style books in ``../shared/data/books`` when present, else the Python
standard library's own source files (present on every machine)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOOKS = (REPO.parent / "shared" / "data" / "books").resolve()
STDLIB = Path(os.__file__).parent


def prepare_data_command(dest_dir: Path, name: str):
    """The prepare_data.py command line for a small slice (a few short documents per split)."""
    command = [sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--name", name,
               "--dest-dir", str(dest_dir), "--vocab-size", "400", "--max-chars-per-doc", "5000",
               "--max-docs-per-split", "3", "--quiet"]
    if (BOOKS / "train").is_dir():
        return command + ["--source-dir", str(BOOKS)]
    return command + ["--train", str(STDLIB / "[a-h]*.py"), "--valid", str(STDLIB / "[o-r]*.py"),
                      "--test", str(STDLIB / "[s-z]*.py")]


@pytest.fixture(scope="session")
def prepared_data_bin(tmp_path_factory) -> Path:
    dest_dir = tmp_path_factory.mktemp("data-bin")
    result = subprocess.run(prepare_data_command(dest_dir, "small"), cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, f"prepare_data.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return dest_dir / "small"
