"""Stored chat completions (OpenAI's `store: true`): the request's messages, the completion as it
was answered, and its metadata, per tenant (API key): to another key a record does not exist."""

import json
import time
from dataclasses import dataclass, field

from ..errors import InvalidParameter, NotFound
from .database import Database

MAX_LIST = 100
# A record's columns, in the order `record_of_row` reads them
COLUMNS = ("id", "model", "request_messages", "completion", "metadata", "tenant", "created")
SELECT = f"SELECT {', '.join(COLUMNS)} FROM chat_completions"


@dataclass
class StoredCompletion:
    id: str
    model: str
    request_messages: list[dict]
    completion: dict  # the chat.completion object as it was answered
    metadata: dict[str, str] = field(default_factory=dict)
    tenant: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self) -> dict:
        """The chat.completion object, with its metadata."""
        return {**self.completion, "metadata": self.metadata}

    def messages(self) -> list[dict]:
        """The request's messages as stored-message objects (each with an id)."""
        return [{"id": f"{self.id}-{i}", **m} for i, m in enumerate(self.request_messages)]


class CompletionStore:
    def __init__(self, database: Database):
        self.database = database

    def add(self, record: StoredCompletion) -> None:
        with self.database.transaction() as db:
            db.execute("INSERT INTO chat_completions (id, tenant, model, created, request_messages, completion, "
                       "metadata) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (record.id, record.tenant, record.model, record.created, json.dumps(record.request_messages),
                        json.dumps(record.completion), json.dumps(record.metadata)))

    def get(self, completion_id: str, tenant: str | None) -> StoredCompletion:
        with self.database.transaction() as db:
            row = db.execute(f"{SELECT} WHERE id = ? AND tenant IS ?", (completion_id, tenant)).fetchone()
        if row is None:
            raise NotFound(f"no stored chat completion has id {completion_id!r}", "completion_id")
        return record_of_row(row)

    def list(self, tenant: str | None, *, model: str | None = None, metadata: dict[str, str] | None = None,
             after: str | None = None, limit: int = 20, order: str = "asc") -> tuple[list[StoredCompletion], bool]:
        """A page of records, oldest first (`order` asc) or newest first, after the record `after`;
        and whether more follow."""
        if order not in ("asc", "desc"):
            raise InvalidParameter("order", "must be asc or desc")
        if not 1 <= limit <= MAX_LIST:
            raise InvalidParameter("limit", f"must be in [1, {MAX_LIST}]")
        where, args = ["tenant IS ?"], [tenant]
        if model is not None:
            where.append("model = ?")
            args.append(model)
        for key, value in (metadata or {}).items():
            where.append("json_extract(metadata, ?) = ?")
            args += ["$." + json.dumps(key), value]
        if after is not None:  # rowid: the order records were stored in
            self.get(after, tenant)
            where.append(f"rowid {'>' if order == 'asc' else '<'} (SELECT rowid FROM chat_completions WHERE id = ?)")
            args.append(after)
        direction = "ASC" if order == "asc" else "DESC"
        with self.database.transaction() as db:
            rows = db.execute(f"{SELECT} WHERE {' AND '.join(where)} ORDER BY rowid {direction} LIMIT ?",
                              (*args, limit + 1)).fetchall()
        return [record_of_row(r) for r in rows[:limit]], len(rows) > limit

    def update_metadata(self, completion_id: str, tenant: str | None, metadata: dict[str, str]) -> StoredCompletion:
        record = self.get(completion_id, tenant)
        with self.database.transaction() as db:
            db.execute("UPDATE chat_completions SET metadata = ? WHERE id = ?", (json.dumps(metadata), record.id))
        record.metadata = metadata
        return record

    def delete(self, completion_id: str, tenant: str | None) -> None:
        self.get(completion_id, tenant)
        with self.database.transaction() as db:
            db.execute("DELETE FROM chat_completions WHERE id = ?", (completion_id,))

    def expire(self, older_than: float) -> int:
        """Delete records created before `older_than` (epoch seconds); how many went."""
        with self.database.transaction() as db:
            return db.execute("DELETE FROM chat_completions WHERE created < ?", (older_than,)).rowcount


def record_of_row(row) -> StoredCompletion:
    """A record from its row's COLUMNS."""
    rid, model, messages, completion, metadata, tenant, created = row
    return StoredCompletion(rid, model, json.loads(messages), json.loads(completion), json.loads(metadata), tenant,
                            created)
