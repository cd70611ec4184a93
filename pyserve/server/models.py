"""The model registry: which models are served, by name, and loading or unloading them.

Every front-end reads models through one `ModelRegistry`; load and unload go through it too, so
nobody mutates a dict that others read live, and listeners (metrics) hear of each change.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine.driver import EngineDriver
from ..errors import ClientError, InvalidParameter, NotFound
from ..lora import LoraAdapter

log = logging.getLogger("pyserve.server")


@dataclass
class ServedModel:
    """A model behind a name: its engine driver, and what the front-ends need to know of it."""

    name: str
    driver: EngineDriver
    created: int = field(default_factory=lambda: int(time.time()))
    lora: str | None = None  # a LoRA adapter's name: requests to this name run the parent with it
    parent: str | None = None  # the base model an adapter runs on
    # called as listener(model, last output, aborted) when a request ends, whatever carried it
    finish_listeners: list["FinishListener"] = field(default_factory=list, repr=False)

    @property
    def task(self) -> str:
        return self.driver.info.task

    @property
    def tokenizer(self):
        return self.driver.info.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.driver.info.max_model_len

    @property
    def vision(self):
        """A pyserve.tasks.VisionSpec when the model reads images."""
        return self.driver.info.vision

    async def submit(self, request_id: str | None, request: Any) -> AsyncIterator[Any]:
        """The driver's stream of outputs; when it ends, finished or not, the listeners hear of it."""
        last, finished = None, False
        try:
            async for out in self.driver.submit(request_id, request):
                last, finished = out, out.finished
                yield out
        finally:
            if last is not None:
                for listener in self.finish_listeners:
                    listener(self, last, not finished)

    async def final_output(self, request, request_id: str | None = None):
        """Submit a request and return its last output (for answers that are not streamed)."""
        out = None
        async for out in self.submit(request_id, request):
            pass
        return out


FinishListener = Callable[[ServedModel, Any, bool], None]


Loader = Callable[[str], EngineDriver]  # name -> the driver of a freshly loaded model


class ModelRegistry:
    def __init__(self, drivers: dict[str, EngineDriver], loader: Loader | None = None):
        self._finish_listeners: list[FinishListener] = []  # shared by every ServedModel
        self._models = {name: self._served(name, driver) for name, driver in drivers.items()}
        self._adapters: dict[str, ServedModel] = {}  # LoRA adapters, served under their own names
        self._loader = loader
        self._listeners: list[Callable[[str, ServedModel | None], None]] = []

    def _served(self, name: str, driver: EngineDriver, **fields) -> ServedModel:
        return ServedModel(name, driver, finish_listeners=self._finish_listeners, **fields)

    def __iter__(self):
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def names(self) -> list[str]:
        return list(self._models) + list(self._adapters)

    def get(self, name: str | None) -> ServedModel:
        """The model called `name` (as a client sent it: anything but a string is refused); None
        picks the only model when there is one."""
        if name is not None and not isinstance(name, str):
            raise InvalidParameter("model", "must be a string")
        if name is None:
            if len(self._models) == 1:
                return next(iter(self._models.values()))
            raise ClientError("model is required: this server serves several", "model")
        model = self._models.get(name) or self._adapters.get(name)
        if model is None:
            raise NotFound(f"the model {name!r} is not served; served: {', '.join(self.names())}", "model")
        return model

    def adapters(self) -> list[ServedModel]:
        return list(self._adapters.values())

    async def load_lora(self, name: str, path: str, base: str | None = None) -> ServedModel:
        """Load a PEFT LoRA adapter onto a text model (the only one when `base` is None) and serve
        it as `name`."""
        if name in self._models or name in self._adapters:
            raise ClientError(f"the name {name!r} is taken", "lora_name")
        parent = self.get(base)
        if parent.lora is not None or not parent.driver.info.adapters:
            raise ClientError(f"{parent.name!r} cannot take LoRA adapters", "model")
        # read and checked here, off the engine's thread (a slow or hostile path would stall every request)
        adapter = await asyncio.to_thread(LoraAdapter.load, name, path)
        await parent.driver.call(lambda engine: engine.load_lora(name, adapter))
        self._adapters[name] = adapter = self._served(name, parent.driver, lora=name, parent=parent.name)
        log.info("LoRA adapter %s loaded onto %s", name, parent.name)
        return adapter

    async def unload_lora(self, name: str) -> None:
        adapter = self._adapters.get(name)
        if adapter is None:
            raise NotFound(f"no LoRA adapter named {name!r} is served", "lora_name")
        await adapter.driver.call(lambda engine: engine.unload_lora(name))
        del self._adapters[name]

    def on_finish(self, listener: FinishListener) -> None:
        """Call listener(model, last output, aborted) whenever a request to any model ends."""
        self._finish_listeners.append(listener)

    def on_change(self, listener: Callable[[str, ServedModel | None], None]) -> None:
        """Call listener(name, model) after a load, listener(name, None) after an unload."""
        self._listeners.append(listener)

    async def load(self, name: str) -> None:
        if name in self._models:
            return
        if self._loader is None:
            raise ClientError("this server cannot load models")
        try:
            driver = await asyncio.to_thread(self._loader, name)
        except (KeyError, FileNotFoundError, LookupError) as exc:
            raise NotFound(f"cannot load {name!r}: {exc}", "model") from None
        self._models[name] = model = self._served(name, driver)
        for listener in self._listeners:
            listener(name, model)
        log.info("model %s loaded", name)

    async def unload(self, name: str) -> None:
        model = self._models.pop(name, None)
        if model is None:
            raise NotFound(f"model {name!r} is not served", "model")
        for listener in self._listeners:
            listener(name, None)
        await asyncio.to_thread(model.driver.shutdown)
        log.info("model %s unloaded", name)

    def end_open_requests(self, reason: str) -> None:
        """Every open request of every model gets a 503 (or an error frame) now; engines stop."""
        for model in self._models.values():
            model.driver.end_open_requests(reason)

    def shutdown(self, timeout: float = 3.0) -> None:
        """Stop every engine and wait for them, `timeout` seconds in all: a model call that takes
        longer is left to its daemon thread, which the process's exit ends."""
        for model in self._models.values():
            model.driver.stop()
        deadline = time.monotonic() + timeout
        for name, model in self._models.items():
            if not model.driver.join(max(0.0, deadline - time.monotonic())):
                log.warning("model %s was still inside a step when the server stopped", name)
