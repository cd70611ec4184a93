"""What the server keeps between requests and across restarts: one data directory holding a
SQLite database (records, with numbered schema migrations) and plain files (uploads, adapters).

Example:
    >>> from pyserve.store import DataDir
    >>> data = DataDir(tmp_path)                                      # doctest: +SKIP
    >>> data.completions.add(record)                                  # doctest: +SKIP
"""

import os
import tempfile
from pathlib import Path

from .completions import CompletionStore, StoredCompletion
from .database import Database
from .feedback import Feedback, FeedbackStore
from .files import FileStore, StoredFile
from .fine_tuning import Checkpoint, FineTuningJob, FineTuningStore
from .responses import ResponseStore, StoredResponse
from .vector_stores import VectorStore, VectorStoreFile, VectorStores

__all__ = ["Checkpoint", "CompletionStore", "DataDir", "Database", "Feedback", "FeedbackStore", "FileStore", "FineTuningJob",
           "FineTuningStore", "ResponseStore",
           "StoredCompletion", "StoredFile", "StoredResponse", "VectorStore", "VectorStoreFile", "VectorStores",
           "default_data_dir"]


def default_data_dir() -> Path:
    """$XDG_DATA_HOME/pyserve, or ~/.local/share/pyserve."""
    home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(home) / "pyserve"


class DataDir:
    """The server's data directory: `pyserve.sqlite3` and its stores (stored chat completions,
    responses, uploaded files under `files/`, feedback, fine-tuning jobs with their adapters under
    `fine_tuning/`, vector stores with their ANN indexes under `vector_stores/`). None keeps the records in memory and the files in a temporary folder (tests,
    and servers started from code without one)."""

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
        self.database = Database(":memory:" if self.path is None else self.path / "pyserve.sqlite3")
        self.completions = CompletionStore(self.database)
        self.responses = ResponseStore(self.database)
        # in memory: uploads and adapters go to a temporary folder, removed when this object goes (or at exit)
        self._temporary = tempfile.TemporaryDirectory(prefix="pyserve-data-") if self.path is None else None
        root = self.path if self.path is not None else Path(self._temporary.name)
        self.files = FileStore(self.database, root / "files")
        self.feedback = FeedbackStore(self.database)
        self.fine_tuning = FineTuningStore(self.database)
        self.adapters = root / "fine_tuning"  # a folder per job: its checkpoints and final adapter
        self.vector_stores = VectorStores(self.database, root / "vector_stores")

    def close(self) -> None:
        self.database.close()
        if self._temporary is not None:
            self._temporary.cleanup()
