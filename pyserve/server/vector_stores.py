"""OpenAI's vector stores API: /v1/vector_stores (create, list, retrieve, modify, delete),
/v1/vector_stores/{id}/files (attach an uploaded file, list, retrieve, delete, its chunks as
content) and /v1/vector_stores/{id}/search. pyserve's extensions at creation: `embedding_model`
(default: the only embedding model served) and `reranker` (a served cross-encoder); in search,
`ranking_options.ranker` may be "hybrid" (auto), "dense" or "keyword". Stores belong to the key
that made them; the work is `Retrieval`'s (pyserve.server.retrieval).

Example (with the demo server running):
    >>> store = client.vector_stores.create(name="docs")                                 # doctest: +SKIP
    >>> client.vector_stores.files.create(store.id, file_id=uploaded.id)                 # doctest: +SKIP
    >>> client.vector_stores.search(store.id, query="How do I parse JSON?").data[0].score  # doctest: +SKIP
"""

import asyncio
import importlib.util

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ClientError, InvalidParameter, NotFound
from ..store import VectorStore, VectorStoreFile
from . import adapters
from .records import by_path, int_param, page, page_after, tenant_of
from .responses import json_body
from .retrieval import search_options

ATTACHABLE = ("assistants", "user_data")
MAX_ATTRIBUTES = 16


def _body(request: Request, store: VectorStore) -> dict:
    counts, used = request.app.state.data.vector_stores.counts(store.id)
    return store.body(counts, used)


async def _store(request: Request) -> VectorStore:
    return await by_path(request, request.app.state.data.vector_stores.get, "vector_store_id")


async def create(request: Request) -> Response:
    if importlib.util.find_spec("hnswlib") is None:
        raise ClientError('vector stores need the retrieval extra on the server: pip install "pyserve[retrieval]"',
                          status=501)
    body = await json_body(request)
    retrieval = request.app.state.retrieval
    name = body.get("name") or ""
    if not isinstance(name, str) or len(name) > 256:
        raise InvalidParameter("name", "must be a string of at most 256 characters")
    embedder = retrieval.embedder(body.get("embedding_model"))
    reranker = retrieval.reranker(body.get("reranker"))
    chunking = retrieval.chunking(body.get("chunking_strategy"), embedder)
    file_ids = body.get("file_ids") or []
    if not isinstance(file_ids, list) or not all(isinstance(f, str) for f in file_ids):
        raise InvalidParameter("file_ids", "must be a list of file ids")
    for file_id in file_ids:
        await asyncio.to_thread(_attachable, request, file_id)
    store = VectorStore(name, embedder.name, tenant=tenant_of(request), metadata=adapters.metadata(body.get("metadata")),
                        reranker=None if reranker is None else reranker.name)
    await asyncio.to_thread(request.app.state.data.vector_stores.add, store)
    for file_id in dict.fromkeys(file_ids):
        await _attach(request, store, file_id, chunking, {})
    return JSONResponse(await asyncio.to_thread(_body, request, store))


async def list_stores(request: Request) -> Response:
    stores, has_more = await asyncio.to_thread(request.app.state.data.vector_stores.list, tenant_of(request),
                                               request.query_params.get("after"), int_param(request, "limit", 20))
    return JSONResponse(page([await asyncio.to_thread(_body, request, s) for s in stores], has_more))


async def retrieve(request: Request) -> Response:
    return JSONResponse(await asyncio.to_thread(_body, request, await _store(request)))


async def modify(request: Request) -> Response:
    store, body = await _store(request), await json_body(request)
    if "name" in body:
        if not isinstance(body["name"], str) or len(body["name"]) > 256:
            raise InvalidParameter("name", "must be a string of at most 256 characters")
        store.name = body["name"]
    if "metadata" in body:
        store.metadata = adapters.metadata(body["metadata"])
    await asyncio.to_thread(request.app.state.data.vector_stores.save, store)
    return JSONResponse(await asyncio.to_thread(_body, request, store))


async def delete(request: Request) -> Response:
    store = await _store(request)
    await asyncio.to_thread(request.app.state.data.vector_stores.delete, store)
    return JSONResponse({"id": store.id, "object": "vector_store.deleted", "deleted": True})


def _attachable(request: Request, file_id) -> None:
    if not isinstance(file_id, str):
        raise InvalidParameter("file_id", "must be the id of an uploaded file")
    try:
        upload = request.app.state.data.files.get(file_id, tenant_of(request))
    except NotFound:
        raise InvalidParameter("file_id", f"no file has id {file_id!r}") from None
    if upload.purpose not in ATTACHABLE:
        raise InvalidParameter("file_id", f"{file_id} was uploaded with purpose {upload.purpose!r}; vector stores "
                                          f"take {' or '.join(ATTACHABLE)} files")


def _attributes(value) -> dict:
    if value is None:
        return {}
    if (not isinstance(value, dict) or len(value) > MAX_ATTRIBUTES
            or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, (str, int, float, bool))
                       and (not isinstance(v, str) or len(v) <= 512) for k, v in value.items())):
        raise InvalidParameter("attributes", f"must map at most {MAX_ATTRIBUTES} keys to strings (up to 512 "
                                             f"characters), numbers or booleans")
    return value


async def _attach(request: Request, store: VectorStore, file_id: str, chunking: dict, attributes: dict) -> VectorStoreFile:
    stores = request.app.state.data.vector_stores
    try:
        if (await asyncio.to_thread(stores.file, store.id, file_id)).status == "in_progress":
            raise ClientError(f"{file_id} is being indexed into this store already", "file_id", status=409)
        await asyncio.to_thread(stores.delete_file, store.id, file_id)  # attached again: indexed afresh
    except NotFound:
        pass
    record = VectorStoreFile(store.id, file_id, chunking, attributes)
    await asyncio.to_thread(stores.add_file, record)
    request.app.state.retrieval.attach(store, record)
    return record


async def attach_file(request: Request) -> Response:
    store, body = await _store(request), await json_body(request)
    await asyncio.to_thread(_attachable, request, body.get("file_id"))
    retrieval = request.app.state.retrieval
    chunking = retrieval.chunking(body.get("chunking_strategy"), retrieval.embedder(store.embedding_model))
    record = await _attach(request, store, body["file_id"], chunking, _attributes(body.get("attributes")))
    return JSONResponse(record.body())


async def list_files(request: Request) -> Response:
    store = await _store(request)
    status = request.query_params.get("filter")
    records = await asyncio.to_thread(request.app.state.data.vector_stores.files, store.id, status)
    return JSONResponse(page_after(request, [r.body() for r in records]))


async def retrieve_file(request: Request) -> Response:
    store = await _store(request)
    record = await asyncio.to_thread(request.app.state.data.vector_stores.file, store.id, request.path_params["file_id"])
    return JSONResponse(record.body())


async def file_content(request: Request) -> Response:
    store = await _store(request)
    stores, file_id = request.app.state.data.vector_stores, request.path_params["file_id"]
    record = await asyncio.to_thread(stores.file, store.id, file_id)
    if record.status != "completed":
        raise ClientError(f"{file_id} is {record.status.replace('_', ' ')}: it has no chunks yet", "file_id",
                          status=409)
    chunks = await asyncio.to_thread(stores.file_chunks, store.id, file_id)
    return JSONResponse({"object": "vector_store.file_content.page", "file_id": file_id,
                         "data": [{"type": "text", "text": c.text} for c in chunks], "has_more": False,
                         "next_page": None})


async def delete_file(request: Request) -> Response:
    store = await _store(request)
    file_id = request.path_params["file_id"]
    await asyncio.to_thread(request.app.state.data.vector_stores.file, store.id, file_id)  # 404 when not attached
    await asyncio.to_thread(request.app.state.data.vector_stores.delete_file, store.id, file_id)
    return JSONResponse({"id": file_id, "object": "vector_store.file.deleted", "deleted": True})


async def search(request: Request) -> Response:
    store, body = await _store(request), await json_body(request)
    query = body.get("query")
    if isinstance(query, list) and query and all(isinstance(q, str) for q in query):
        query = " ".join(query)
    if not isinstance(query, str) or not query.strip():
        raise InvalidParameter("query", "must be a non-empty string")
    results = await request.app.state.retrieval.search(store, query, **search_options(body))
    return JSONResponse({"object": "vector_store.search_results.page", "search_query": query,
                         "data": [r.body() for r in results], "has_more": False, "next_page": None})


routes = [
    Route("/v1/vector_stores", create, methods=["POST"]),
    Route("/v1/vector_stores", list_stores, methods=["GET"]),
    Route("/v1/vector_stores/{vector_store_id}", retrieve, methods=["GET"]),
    Route("/v1/vector_stores/{vector_store_id}", modify, methods=["POST"]),
    Route("/v1/vector_stores/{vector_store_id}", delete, methods=["DELETE"]),
    Route("/v1/vector_stores/{vector_store_id}/files", attach_file, methods=["POST"]),
    Route("/v1/vector_stores/{vector_store_id}/files", list_files, methods=["GET"]),
    Route("/v1/vector_stores/{vector_store_id}/files/{file_id}", retrieve_file, methods=["GET"]),
    Route("/v1/vector_stores/{vector_store_id}/files/{file_id}", delete_file, methods=["DELETE"]),
    Route("/v1/vector_stores/{vector_store_id}/files/{file_id}/content", file_content, methods=["GET"]),
    Route("/v1/vector_stores/{vector_store_id}/search", search, methods=["POST"]),
]
