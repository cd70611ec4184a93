"""The model registry: which models are served, by name, and loading or unloading them.

Every front-end reads models through one `ModelRegistry`; load and unload go through it too, so
nobody mutates a dict that others read live, and listeners (metrics) hear of each change.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine.driver import EngineDriver
from ..errors import ClientError, NotFound

log = logging.getLogger("pyserve.server")


@dataclass
class ServedModel:
    """A model behind a name: its engine driver, and what the front-ends need to know of it."""

    name: str
    driver: EngineDriver
    created: int = field(default_factory=lambda: int(time.time()))

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

    async def final_output(self, request, request_id: str | None = None):
        """Submit a request and return its last output (for answers that are not streamed)."""
        out = None
        async for out in self.driver.submit(request_id, request):
            pass
        return out


Loader = Callable[[str], EngineDriver]  # name -> the driver of a freshly loaded model


class ModelRegistry:
    def __init__(self, drivers: dict[str, EngineDriver], loader: Loader | None = None):
        self._models = {name: ServedModel(name, driver) for name, driver in drivers.items()}
        self._loader = loader
        self._listeners: list[Callable[[str, ServedModel | None], None]] = []

    def __iter__(self):
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str | None) -> ServedModel:
        """The model called `name`; None picks the only model when there is one."""
        if name is None:
            if len(self._models) == 1:
                return next(iter(self._models.values()))
            raise ClientError("model is required: this server serves several", "model")
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"the model {name!r} is not served; served: {', '.join(self._models)}", "model")
        return model

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
        self._models[name] = model = ServedModel(name, driver)
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

    def shutdown(self) -> None:
        for model in self._models.values():
            model.driver.shutdown()
