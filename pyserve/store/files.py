"""Uploaded files (OpenAI's files API): the bytes as plain files in the data directory, their
records in its database, per tenant. A fine-tune file is checked line by line before anything is
kept (`training_data.check`)."""

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidParameter, NotFound
from .database import Database

PURPOSES = ("fine-tune", "batch", "assistants", "user_data", "evals", "fine-tune-results")


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    tenant: str | None = None
    created_at: int = field(default_factory=lambda: int(time.time()))

    def body(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


class FileStore:
    def __init__(self, database: Database, folder: Path):
        self.database, self.folder = database, folder
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, filename: str, purpose: str, data: bytes, tenant: str | None) -> StoredFile:
        if purpose not in PURPOSES:
            raise InvalidParameter("purpose", f"must be one of {', '.join(PURPOSES)}")
        record = StoredFile(f"file-{uuid.uuid4().hex[:24]}", filename[:255], purpose, len(data), tenant)
        path = self.folder / record.id
        path.write_bytes(data)  # the bytes first: a record never names a file that is not there
        try:
            with self.database.transaction() as db:
                db.execute("INSERT INTO files (id, tenant, filename, purpose, bytes, created_at) VALUES "
                           "(?, ?, ?, ?, ?, ?)", (record.id, tenant, record.filename, purpose, record.bytes,
                                                   record.created_at))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return record

    def get(self, file_id: str, tenant: str | None) -> StoredFile:
        with self.database.transaction() as db:
            row = db.execute("SELECT id, filename, purpose, bytes, tenant, created_at FROM files WHERE id = ? AND "
                             "tenant IS ?", (file_id, tenant)).fetchone()
        if row is None:
            raise NotFound(f"no file has id {file_id!r}", "file_id")
        return StoredFile(*row)

    def content(self, file_id: str, tenant: str | None) -> bytes:
        return (self.folder / self.get(file_id, tenant).id).read_bytes()

    def list(self, tenant: str | None, purpose: str | None = None, limit: int = 100,
             order: str = "desc") -> list[StoredFile]:
        if order not in ("asc", "desc"):
            raise InvalidParameter("order", "must be asc or desc")
        where, args = "tenant IS ?", [tenant]
        if purpose is not None:
            where, args = where + " AND purpose = ?", args + [purpose]
        with self.database.transaction() as db:
            rows = db.execute(f"SELECT id, filename, purpose, bytes, tenant, created_at FROM files WHERE {where} "
                              f"ORDER BY rowid {order.upper()} LIMIT ?", (*args, limit)).fetchall()
        return [StoredFile(*row) for row in rows]

    def delete(self, file_id: str, tenant: str | None) -> None:
        record = self.get(file_id, tenant)
        with self.database.transaction() as db:
            db.execute("DELETE FROM files WHERE id = ?", (record.id,))
        (self.folder / record.id).unlink(missing_ok=True)
