"""Pure ASGI middleware for every HTTP route: API key, announced body size, X-Request-Id echo."""

import hmac

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import TooLarge, Unauthorized
from .responses import MAX_BODY_BYTES, error_response

OPEN_PATHS = ("/health", "/v2/health/live", "/v2/health/ready")


class Guard:
    def __init__(self, app: ASGIApp, api_key: str | None = None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers, path = Headers(scope=scope), scope["path"]
        error = None
        if self.expected and path not in OPEN_PATHS and not hmac.compare_digest(
                headers.get("authorization", "").encode(), self.expected):
            error = Unauthorized("a valid API key is required (Authorization: Bearer ...)")
        length = headers.get("content-length", "")
        if error is None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            error = TooLarge(f"the request body exceeds {MAX_BODY_BYTES} bytes")
        if error is not None:
            await error_response(path, error)(scope, receive, send)
            return
        request_id = headers.get("x-request-id")
        if request_id is None:
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)
