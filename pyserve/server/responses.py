"""Reading request bodies and shaping errors, the same way on every HTTP route."""

import asyncio
import json
import re
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import ClientError, InvalidParameter, TooLarge

MAX_BODY_BYTES = 8 * 2**20
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def error_body(path: str, exc: ClientError) -> dict:
    """KServe's {"error": message} on /v2, OpenAI's error object everywhere else."""
    if path.startswith("/v2"):
        return {"error": exc.message}
    return {"error": {"message": exc.message, "type": exc.kind, "param": exc.field, "code": None}}


class _AsciiJSON(JSONResponse):
    def render(self, content) -> bytes:
        # ASCII-escaped, so no input echoed in a message (a lone surrogate) can break the encoding.
        return json.dumps(content).encode()


def error_response(path: str, exc: ClientError) -> JSONResponse:
    return _AsciiJSON(error_body(path, exc), status_code=exc.status)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The whole body, refused as soon as it grows past `limit` (chunked bodies included)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection before its answer was ready; its work was cancelled."""


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone as soon as the client disconnects, with `work` cancelled
    (closing its engine streams aborts the requests: their KV blocks or latents free at once).
    Call it once the body has been read: from then on the next ASGI message is the disconnect."""
    task = asyncio.ensure_future(work)
    left = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    return task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def on_client_gone(request: Request, exc: ClientGone) -> Response:
    return Response(status_code=499)  # nobody reads it: nginx's "client closed request"


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes, what: str = "the body") -> object:
    """JSON as the standard defines it: no NaN or Infinity, no lone surrogates, bounded nesting."""
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ClientError(f"{what} is nested too deeply") from None
    if _SURROGATE_ESCAPE.search(raw):
        _check_unicode(value)
    return value


def _check_unicode(value) -> None:
    items = value.items() if isinstance(value, dict) else [("body", value)]
    for name, item in items:
        try:
            json.dumps(item, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidParameter(str(name), "holds a lone surrogate, which is not valid Unicode") from None


async def json_body(request: Request) -> dict:
    body = parse_json(await read_body(request))
    if not isinstance(body, dict):
        raise ClientError("the body must be a JSON object")
    return body
