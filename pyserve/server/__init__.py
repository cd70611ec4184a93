"""Front-ends: the HTTP app (OpenAI-compatible, KServe V2, metrics), the msgpack TCP server, and
how to run them together on one event loop."""

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import uvicorn

from ..engine.llm import AsyncLLMEngine
from .app import build_app
from .msgpack_server import start_msgpack_server

log = logging.getLogger("pyserve.server")


async def _run(http: uvicorn.Server, engines: dict[str, AsyncLLMEngine], host: str, msgpack_port: int | None,
               bound: dict) -> None:
    tcp = await start_msgpack_server(engines, host, msgpack_port) if msgpack_port is not None else None
    if tcp is not None:
        bound["msgpack_port"] = tcp.sockets[0].getsockname()[1]
    try:
        await http.serve()
    finally:
        if tcp is not None:
            tcp.close()
            await tcp.wait_closed()


@dataclass
class RunningServer:
    """Servers running in a background thread (tests, notebooks); `stop()` drains and joins."""

    http: uvicorn.Server
    thread: threading.Thread
    engines: dict[str, AsyncLLMEngine]
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
        self.thread.join(timeout=30)
        for engine in self.engines.values():
            engine.shutdown()


def start_in_thread(engines: dict[str, AsyncLLMEngine], host: str = "127.0.0.1", port: int = 0,
                    api_key: str | None = None, msgpack_port: int | None = 0,
                    feedback_db: str | None = None, loader=None) -> RunningServer:
    config = uvicorn.Config(build_app(engines, api_key, feedback_db, loader), host=host, port=port, log_level="warning",
                            lifespan="off")
    http = uvicorn.Server(config)
    bound: dict = {}
    thread = threading.Thread(target=lambda: asyncio.run(_run(http, engines, host, msgpack_port, bound)),
                              name="pyserve-servers", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    return RunningServer(http, thread, engines, bound)


def serve(engines: dict[str, AsyncLLMEngine], host: str, port: int, msgpack_port: int | None, api_key: str | None,
          log_level: str, feedback_db: str, loader=None) -> None:
    """Serve until Ctrl-C or SIGTERM; uvicorn stops accepting, lets open requests finish, then exits."""
    config = uvicorn.Config(build_app(engines, api_key, feedback_db, loader), host=host, port=port, log_level=log_level.lower(),
                            lifespan="off", timeout_graceful_shutdown=30)
    print(f"pyserve: serving {', '.join(engines)}: OpenAI API on http://{host}:{port}/v1, KServe V2 on "
          f"http://{host}:{port}/v2" + (f", msgpack on {host}:{msgpack_port}" if msgpack_port else ""), flush=True)
    try:
        asyncio.run(_run(uvicorn.Server(config), engines, host, msgpack_port, {}))
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has drained; that is a normal exit
        pass
    finally:
        for engine in engines.values():
            engine.shutdown()
    log.info("pyserve stopped")
