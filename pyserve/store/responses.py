"""Stored responses of the Responses API, for `previous_response_id`, GET and DELETE.

Each response keeps its own turn only (its input items and its output items) and the id of the
one before it; a conversation is rebuilt by walking back the chain, so a long chain costs
storage in proportion to its length, not its square. Responses belong to the tenant of the key
that made them: to another key they do not exist.
"""

import json
import time
from dataclasses import dataclass, field

from ..errors import InvalidParameter, NotFound
from .database import Database

MAX_CHAIN = 1_000  # turns rebuilt for one request


@dataclass
class StoredResponse:
    response: dict  # the Response object as returned
    input_items: list[dict]  # this turn's input, as items with ids
    tenant: str | None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def previous_id(self) -> str | None:
        return self.response.get("previous_response_id")


class ResponseStore:
    def __init__(self, database: Database):
        self.database = database

    def put(self, stored: StoredResponse) -> None:
        with self.database.transaction() as db:
            db.execute("INSERT INTO responses (id, tenant, created, response, input_items) VALUES (?, ?, ?, ?, ?)",
                       (stored.response["id"], stored.tenant, stored.created, json.dumps(stored.response),
                        json.dumps(stored.input_items)))

    def get(self, response_id: str, tenant: str | None) -> StoredResponse:
        with self.database.transaction() as db:
            row = db.execute("SELECT response, input_items, tenant, created FROM responses WHERE id = ? AND "
                             "tenant IS ?", (response_id, tenant)).fetchone()
        if row is None:
            raise NotFound(f"no stored response has id {response_id!r}", "response_id")
        return StoredResponse(json.loads(row[0]), json.loads(row[1]), row[2], row[3])

    def delete(self, response_id: str, tenant: str | None) -> None:
        self.get(response_id, tenant)
        with self.database.transaction() as db:
            db.execute("DELETE FROM responses WHERE id = ?", (response_id,))

    def conversation(self, response_id: str, tenant: str | None) -> list[dict]:
        """Every item of the chain that ends with this response, oldest first: each turn's input
        items, then its output items."""
        turns: list[list[dict]] = []
        at: str | None = response_id
        while at is not None:
            if len(turns) == MAX_CHAIN:
                raise InvalidParameter("previous_response_id", f"the chain is longer than {MAX_CHAIN} responses")
            try:
                stored = self.get(at, tenant)
            except NotFound:
                raise InvalidParameter("previous_response_id", f"no stored response has id {at!r} (it was never "
                                       "stored, was deleted, or has expired)") from None
            turns.append(stored.input_items + stored.response["output"])
            at = stored.previous_id
        return [item for turn in reversed(turns) for item in turn]

    def expire(self, older_than: float) -> int:
        with self.database.transaction() as db:
            return db.execute("DELETE FROM responses WHERE created < ?", (older_than,)).rowcount
