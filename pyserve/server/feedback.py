"""User feedback on responses, kept durably in SQLite and exportable as JSONL for fine-tuning sets."""

import json
import sqlite3
import threading
import time
from pathlib import Path


class FeedbackStore:
    """One table, one row per rating; writes are serialised and committed at once."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("""CREATE TABLE IF NOT EXISTS feedback (
            id INTEGER PRIMARY KEY AUTOINCREMENT, response_id TEXT NOT NULL, rating INTEGER NOT NULL,
            comment TEXT, user TEXT, model TEXT, created REAL NOT NULL)""")
        self._db.commit()

    def add(self, response_id: str, rating: int, comment: str | None = None, user: str | None = None,
            model: str | None = None) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO feedback (response_id, rating, comment, user, model, created) VALUES (?, ?, ?, ?, ?, ?)",
                (response_id, rating, comment, user, model, time.time()))
            self._db.commit()
            return cur.lastrowid

    def export_jsonl(self) -> str:
        with self._lock:
            rows = self._db.execute("SELECT id, response_id, rating, comment, user, model, created FROM feedback "
                                    "ORDER BY id").fetchall()
        keys = ("id", "response_id", "rating", "comment", "user", "model", "created")
        return "".join(json.dumps(dict(zip(keys, row))) + "\n" for row in rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()
