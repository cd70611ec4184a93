"""The SQLite database of a data directory: WAL mode, every write committed before the request
that made it is answered (so a server killed between two requests, SIGKILL included, loses
nothing), and numbered schema migrations applied in order at open.

A migration is appended to MIGRATIONS, never edited: a file that has applied migrations 1..k
applies k+1.. when a newer server opens it.
"""

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MIGRATIONS: list[str] = [
    # 1: stored chat completions (OpenAI's `store: true`)
    """CREATE TABLE chat_completions (
        id TEXT PRIMARY KEY, tenant TEXT, model TEXT NOT NULL, created INTEGER NOT NULL,
        request_messages TEXT NOT NULL, completion TEXT NOT NULL, metadata TEXT NOT NULL);
       CREATE INDEX chat_completions_by_tenant ON chat_completions (tenant, model);""",
    # 2: stored responses (the Responses API's `store`, for previous_response_id)
    """CREATE TABLE responses (
        id TEXT PRIMARY KEY, tenant TEXT, created INTEGER NOT NULL, response TEXT NOT NULL,
        input_items TEXT NOT NULL);""",
    # 3: uploaded files (their bytes are plain files beside the database)
    """CREATE TABLE files (
        id TEXT PRIMARY KEY, tenant TEXT, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL);""",
    # 4: ratings of answers, with corrections (POST /v1/feedback)
    """CREATE TABLE feedback (
        id INTEGER PRIMARY KEY AUTOINCREMENT, response_id TEXT NOT NULL, rating INTEGER NOT NULL, comment TEXT,
        correction TEXT, user TEXT, model TEXT, tenant TEXT, created REAL NOT NULL);
       CREATE INDEX feedback_by_tenant ON feedback (tenant);""",
    # 5: fine-tuning jobs (the job object as JSON, its status apart for the restart's queries), their
    # events and their checkpoints
    """CREATE TABLE fine_tuning_jobs (
        id TEXT PRIMARY KEY, tenant TEXT, status TEXT NOT NULL, created_at INTEGER NOT NULL, job TEXT NOT NULL);
       CREATE TABLE fine_tuning_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL, level TEXT NOT NULL,
        message TEXT NOT NULL, type TEXT NOT NULL, data TEXT);
       CREATE INDEX fine_tuning_events_by_job ON fine_tuning_events (job_id);
       CREATE TABLE fine_tuning_checkpoints (
        id TEXT PRIMARY KEY, job_id TEXT NOT NULL, created_at INTEGER NOT NULL, step INTEGER NOT NULL,
        model TEXT NOT NULL, metrics TEXT NOT NULL, path TEXT NOT NULL);
       CREATE INDEX fine_tuning_checkpoints_by_job ON fine_tuning_checkpoints (job_id);""",
    # 6: vector stores, their files and the files' chunks, with a full-text index of the chunks (BM25)
    """CREATE TABLE vector_stores (
        id TEXT PRIMARY KEY, tenant TEXT, created_at INTEGER NOT NULL, store TEXT NOT NULL);
       CREATE TABLE vector_store_files (
        store_id TEXT NOT NULL, file_id TEXT NOT NULL, created_at INTEGER NOT NULL, status TEXT NOT NULL,
        record TEXT NOT NULL, PRIMARY KEY (store_id, file_id));
       CREATE TABLE chunks (
        id INTEGER PRIMARY KEY AUTOINCREMENT, store_id TEXT NOT NULL, file_id TEXT NOT NULL, position INTEGER NOT NULL,
        text TEXT NOT NULL, tokens INTEGER NOT NULL);
       CREATE INDEX chunks_by_file ON chunks (store_id, file_id);
       CREATE VIRTUAL TABLE chunks_text USING fts5(text, content='chunks', content_rowid='id')""",
]


class Database:
    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    @property
    def version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        with self.transaction() as db:
            for number, script in enumerate(MIGRATIONS[self.version:], start=self.version + 1):
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection, inside one transaction (committed on leaving, rolled back on an
        exception), serialised with every other user."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
