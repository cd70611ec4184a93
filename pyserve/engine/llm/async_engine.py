"""The engine behind an asyncio server: the loop runs in its own thread; each request is an async
stream of outputs. Closing the stream (a client that went away) aborts the request and frees its
blocks at once."""

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator

from .engine import LLMEngine
from .params import SamplingParams
from .sequence import RequestOutput

log = logging.getLogger("pyserve.engine")


class AsyncLLMEngine:
    """Example:
        engine = AsyncLLMEngine(LLMEngine(model))
        async for out in engine.generate("Hello", SamplingParams(max_tokens=8)):
            print(out.outputs[0].text)
        engine.shutdown()
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="pyserve-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request; yields an output whenever it progresses, the last with finished=True."""
        request_id = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.engine.add_request(request_id, prompt, params)  # raises InvalidParameter for bad input
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                out: RequestOutput = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stopping:
            with self._lock:
                busy = self.engine.has_unfinished()
                outputs = self.engine.step() if busy else []
                routes = [(self._streams.get(o.request_id), o) for o in outputs]
                for out in outputs:
                    if out.finished:
                        self._streams.pop(out.request_id, None)
            for route, out in routes:
                if route is not None:
                    loop, queue = route
                    loop.call_soon_threadsafe(queue.put_nowait, out)
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
