"""User feedback on responses, kept durably in SQLite and exportable as JSONL for fine-tuning sets."""

import json
import sqlite3
import threading
import time
from pathlib import Path

from ..errors import ClientError


MAX_ROWS_PER_KEY = 100_000  # ratings one API key (tenant) may leave
MAX_DB_BYTES = 1 << 30


class FeedbackStore:
    """One table, one row per rating; writes are serialised and committed at once. Bounded: each
    tenant (API key) may leave `max_rows_per_key` rows, and the file stops growing at
    `max_bytes` (a 429 and a 507: neither is a crash, and what is stored stays)."""

    def __init__(self, path: str | Path, max_rows_per_key: int = MAX_ROWS_PER_KEY, max_bytes: int = MAX_DB_BYTES):
        self.path = str(path)
        self.max_rows_per_key, self.max_bytes = max_rows_per_key, max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("""CREATE TABLE IF NOT EXISTS feedback (
            id INTEGER PRIMARY KEY AUTOINCREMENT, response_id TEXT NOT NULL, rating INTEGER NOT NULL,
            comment TEXT, user TEXT, model TEXT, created REAL NOT NULL)""")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(feedback)")}
        if "tenant" not in columns:  # files written before ratings were counted per key
            self._db.execute("ALTER TABLE feedback ADD COLUMN tenant TEXT")
        self._db.execute("CREATE INDEX IF NOT EXISTS feedback_tenant ON feedback (tenant)")
        self._db.commit()

    def add(self, response_id: str, rating: int, comment: str | None = None, user: str | None = None,
            model: str | None = None, tenant: str | None = None) -> int:
        with self._lock:
            rows = self._db.execute("SELECT COUNT(*) FROM feedback WHERE tenant IS ?", (tenant,)).fetchone()[0]
            if rows >= self.max_rows_per_key:
                raise ClientError(f"this API key has left {rows} ratings, the most this server keeps for one key",
                                  status=429)
            pages, page_size = (self._db.execute(f"PRAGMA {name}").fetchone()[0] for name in ("page_count",
                                                                                           "page_size"))
            if pages * page_size >= self.max_bytes:
                raise ClientError(f"the feedback store is full ({self.max_bytes} bytes); an operator must export "
                                  "and clear it", status=507)
            cur = self._db.execute(
                "INSERT INTO feedback (response_id, rating, comment, user, model, created, tenant) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (response_id, rating, comment, user, model, time.time(), tenant))
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
