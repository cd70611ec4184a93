"""Front-ends: the HTTP app (OpenAI-compatible, KServe V2, metrics) and the msgpack TCP server,
run together on one event loop over one model registry.

Shutdown (Ctrl-C, SIGTERM, or `stop()`): both ports stop taking new work at once, open requests
get up to the drain time to finish (idle TLS keep-alive connections end at once); what is still
open then gets a 503 (an error frame over msgpack) at once, even inside a long model call; the
engines get `ENGINE_STOP_SECONDS` in all to leave their step, and the process exits normally: within
the drain time and a few seconds, whatever a model call costs.
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
from ..finetune.runner import job_runner
from ..store import DataDir
from .app import background, build_app
from .config import ServerConfig
from .connections import guarded_http_protocol
from .fine_tuning_jobs import FineTuningJobs
from .models import Loader, ModelRegistry
from .msgpack_server import MsgpackServer

log = logging.getLogger("pyserve.server")

# After the drain time: for the 503s of ended requests to be written, and for the engines to stop.
ANSWER_SECONDS = 1.0
ENGINE_STOP_SECONDS = 3.0


class _HTTPServer(uvicorn.Server):
    """uvicorn, with signals that start a drain and are not raised again after it (exit code 0),
    and idle TLS connections ended at once on shutdown."""

    def __init__(self, config: uvicorn.Config, handle_signals: bool):
        super().__init__(config)
        self.handle_signals = handle_signals

    async def shutdown(self, sockets=None) -> None:
        """uvicorn's shutdown, with idle TLS connections ended at once. uvicorn closes an idle
        keep-alive connection, and over TLS the close waits for the client's close_notify, which a
        pooled client (the openai SDK's) never sends: every stop then took asyncio's 30 s TLS
        shutdown timeout.
        Once such a close has begun and nothing is left to write, the connection is aborted;
        connections still answering a request are not closing yet, and drain as before."""
        stopping = asyncio.ensure_future(super().shutdown(sockets))
        while not stopping.done():
            for connection in list(self.server_state.connections):
                transport = getattr(connection, "transport", None)
                if (transport is not None and transport.is_closing() and transport.get_extra_info("sslcontext")
                        and not transport.get_write_buffer_size()):
                    transport.abort()
            await asyncio.wait({stopping}, timeout=0.05)
        await stopping

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


async def _run(http: _HTTPServer, services: list, models: ModelRegistry, config: ServerConfig, bound: dict) -> None:
    for name, path in config.lora_adapters:
        await models.load_lora(name, path)
    for service in services:
        await service.start()
    tcp = MsgpackServer(models, config.access, config.allowed_image_hosts, config.max_connections,
                        config.header_seconds) if config.msgpack_port is not None else None
    if tcp is not None:
        bound["msgpack_port"] = await tcp.start(config.host, config.msgpack_port, config.ssl_context())

    serving = asyncio.create_task(http.serve())
    try:
        while not http.should_exit and not serving.done():
            await asyncio.wait({serving}, timeout=0.05)
    finally:  # both ports drain together; what the drain time leaves is ended with a 503
        http.should_exit = True
        draining = {serving} | ({asyncio.create_task(tcp.drain(config.drain_seconds + ANSWER_SECONDS))}
                                if tcp is not None else set())
        _, still_open = await asyncio.wait(draining, timeout=config.drain_seconds)
        if still_open:
            log.info("the drain time is over: ending the requests still open")
            models.end_open_requests("the server is shutting down")
            await asyncio.wait(still_open)
        for service in services:
            await service.stop()
        serving.result()


@dataclass
class RunningServer:
    """Servers running in a background thread (tests, notebooks); `stop()` drains and joins."""

    http: uvicorn.Server
    thread: threading.Thread
    models: ModelRegistry
    config: ServerConfig
    bound: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        host, port = self.http.servers[0].sockets[0].getsockname()[:2]
        return f"{'https' if self.config.tls else 'http'}://{host}:{port}"

    @property
    def msgpack_port(self) -> int:
        return self.bound["msgpack_port"]

    def stop(self) -> None:
        self.http.should_exit = True
        self.thread.join(timeout=60)
        self.models.shutdown(ENGINE_STOP_SECONDS)


def _http_server(models: ModelRegistry, config: ServerConfig, handle_signals: bool) -> tuple[_HTTPServer, list]:
    """uvicorn over the app, and the app's background services."""
    data = DataDir(config.data_dir or None)
    fine_tuning = FineTuningJobs(data, models, job_runner(config.finetune_threads, config.finetune_ray_address),
                                 config.model_dirs, config.finetune_jobs)
    app = build_app(models, config.access, config.allowed_image_hosts, data, config.store, config.store_days,
                    fine_tuning)
    return _HTTPServer(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level.lower(),
                                      http=guarded_http_protocol(config.max_connections, config.header_seconds),
                                      lifespan="off",
                                      timeout_graceful_shutdown=config.drain_seconds + ANSWER_SECONDS,
                                      ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile),
                       handle_signals), background(app)


def start_in_thread(drivers: dict[str, EngineDriver], config: ServerConfig | None = None,
                    loader: Loader | None = None) -> RunningServer:
    """Serve in a background thread; by default on free loopback ports, quietly."""
    config = config or ServerConfig(port=0, msgpack_port=0, log_level="warning")
    models = ModelRegistry(drivers, loader)
    http, services = _http_server(models, config, handle_signals=False)
    bound: dict = {}
    thread = threading.Thread(target=lambda: asyncio.run(_run(http, services, models, config, bound)),
                              name="pyserve-servers", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not http.started or (config.msgpack_port is not None and "msgpack_port" not in bound):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    return RunningServer(http, thread, models, config, bound)


def serve(drivers: dict[str, EngineDriver], config: ServerConfig, loader: Loader | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM, then drain both ports and return."""
    if not config.access.required and not config.loopback_only:
        log.warning("serving on %s with no API key: anyone who can reach this address can use every model and "
                    "the operations routes (pass --api-key and --admin-api-key)", config.host)
    models = ModelRegistry(drivers, loader)
    http, services = _http_server(models, config, handle_signals=True)
    scheme = "https" if config.tls else "http"
    base = f"{scheme}://{config.host}:{config.port}"
    print(f"pyserve: serving {', '.join(drivers)}: OpenAI API on {base}/v1, KServe V2 on {base}/v2"
          + (f", msgpack{' over TLS' if config.tls else ''} on {config.host}:{config.msgpack_port}"
             if config.msgpack_port is not None else ""), flush=True)
    try:
        asyncio.run(_run(http, services, models, config, {}))
    finally:
        models.shutdown(ENGINE_STOP_SECONDS)
    log.info("pyserve stopped")
