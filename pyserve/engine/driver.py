"""The engine driver: one thread owns an engine; the asyncio side talks to it through commands.

The event loop never waits on the engine. `submit` puts an "add" command on a queue and awaits
its admission (a `ClientError` from the engine's checks comes back as the exception of the first
`anext`), then reads outputs from an asyncio queue that the engine thread fills after each step.
Closing the stream (a client that went away) sends "abort", which frees the request's resources
at once. If the thread ever stops, `ready` turns false and every open and new request gets an
`EngineUnavailable` error at once instead of waiting forever.

Example:
    driver = EngineDriver(LLMEngine(model))
    async for out in driver.submit("r1", TextRequest("Hello", SamplingParams(max_tokens=8))):
        print(out.outputs[0].text)
    driver.shutdown()
"""

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ClientError, EngineUnavailable
from ..threads import in_daemon_thread
from .base import Engine, EngineStats, StepObserver

log = logging.getLogger("pyserve.engine")


class _Outputs:
    """A request's outputs waiting to be read, on its event loop. When the engine's outputs are
    cumulative, an unread one is replaced by the next, final ones included: a client that does
    not read holds one output, not a copy of every step's (two n=64 streams with logprobs grew
    by 440 MB). Errors and outputs of other engines queue in full (an image engine's previews)."""

    def __init__(self, cumulative: bool):
        self.cumulative = cumulative
        self._items: collections.deque = collections.deque()
        self._ready = asyncio.Event()

    def put(self, item: Any) -> None:
        last = self._items[-1] if self._items else None
        if (self.cumulative and last is not None and not isinstance(last, BaseException) and not last.finished
                and not isinstance(item, BaseException)):
            self._items[-1] = item
        else:
            self._items.append(item)
        self._ready.set()

    def __len__(self) -> int:
        return len(self._items)

    async def get(self) -> Any:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


@dataclass
class _Stream:
    """Where one request's outputs go: a mailbox on the loop that submitted it."""

    loop: asyncio.AbstractEventLoop
    outputs: _Outputs
    admitted: asyncio.Future

    def send(self, item: Any) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.outputs.put, item)
            return True
        except RuntimeError:  # the loop has closed: nobody is listening any more
            return False

    def admit(self, error: BaseException | None) -> None:
        def resolve():
            if not self.admitted.done():
                self.admitted.set_exception(error) if error else self.admitted.set_result(None)
        try:
            self.loop.call_soon_threadsafe(resolve)
        except RuntimeError:
            pass


@dataclass
class _Add:
    request_id: str
    request: Any
    stream: _Stream


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


@dataclass
class _Call:
    fn: Callable[[Any], Any]  # called with the engine, on its thread
    result: concurrent.futures.Future


class EngineDriver:
    """Runs `engine` (any `pyserve.engine.base.Engine`) in a thread of its own."""

    def __init__(self, engine: Engine, name: str = "pyserve-engine"):
        self._engine = engine
        self.info = engine.info
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # touched by the engine thread only
        self._stats = engine.stats()
        self._step_timers: list[Callable[[float], None]] = []
        self._ids = itertools.count()
        self._stopping = False
        self._open: dict[str, _Stream] = {}  # streams being read, touched on the asyncio side only
        self.failure: str | None = None  # why the thread stopped, if it stopped on its own
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- the asyncio side -------------------------------------------------------------------

    @property
    def task(self) -> str:
        return self.info.task

    def add_step_observer(self, observer: StepObserver | None = None,
                          timer: Callable[[float], None] | None = None) -> None:
        """observer(rows, work items) during every step and timer(seconds) after it, on the engine
        thread (metrics, a Ray replica's figures); call before submitting requests."""
        if observer is not None:
            self._engine.step_observers.append(observer)
        if timer is not None:
            self._step_timers.append(timer)

    @property
    def ready(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def stats(self) -> EngineStats:
        """The load after the latest step (a snapshot: never waits for the engine)."""
        return self._stats

    @property
    def requests_by_replica(self) -> dict[str, int]:
        """Requests each replica answered: none here, one engine in this process (pyserve.ray's
        driver over replicas counts them)."""
        return {}

    async def submit(self, request_id: str | None, request: Any) -> AsyncIterator[Any]:
        """Queue a request and stream its outputs; the last has `finished` set."""
        if not self.ready:
            raise EngineUnavailable(self._unavailable_reason())
        request_id = request_id or f"req-{next(self._ids)}"
        request = await in_daemon_thread(self._engine.prepare, request, name="pyserve-prepare")
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, _Outputs(self.info.cumulative_outputs), loop.create_future())
        self._commands.put(_Add(request_id, request, stream))
        if self._stopping:  # the thread may have drained the queue already: answer for it
            self._drain_pending_adds()
        finished = False
        self._open[request_id] = stream
        try:
            await stream.admitted  # raises the engine's ClientError for a refused request
            while not finished:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._open.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def buffered_outputs(self) -> int:
        """Outputs delivered by the engine and not yet read by their requests' readers, in all
        (asyncio side)."""
        return sum(len(stream.outputs) for stream in self._open.values())

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """fn(engine) on the engine's thread between steps (e.g. loading a LoRA adapter); its
        result, or its exception."""
        if not self.ready:
            raise EngineUnavailable(self._unavailable_reason())
        result: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Call(fn, result))
        return await asyncio.wrap_future(result)

    def end_open_requests(self, reason: str) -> None:
        """From the asyncio side: every request being read gets EngineUnavailable(reason) now, even
        while the engine thread is inside a long step (the end of a server's drain time), and the
        thread stops after that step."""
        for stream in self._open.values():
            stream.send(EngineUnavailable(reason))
        self.stop()

    def stop(self) -> None:
        """Ask the thread to stop after its current step; requests still open get EngineUnavailable."""
        self._stopping = True
        self._commands.put(_Stop())

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the thread to end; whether it has. A thread still
        inside a model call is a daemon: it does not hold the process."""
        self._thread.join(timeout=timeout)
        return not self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread and wait for it up to `timeout` seconds."""
        self.stop()
        self.join(timeout)

    def _unavailable_reason(self) -> str:
        if self.failure:
            return f"the engine stopped after an internal error ({self.failure}); the server must be restarted"
        return "the engine is shutting down"

    # -- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                busy = self._engine.has_unfinished()
                self._take_commands(wait=not busy)
                if self._stopping or not self._engine.has_unfinished():
                    self._stats = self._engine.stats()  # adds and aborts change the load too
                    continue
                started = time.monotonic()
                try:
                    outputs = self._engine.step()
                except Exception as exc:  # noqa: BLE001 - engines contain their faults; this is the backstop
                    log.exception("engine step failed; failing its %d open request(s)", len(self._streams))
                    outputs = []
                    self._fail_open(f"{type(exc).__name__}: {exc}")
                self._stats = self._engine.stats()
                for timer in self._step_timers:
                    timer(time.monotonic() - started)
                for out in outputs:
                    self._deliver(out)
        except BaseException as exc:  # noqa: BLE001 - record it, then fail everything open
            self.failure = f"{type(exc).__name__}: {exc}"
            log.critical("engine thread stopped: %s", self.failure, exc_info=True)
        finally:
            self._stopping = True
            self._fail_open(self._unavailable_reason())
            self._drain_pending_adds()

    def _take_commands(self, wait: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if wait else self._commands.get_nowait()
            while True:
                self._apply(command)
                command = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _apply(self, command) -> None:
        if isinstance(command, _Stop):
            self._stopping = True
        elif isinstance(command, _Call):
            try:
                command.result.set_result(command.fn(self._engine))
            except Exception as exc:  # noqa: BLE001 - the caller's to handle
                command.result.set_exception(exc)
        elif isinstance(command, _Abort):
            if self._streams.pop(command.request_id, None) is not None:
                self._engine.abort(command.request_id)
        elif self._stopping:
            command.stream.admit(EngineUnavailable(self._unavailable_reason()))
        else:
            try:
                self._engine.add(command.request_id, command.request)
            except ClientError as exc:
                command.stream.admit(exc)
            except Exception as exc:  # noqa: BLE001 - a bug in the engine's checks: this request's alone
                log.exception("admitting request %s failed", command.request_id)
                command.stream.admit(exc)
            else:
                self._streams[command.request_id] = command.stream
                command.stream.admit(None)

    def _deliver(self, out) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished:
            del self._streams[out.request_id]
        if not stream.send(out):
            self._streams.pop(out.request_id, None)
            self._engine.abort(out.request_id)

    def _fail_open(self, reason: str) -> None:
        for request_id, stream in list(self._streams.items()):
            stream.send(EngineUnavailable(reason))
            try:
                self._engine.abort(request_id)
            except Exception:  # noqa: BLE001 - the engine may be what broke
                pass
        self._streams.clear()

    def _drain_pending_adds(self) -> None:
        try:
            while True:
                command = self._commands.get_nowait()
                if isinstance(command, _Add):
                    command.stream.admit(EngineUnavailable(self._unavailable_reason()))
                elif isinstance(command, _Call):
                    command.result.set_exception(EngineUnavailable(self._unavailable_reason()))
        except queue.Empty:
            pass
