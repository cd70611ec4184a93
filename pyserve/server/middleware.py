"""Pure ASGI middleware for every HTTP route: access policy, announced body size, X-Request-Id echo."""

import logging
from collections.abc import Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ClientError, TooLarge
from .auth import AccessPolicy
from .responses import MAX_BODY_BYTES, error_response

log = logging.getLogger("pyserve.server")

OPEN_PATHS = ("/health", "/v2/health/live", "/v2/health/ready")


class Guard:
    """Authenticates each request (the Principal lands in `request.state.principal`), and lets
    only the admin role through `admin_routes`."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy, admin_routes: Sequence[BaseRoute] = ()):
        self.app = app
        self.policy = policy
        self.admin_routes = admin_routes

    def _check(self, scope: Scope, headers: Headers) -> None:
        path = scope["path"]
        length = headers.get("content-length", "")
        if path not in OPEN_PATHS:
            scheme, _, key = headers.get("authorization", "").partition(" ")
            principal = self.policy.authenticate(key.strip() if scheme.lower() == "bearer" else None)
            scope.setdefault("state", {})["principal"] = principal
            if any(route.matches(scope)[0] != Match.NONE for route in self.admin_routes):
                principal.require_admin()
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise TooLarge(f"the request body exceeds {MAX_BODY_BYTES} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            self._check(scope, headers)
        except ClientError as error:
            client = scope.get("client") or ("?", 0)
            log.info("%s %s from %s -> %d: %s", scope["method"], scope["path"], client[0], error.status, error.message)
            await error_response(scope["path"], error)(scope, receive, send)
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
