"""Front-ends: the HTTP app (OpenAI-compatible) and how to run it."""

import logging
import threading
import time
from dataclasses import dataclass

import uvicorn

from ..engine.llm import AsyncLLMEngine
from .app import build_app

log = logging.getLogger("pyserve.server")


@dataclass
class RunningServer:
    """A server running in a background thread (tests, notebooks); `stop()` drains and joins."""

    server: uvicorn.Server
    thread: threading.Thread
    engines: dict[str, AsyncLLMEngine]

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        for engine in self.engines.values():
            engine.shutdown()


def start_in_thread(engines: dict[str, AsyncLLMEngine], host: str = "127.0.0.1", port: int = 0,
                    api_key: str | None = None) -> RunningServer:
    config = uvicorn.Config(build_app(engines, api_key), host=host, port=port, log_level="warning",
                            lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="pyserve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.01)
    return RunningServer(server, thread, engines)


def serve(engines: dict[str, AsyncLLMEngine], host: str, port: int, api_key: str | None, log_level: str) -> None:
    """Serve until Ctrl-C or SIGTERM; uvicorn stops accepting, lets open requests finish, then exits."""
    app = build_app(engines, api_key)
    log.info("OpenAI-compatible API on http://%s:%d/v1 (models: %s)", host, port, ", ".join(engines))
    print(f"pyserve: serving {', '.join(engines)} on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), lifespan="off",
                timeout_graceful_shutdown=30)
    for engine in engines.values():
        engine.shutdown()
