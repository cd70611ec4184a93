"""The errors a client can cause, in one hierarchy shared by the engines and every front-end.

Each carries an HTTP-like status (also the msgpack error code), a message, and the request field
it concerns, so the OpenAI, KServe and msgpack front-ends report the same fault the same way.
"""


class ClientError(Exception):
    """A request the client must change; `field` names the offending part when there is one."""

    status = 400
    kind = "invalid_request_error"  # the OpenAI error type

    def __init__(self, message: str, field: str | None = None, *, status: int | None = None):
        super().__init__(message)
        self.message, self.field = message, field
        if status is not None:
            self.status = status

    def __reduce__(self):
        """Pickled as its fields (subclasses take other arguments): it crosses processes intact."""
        return _rebuilt, (type(self), self.message, self.field, self.status)


def _rebuilt(cls: type, message: str, field: str | None, status: int) -> ClientError:
    error = cls.__new__(cls)
    ClientError.__init__(error, message, field, status=status)
    return error


class InvalidParameter(ClientError, ValueError):
    """A request parameter is missing, of the wrong type or out of range; the message names it."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}", name)


class NotFound(ClientError):
    status = 404
    kind = "not_found_error"


class Unauthorized(ClientError):
    status = 401
    kind = "authentication_error"


class Forbidden(ClientError):
    """Authenticated, but this key may not do that (an inference key on an operations route)."""

    status = 403
    kind = "permission_error"


class TooLarge(ClientError):
    status = 413


class EngineUnavailable(ClientError):
    """The engine cannot take or finish requests (it stopped, or the server is shutting down)."""

    status = 503
    kind = "server_error"


class ModelFailure(ClientError):
    """The model failed on this request: not the client's doing, but reported in the same shape."""

    status = 500
    kind = "server_error"
