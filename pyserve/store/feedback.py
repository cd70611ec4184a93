"""Ratings of answers (`POST /v1/feedback`), with the correction a person would rather have seen,
kept in the data directory; and the fine-tuning datasets they make.

Bounded: each tenant (API key) may leave `max_rows_per_key` ratings, and the database stops
taking them at `max_bytes` (a 429 and a 507: neither is a crash, and what is stored stays).
"""

import time
from dataclasses import dataclass, field

from ..errors import ClientError
from .completions import COLUMNS as COMPLETION_COLUMNS
from .completions import StoredCompletion, record_of_row
from .database import Database

MAX_ROWS_PER_KEY = 100_000
MAX_DB_BYTES = 1 << 30
COLUMNS = ("id", "response_id", "rating", "comment", "correction", "user", "model", "tenant", "created")


@dataclass
class Feedback:
    id: int
    response_id: str
    rating: int  # -1 (thumbs down) .. 5; above 0 is approval
    comment: str | None = None
    correction: str | None = None  # the answer that should have been given
    user: str | None = None
    model: str | None = None
    tenant: str | None = None
    created: float = field(default_factory=time.time)


class FeedbackStore:
    def __init__(self, database: Database, max_rows_per_key: int = MAX_ROWS_PER_KEY, max_bytes: int = MAX_DB_BYTES):
        self.database = database
        self.max_rows_per_key, self.max_bytes = max_rows_per_key, max_bytes

    def add(self, response_id: str, rating: int, comment: str | None = None, user: str | None = None,
            model: str | None = None, tenant: str | None = None, correction: str | None = None) -> int:
        with self.database.transaction() as db:
            rows = db.execute("SELECT COUNT(*) FROM feedback WHERE tenant IS ?", (tenant,)).fetchone()[0]
            if rows >= self.max_rows_per_key:
                raise ClientError(f"this API key has left {rows} ratings, the most this server keeps for one key",
                                  status=429)
            pages, page_size = (db.execute(f"PRAGMA {name}").fetchone()[0] for name in ("page_count", "page_size"))
            if pages * page_size >= self.max_bytes:
                raise ClientError(f"the data directory's database is full ({self.max_bytes} bytes); an operator "
                                  "must export and clear feedback", status=507)
            cur = db.execute("INSERT INTO feedback (response_id, rating, comment, correction, user, model, tenant, "
                             "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (response_id, rating, comment, correction, user, model, tenant, time.time()))
            return cur.lastrowid

    def with_completions(self, tenant: str | None = None,
                         every_tenant: bool = False) -> list[tuple[Feedback, StoredCompletion | None]]:
        """A tenant's ratings, oldest first, each with the stored completion it rates (one of the
        tenant's own; None when none is stored under its id), in one query; `every_tenant`:
        everyone's, each with the completion of that id whoever stored it (an operator's export)."""
        where, args = ("", ()) if every_tenant else ("WHERE f.tenant IS ?", (tenant,))
        same_owner = "" if every_tenant else " AND c.tenant IS f.tenant"
        columns = ", ".join([*(f"f.{c}" for c in COLUMNS), *(f"c.{c}" for c in COMPLETION_COLUMNS)])
        with self.database.transaction() as db:
            rows = db.execute(f"SELECT {columns} FROM feedback f LEFT JOIN chat_completions c "
                              f"ON c.id = f.response_id{same_owner} {where} ORDER BY f.id", args).fetchall()
        split = len(COLUMNS)
        return [(Feedback(*row[:split]), None if row[split] is None else record_of_row(row[split:])) for row in rows]


def dataset_lines(pairs: list[tuple[Feedback, StoredCompletion]], method: str) -> tuple[list[dict], int, int]:
    """Fine-tuning lines from ratings of stored completions: an approved answer, and any
    correction, become supervised lines {"messages": [... , answer]}; a correction of a
    rated-down answer becomes a preference line (OpenAI's DPO format). A rated-down answer is
    never a supervised target. `method`: supervised, dpo or both. Returns (lines, supervised, dpo)."""
    lines, supervised, dpo = [], 0, 0
    for rating, record in pairs:
        messages = record.request_messages
        answer = record.completion["choices"][0]["message"].get("content") or ""
        targets = ([answer] if rating.rating > 0 else []) + ([rating.correction] if rating.correction else [])
        if method in ("supervised", "both"):
            for target in targets:
                lines.append({"messages": [*messages, {"role": "assistant", "content": target}]})
                supervised += 1
        if method in ("dpo", "both") and rating.correction and rating.rating < 0:
            lines.append({"input": {"messages": messages},
                          "preferred_output": [{"role": "assistant", "content": rating.correction}],
                          "non_preferred_output": [{"role": "assistant", "content": answer}]})
            dpo += 1
    return lines, supervised, dpo
