"""Stored chat completions, OpenAI's shapes: a chat completion asked with `store: true` (or every
one, with `--store`) is kept with its request's messages and metadata, and these routes read it:
GET /v1/chat/completions (filters `model`, `metadata[key]=value`; `after`, `limit`, `order`),
GET /v1/chat/completions/{id}, GET /v1/chat/completions/{id}/messages, POST /v1/chat/completions/{id}
(new metadata), DELETE /v1/chat/completions/{id}. Records belong to the caller's tenant.

Example (with the demo server running):
    >>> done = client.chat.completions.create(model="pydoc-chat", store=True,          # doctest: +SKIP
    ...                                        metadata={"topic": "json"}, messages=[...])
    >>> [c.id for c in client.chat.completions.list(metadata={"topic": "json"})]    # doctest: +SKIP
"""

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import InvalidParameter
from ..store import StoredCompletion
from . import adapters
from .records import by_path, int_param, metadata_filter, page, tenant_of
from .responses import json_body


def wants_storing(request: Request, body: dict) -> bool:
    store = adapters.get_field(body, "store")
    return request.app.state.store_all if store is None else store


async def store(request: Request, body: dict, completion: dict) -> None:
    """Keep a finished chat completion (off the event loop: the write is committed before the
    answer goes out, so a server killed right after loses nothing)."""
    record = StoredCompletion(completion["id"], completion["model"], body.get("messages") or [], completion,
                              adapters.metadata(body.get("metadata")), tenant_of(request), completion["created"])
    await asyncio.to_thread(request.app.state.data.completions.add, record)


async def list_completions(request: Request) -> Response:
    query = request.query_params
    metadata = metadata_filter(request)
    records, has_more = await asyncio.to_thread(
        request.app.state.data.completions.list, tenant_of(request), model=query.get("model"), metadata=metadata,
        after=query.get("after"), limit=int_param(request, "limit", 20), order=query.get("order", "asc"))
    return JSONResponse(page([r.body() for r in records], has_more))


async def retrieve_completion(request: Request) -> Response:
    record = await by_path(request, request.app.state.data.completions.get, "completion_id")
    return JSONResponse(record.body())


async def list_messages(request: Request) -> Response:
    record = await by_path(request, request.app.state.data.completions.get, "completion_id")
    messages = record.messages()
    if request.query_params.get("order", "asc") == "desc":
        messages.reverse()
    after = request.query_params.get("after")
    if after is not None:
        ids = [m["id"] for m in messages]
        if after not in ids:
            raise InvalidParameter("after", f"{after!r} is not a message of this completion")
        messages = messages[ids.index(after) + 1:]
    limit = int_param(request, "limit", 20)
    return JSONResponse(page(messages[:limit], len(messages) > limit))


async def update_completion(request: Request) -> Response:
    body = await json_body(request)
    if "metadata" not in body:
        raise InvalidParameter("metadata", "is required")
    record = await asyncio.to_thread(request.app.state.data.completions.update_metadata,
                                     request.path_params["completion_id"], tenant_of(request),
                                     adapters.metadata(body["metadata"]))
    return JSONResponse(record.body())


async def delete_completion(request: Request) -> Response:
    await by_path(request, request.app.state.data.completions.delete, "completion_id")
    return JSONResponse({"object": "chat.completion.deleted", "id": request.path_params["completion_id"],
                         "deleted": True})


routes = [
    Route("/v1/chat/completions", list_completions, methods=["GET"]),
    Route("/v1/chat/completions/{completion_id}", retrieve_completion, methods=["GET"]),
    Route("/v1/chat/completions/{completion_id}", update_completion, methods=["POST"]),
    Route("/v1/chat/completions/{completion_id}", delete_completion, methods=["DELETE"]),
    Route("/v1/chat/completions/{completion_id}/messages", list_messages, methods=["GET"]),
]
