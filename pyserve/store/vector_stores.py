"""Vector stores (OpenAI's /v1/vector_stores): the stores and their files as records, the files'
chunks as rows with a full-text index (SQLite FTS5, ranked by BM25), and each store's dense
vectors in an approximate-nearest-neighbour index beside the database (`VectorIndex`).
"""

from __future__ import annotations  # annotations below name the builtin list, which a method shadows

import json
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import NotFound
from .database import Database

MAX_LIST = 100


@dataclass
class VectorStore:
    name: str
    embedding_model: str  # the served model that embeds its chunks and queries
    id: str = field(default_factory=lambda: f"vs_{uuid.uuid4().hex[:24]}")
    tenant: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: int = field(default_factory=lambda: int(time.time()))
    reranker: str | None = None  # a served cross-encoder that reorders what hybrid search finds

    def body(self, counts: dict[str, int], usage_bytes: int) -> dict:
        return {"id": self.id, "object": "vector_store", "created_at": self.created_at, "name": self.name,
                "usage_bytes": usage_bytes, "file_counts": counts,
                "status": "in_progress" if counts["in_progress"] else "completed", "expires_after": None,
                "expires_at": None, "last_active_at": self.created_at, "metadata": self.metadata,
                "embedding_model": self.embedding_model, "reranker": self.reranker}


@dataclass
class VectorStoreFile:
    store_id: str
    file_id: str
    chunking: dict  # {"type": "static", "static": {"max_chunk_size_tokens", "chunk_overlap_tokens"}}
    attributes: dict = field(default_factory=dict)
    status: str = "in_progress"  # then completed, failed or cancelled
    last_error: dict | None = None
    usage_bytes: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))

    def body(self) -> dict:
        return {"id": self.file_id, "object": "vector_store.file", "usage_bytes": self.usage_bytes,
                "created_at": self.created_at, "vector_store_id": self.store_id, "status": self.status,
                "last_error": self.last_error, "chunking_strategy": self.chunking, "attributes": self.attributes}


@dataclass
class Chunk:
    id: int
    file_id: str
    position: int
    text: str


class VectorStores:
    def __init__(self, database: Database, folder: Path):
        self.database, self.folder = database, folder
        folder.mkdir(parents=True, exist_ok=True)
        self._indexes: dict[str, VectorIndex] = {}
        self._lock = threading.Lock()

    # -- stores

    def add(self, store: VectorStore) -> None:
        with self.database.transaction() as db:
            db.execute("INSERT INTO vector_stores (id, tenant, created_at, store) VALUES (?, ?, ?, ?)",
                       (store.id, store.tenant, store.created_at, json.dumps(asdict(store))))

    def save(self, store: VectorStore) -> None:
        with self.database.transaction() as db:
            db.execute("UPDATE vector_stores SET store = ? WHERE id = ?", (json.dumps(asdict(store)), store.id))

    def get(self, store_id: str, tenant: str | None) -> VectorStore:
        with self.database.transaction() as db:
            row = db.execute("SELECT store FROM vector_stores WHERE id = ? AND tenant IS ?", (store_id, tenant)).fetchone()
        if row is None:
            raise NotFound(f"no vector store has id {store_id!r}", "vector_store_id")
        return VectorStore(**json.loads(row[0]))

    def get_any(self, store_id: str) -> VectorStore | None:
        """The store, whoever made it (the server's own view), or None."""
        with self.database.transaction() as db:
            row = db.execute("SELECT store FROM vector_stores WHERE id = ?", (store_id,)).fetchone()
        return None if row is None else VectorStore(**json.loads(row[0]))

    def list(self, tenant: str | None, after: str | None = None, limit: int = 20) -> tuple[list[VectorStore], bool]:
        query, args = "SELECT store FROM vector_stores WHERE tenant IS ?", [tenant]
        if after is not None:
            query += " AND rowid < (SELECT rowid FROM vector_stores WHERE id = ?)"
            args.append(after)
        with self.database.transaction() as db:
            rows = db.execute(query + " ORDER BY rowid DESC LIMIT ?", (*args, min(limit, MAX_LIST) + 1)).fetchall()
        stores = [VectorStore(**json.loads(row[0])) for row in rows]
        return stores[:limit], len(stores) > limit

    def delete(self, store: VectorStore) -> None:
        with self.database.transaction() as db:
            self._delete_chunks(db, "store_id = ?", (store.id,))
            db.execute("DELETE FROM vector_store_files WHERE store_id = ?", (store.id,))
            db.execute("DELETE FROM vector_stores WHERE id = ?", (store.id,))
        with self._lock:
            self._indexes.pop(store.id, None)
        self._index_path(store.id).unlink(missing_ok=True)
        self._index_path(store.id).with_suffix(".json").unlink(missing_ok=True)

    def counts(self, store_id: str) -> tuple[dict[str, int], int]:
        """The store's file counts by status, and the bytes of its chunks' text."""
        with self.database.transaction() as db:
            by_status = dict(db.execute("SELECT status, COUNT(*) FROM vector_store_files WHERE store_id = ? "
                                        "GROUP BY status", (store_id,)).fetchall())
            used = db.execute("SELECT COALESCE(SUM(LENGTH(text)), 0) FROM chunks WHERE store_id = ?",
                              (store_id,)).fetchone()[0]
        counts = {s: by_status.get(s, 0) for s in ("in_progress", "completed", "failed", "cancelled")}
        counts["total"] = sum(counts.values())
        return counts, used

    # -- files

    def add_file(self, record: VectorStoreFile) -> None:
        with self.database.transaction() as db:
            db.execute("INSERT OR REPLACE INTO vector_store_files (store_id, file_id, created_at, status, record) "
                       "VALUES (?, ?, ?, ?, ?)", (record.store_id, record.file_id, record.created_at, record.status,
                                                  json.dumps(asdict(record))))

    save_file = add_file

    def file(self, store_id: str, file_id: str) -> VectorStoreFile:
        with self.database.transaction() as db:
            row = db.execute("SELECT record FROM vector_store_files WHERE store_id = ? AND file_id = ?",
                             (store_id, file_id)).fetchone()
        if row is None:
            raise NotFound(f"the vector store {store_id} has no file {file_id!r}", "file_id")
        return VectorStoreFile(**json.loads(row[0]))

    def files(self, store_id: str, status: str | None = None) -> list[VectorStoreFile]:
        query, args = "SELECT record FROM vector_store_files WHERE store_id = ?", [store_id]
        if status is not None:
            query, args = query + " AND status = ?", args + [status]
        with self.database.transaction() as db:
            rows = db.execute(query + " ORDER BY created_at DESC, rowid DESC", args).fetchall()
        return [VectorStoreFile(**json.loads(row[0])) for row in rows]

    def in_progress(self) -> list[VectorStoreFile]:
        """Every store's files still being indexed (the restart's view)."""
        with self.database.transaction() as db:
            rows = db.execute("SELECT record FROM vector_store_files WHERE status = 'in_progress'").fetchall()
        return [VectorStoreFile(**json.loads(row[0])) for row in rows]

    def delete_file(self, store_id: str, file_id: str) -> None:
        with self.database.transaction() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM chunks WHERE store_id = ? AND file_id = ?",
                                            (store_id, file_id)).fetchall()]
            self._delete_chunks(db, "store_id = ? AND file_id = ?", (store_id, file_id))
            db.execute("DELETE FROM vector_store_files WHERE store_id = ? AND file_id = ?", (store_id, file_id))
        self.index(store_id).remove(ids)

    # -- chunks

    def add_chunks(self, store_id: str, file_id: str, texts: list[str], tokens: list[int],
                   vectors: np.ndarray) -> None:
        """A file's chunks, their full-text entries and their vectors, all or nothing."""
        with self.database.transaction() as db:
            ids = []
            for position, (text, count) in enumerate(zip(texts, tokens)):
                cursor = db.execute("INSERT INTO chunks (store_id, file_id, position, text, tokens) VALUES "
                                    "(?, ?, ?, ?, ?)", (store_id, file_id, position, text, count))
                ids.append(cursor.lastrowid)
                db.execute("INSERT INTO chunks_text (rowid, text) VALUES (?, ?)", (cursor.lastrowid, text))
            self.index(store_id).add(ids, vectors)  # inside the transaction: a failure keeps neither

    def chunks(self, ids: list[int]) -> dict[int, Chunk]:
        if not ids:
            return {}
        with self.database.transaction() as db:
            rows = db.execute(f"SELECT id, file_id, position, text FROM chunks WHERE id IN "
                              f"({', '.join('?' * len(ids))})", ids).fetchall()
        return {row[0]: Chunk(*row) for row in rows}

    def file_chunks(self, store_id: str, file_id: str) -> list[Chunk]:
        with self.database.transaction() as db:
            rows = db.execute("SELECT id, file_id, position, text FROM chunks WHERE store_id = ? AND file_id = ? "
                              "ORDER BY position", (store_id, file_id)).fetchall()
        return [Chunk(*row) for row in rows]

    def keyword_search(self, store_id: str, query: str, limit: int) -> list[int]:
        """Chunk ids by BM25 over the query's words (any of them), best first."""
        words = re.findall(r"\w+", query.lower())
        if not words:
            return []
        match = " OR ".join(f'"{w}"' for w in dict.fromkeys(words))
        with self.database.transaction() as db:
            rows = db.execute("SELECT chunks_text.rowid FROM chunks_text JOIN chunks ON chunks.id = chunks_text.rowid "
                              "WHERE chunks_text MATCH ? AND chunks.store_id = ? ORDER BY bm25(chunks_text) LIMIT ?",
                              (match, store_id, limit)).fetchall()
        return [row[0] for row in rows]

    def _delete_chunks(self, db, where: str, args: tuple) -> None:
        for chunk_id, text in db.execute(f"SELECT id, text FROM chunks WHERE {where}", args).fetchall():
            db.execute("INSERT INTO chunks_text (chunks_text, rowid, text) VALUES ('delete', ?, ?)", (chunk_id, text))
        db.execute(f"DELETE FROM chunks WHERE {where}", args)

    # -- dense vectors

    def index(self, store_id: str) -> "VectorIndex":
        with self._lock:
            index = self._indexes.get(store_id)
            if index is None:
                index = self._indexes[store_id] = VectorIndex(self._index_path(store_id))
            return index

    def _index_path(self, store_id: str) -> Path:
        return self.folder / f"{store_id}.hnsw"


class VectorIndex:
    """A store's vectors (unit length) by chunk id in an HNSW graph (hnswlib), inner product
    (cosine) space; saved to its file after every change, loaded from it on first use."""

    M, EF_CONSTRUCTION, EF_SEARCH = 16, 200, 128

    def __init__(self, path: Path):
        self.path = path
        self._index = None
        self._live = 0  # vectors not deleted: a query may ask for no more neighbours than these
        self._lock = threading.Lock()

    def _open(self, dim: int | None):
        import hnswlib  # the `retrieval` extra
        if self._index is None and self.path.exists():
            meta = json.loads(self.path.with_suffix(".json").read_text())
            self._index = hnswlib.Index(space="ip", dim=meta["dim"])
            self._index.load_index(str(self.path), max_elements=meta["capacity"], allow_replace_deleted=True)
            self._live = meta["live"]
        if self._index is None and dim is not None:
            self._index = hnswlib.Index(space="ip", dim=dim)
            self._index.init_index(max_elements=1024, ef_construction=self.EF_CONSTRUCTION, M=self.M,
                                   allow_replace_deleted=True)
        if self._index is not None:
            self._index.set_ef(self.EF_SEARCH)
        return self._index

    def add(self, ids: list[int], vectors: np.ndarray) -> None:
        if not ids:
            return
        with self._lock:
            index = self._open(vectors.shape[1])
            needed = index.get_current_count() + len(ids)
            if needed > index.get_max_elements():
                index.resize_index(max(needed, 2 * index.get_max_elements()))
            index.add_items(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64),
                            replace_deleted=True)
            self._live += len(ids)
            self._save(index)

    def remove(self, ids: list[int]) -> None:
        with self._lock:
            index = self._open(None)
            if index is None:
                return
            for i in ids:
                index.mark_deleted(i)
            self._live -= len(ids)
            self._save(index)

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Up to k (chunk id, cosine) pairs, nearest first."""
        with self._lock:
            index = self._open(None)
            if index is None:
                return []
            k = min(k, self._live)
            if k == 0:
                return []
            labels, distances = index.knn_query(np.asarray(vector, dtype=np.float32)[None, :], k=k)
        return [(int(label), 1.0 - float(d)) for label, d in zip(labels[0], distances[0])]

    def _save(self, index) -> None:
        index.save_index(str(self.path))
        self.path.with_suffix(".json").write_text(json.dumps({"dim": index.dim, "capacity": index.get_max_elements(),
                                                              "live": self._live}))
