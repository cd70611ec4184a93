"""Limits on connections, before any request is read: a deadline for a request's headers, and a
cap on open connections, so that clients who connect and send nothing (or half a header) cannot
hold the server's file descriptors until it can no longer accept anyone.

HTTP: `guarded_http_protocol` is uvicorn's own HTTP protocol (the implementation uvicorn picks)
with both limits; an idle keep-alive connection is closed by uvicorn's keep-alive timeout. msgpack
(`msgpack_server`) applies the same numbers to its frames: the first frame, and the rest of any
frame once begun, within the header time; an idle connection with no request in flight closes
after `IDLE_SECONDS`.
"""

import asyncio
import resource

from uvicorn.protocols.http.auto import AutoHTTPProtocol

HEADER_SECONDS = 10.0  # from connecting, or from the last response, to a request's complete headers
IDLE_SECONDS = 300.0  # a msgpack connection with nothing in flight (clients keep one open between calls)
FD_HEADROOM = 128  # descriptors kept for model files, logs, worker pipes and the like


def default_max_connections() -> int:
    """Per port: half of the descriptors this process may open, less some headroom."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft - FD_HEADROOM) // 2)


REFUSED = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def guarded_http_protocol(max_connections: int, header_seconds: float = HEADER_SECONDS) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class, with a connection cap (a connection past it gets a 503 and is
    closed) and a header deadline (a 408, then the connection is closed)."""

    class GuardedHTTPProtocol(AutoHTTPProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _tail = b""  # the last bytes received, to find a header's end split over two reads

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(REFUSED)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._deadline is not None:
                if b"\r\n\r\n" in self._tail + data:
                    self._disarm()
                else:
                    self._tail = (self._tail + data)[-3:]
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers are due as the first one's were

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._tail = b""
            self._deadline = self.loop.call_later(header_seconds, self._headers_late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_late(self) -> None:
            self._deadline = None
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a (pipelined) request is being answered: not late
            if not self.transport.is_closing():
                self.transport.write(TIMED_OUT)
                self.transport.close()

    return GuardedHTTPProtocol
