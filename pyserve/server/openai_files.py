"""OpenAI's files API: POST /v1/files (multipart `file` and `purpose`), GET /v1/files (`purpose`,
`limit`, `order`), GET /v1/files/{id}, GET /v1/files/{id}/content, DELETE /v1/files/{id}. A
`fine-tune` file is checked line by line on upload (`pyserve.store.training_data`): a bad line
is a 400 naming its number, and nothing is kept.

Example (with the demo server running):
    >>> client.files.create(file=open("train.jsonl", "rb"), purpose="fine-tune").id  # doctest: +SKIP
"""

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import InvalidParameter
from ..store import training_data
from . import forms
from .responses import read_body
from .records import by_path, int_param, page, tenant_of


async def upload(request: Request) -> Response:
    form = await forms.read_form(request.headers.get("content-type", ""), await read_body(request))
    if "file" not in form.files:
        raise InvalidParameter("file", "is required (a multipart file part)")
    purpose = form.fields.get("purpose")
    if not isinstance(purpose, str):
        raise InvalidParameter("purpose", "is required")
    data = form.files["file"]
    if purpose == "fine-tune":
        await asyncio.to_thread(training_data.check, data)
    record = await asyncio.to_thread(request.app.state.data.files.add, form.filenames["file"], purpose, data,
                                     tenant_of(request))
    return JSONResponse(record.body())


async def list_files(request: Request) -> Response:
    records = await asyncio.to_thread(request.app.state.data.files.list, tenant_of(request),
                                      request.query_params.get("purpose"), int_param(request, "limit", 100),
                                      request.query_params.get("order", "desc"))
    return JSONResponse(page([r.body() for r in records]))


async def retrieve(request: Request) -> Response:
    return JSONResponse((await by_path(request, request.app.state.data.files.get, "file_id")).body())


async def content(request: Request) -> Response:
    data = await by_path(request, request.app.state.data.files.content, "file_id")
    return Response(data, media_type="application/octet-stream")


async def delete(request: Request) -> Response:
    await by_path(request, request.app.state.data.files.delete, "file_id")
    return JSONResponse({"id": request.path_params["file_id"], "object": "file", "deleted": True})


routes = [
    Route("/v1/files", upload, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", retrieve, methods=["GET"]),
    Route("/v1/files/{file_id}", delete, methods=["DELETE"]),
    Route("/v1/files/{file_id}/content", content, methods=["GET"]),
]
