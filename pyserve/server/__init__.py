"""Front-ends: the HTTP app (OpenAI-compatible, KServe V2, metrics) and the msgpack TCP server,
run together on one event loop over one model registry.

Shutdown (Ctrl-C, SIGTERM, or `stop()`): both ports stop taking new work at once, open requests
get up to the drain time to finish, then the engines stop, and the process exits normally.
"""

import asyncio
import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass, field

import uvicorn

from ..engine.driver import EngineDriver
from .app import build_app
from .models import Loader, ModelRegistry
from .msgpack_server import MsgpackServer

log = logging.getLogger("pyserve.server")

DRAIN_SECONDS = 30


class _HTTPServer(uvicorn.Server):
    """uvicorn, with signals that start a drain and are not raised again after it (exit code 0)."""

    def __init__(self, config: uvicorn.Config, handle_signals: bool):
        super().__init__(config)
        self.handle_signals = handle_signals

    @contextlib.contextmanager
    def capture_signals(self):
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


async def _run(http: _HTTPServer, models: ModelRegistry, host: str, msgpack_port: int | None, bound: dict,
               drain_seconds: float) -> None:
    tcp = MsgpackServer(models) if msgpack_port is not None else None
    if tcp is not None:
        bound["msgpack_port"] = await tcp.start(host, msgpack_port)

    async def drain_msgpack_on_exit():
        while not http.should_exit:
            await asyncio.sleep(0.05)
        await tcp.drain(drain_seconds)

    watcher = asyncio.create_task(drain_msgpack_on_exit()) if tcp is not None else None
    try:
        await http.serve()
    finally:
        if watcher is not None:
            http.should_exit = True
            await watcher


@dataclass
class RunningServer:
    """Servers running in a background thread (tests, notebooks); `stop()` drains and joins."""

    http: uvicorn.Server
    thread: threading.Thread
    models: ModelRegistry
    bound: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        host, port = self.http.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    @property
    def msgpack_port(self) -> int:
        return self.bound["msgpack_port"]

    def stop(self) -> None:
        self.http.should_exit = True
        self.thread.join(timeout=60)
        self.models.shutdown()


def _config(models: ModelRegistry, api_key, feedback_db, host, port, log_level, drain_seconds) -> uvicorn.Config:
    return uvicorn.Config(build_app(models, api_key, feedback_db), host=host, port=port, log_level=log_level,
                          lifespan="off", timeout_graceful_shutdown=drain_seconds)


def start_in_thread(drivers: dict[str, EngineDriver], host: str = "127.0.0.1", port: int = 0,
                    api_key: str | None = None, msgpack_port: int | None = 0, feedback_db: str | None = None,
                    loader: Loader | None = None, drain_seconds: float = DRAIN_SECONDS) -> RunningServer:
    models = ModelRegistry(drivers, loader)
    http = _HTTPServer(_config(models, api_key, feedback_db, host, port, "warning", drain_seconds), False)
    bound: dict = {}
    thread = threading.Thread(target=lambda: asyncio.run(_run(http, models, host, msgpack_port, bound, drain_seconds)),
                              name="pyserve-servers", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started or (msgpack_port is not None and "msgpack_port" not in bound):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    return RunningServer(http, thread, models, bound)


def serve(drivers: dict[str, EngineDriver], host: str, port: int, msgpack_port: int | None, api_key: str | None,
          log_level: str, feedback_db: str, loader: Loader | None = None,
          drain_seconds: float = DRAIN_SECONDS) -> None:
    """Serve until Ctrl-C or SIGTERM, then drain both ports and return."""
    models = ModelRegistry(drivers, loader)
    http = _HTTPServer(_config(models, api_key, feedback_db, host, port, log_level.lower(), drain_seconds), True)
    print(f"pyserve: serving {', '.join(drivers)}: OpenAI API on http://{host}:{port}/v1, KServe V2 on "
          f"http://{host}:{port}/v2" + (f", msgpack on {host}:{msgpack_port}" if msgpack_port else ""), flush=True)
    try:
        asyncio.run(_run(http, models, host, msgpack_port, {}, drain_seconds))
    finally:
        models.shutdown()
    log.info("pyserve stopped")
