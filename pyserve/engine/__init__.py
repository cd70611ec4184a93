"""Engines drive models through the task protocols; `build_engine` picks one for a model's task.

    engine = load_engine("path/to/model", kv_cache_memory=2**30)   # plugin, model and engine
    driver = EngineDriver(engine)                                  # for an asyncio server
"""

import importlib
import inspect
import logging
from pathlib import Path
from typing import Any

import torch

from ..nn import pack_as_asked
from ..plugin import PluginRegistry
from ..tasks import EMBEDDING, IMAGE_GENERATION, TENSOR, TEXT_GENERATION
from .base import Engine, EngineInfo, EngineStats
from .driver import EngineDriver

log = logging.getLogger("pyserve.engine")

__all__ = ["Engine", "EngineDriver", "EngineInfo", "EngineStats", "build_engine", "default_device", "load_engine",
           "run_engine"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# The engine class of each task (its module here, its name), imported when first asked for.
ENGINES = {TEXT_GENERATION: ("llm", "LLMEngine"), IMAGE_GENERATION: ("diffusion", "DiffusionEngine"),
           TENSOR: ("batch", "BatchEngine"), EMBEDDING: ("embedding", "EncoderEngine")}


def engine_class(task: str) -> type:
    if task not in ENGINES:
        raise ValueError(f"no engine serves the task {task!r}; tasks: {', '.join(ENGINES)}")
    module, name = ENGINES[task]
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def engine_options(task: str) -> set[str]:
    """The keyword options the engine of `task` takes."""
    return {name for name, p in inspect.signature(engine_class(task)).parameters.items()
            if p.kind == p.KEYWORD_ONLY or p.default is not p.empty}


def build_engine(task: str, model: Any, **options) -> Engine:
    """The engine for a loaded model of `task`, with engine options (cache size, batch limits).
    A server passes one set of options for all its models, so an option that another task's
    engine takes is left out here; one that no engine takes is an error."""
    known = engine_options(task)
    unknown = set(options) - known - set().union(*(engine_options(t) for t in ENGINES if t != task))
    if unknown:
        raise TypeError(f"unknown engine option(s) {', '.join(sorted(unknown))}; the {task} engine takes "
                        f"{', '.join(sorted(known))}")
    return engine_class(task)(model, **{k: v for k, v in options.items() if k in known})


def load_engine(model_dir: str | Path, *, registry: PluginRegistry | None = None,
                plugin_dirs: list[str] | None = None, device: str | None = None, dtype: torch.dtype | None = None,
                quantization: str | None = None, tensor_parallel_size: int = 1, task: str | None = None,
                **options) -> Engine:
    """Find the plugin for model_dir, load the model (packing its weights when `quantization` is
    bf16, int8 or int4; None keeps the checkpoint's own: packed for a Q8_0/Q4_0 GGUF file), and
    build the engine for its task. `tensor_parallel_size` > 1 splits a text model over that many
    ranks (pyserve.parallel). `task="embed"` serves a text-generation model as an embedder
    (last-token pooling, `embedding.DecoderEmbedder`)."""
    registry = registry or PluginRegistry.discover(plugin_dirs)
    plugin = registry.for_model(model_dir)
    if task == "embed" and plugin.task == TEXT_GENERATION:
        from .embedding.decoder import DecoderEmbedder
        model = plugin.load(Path(model_dir), device=device or default_device(), dtype=dtype)
        return build_engine(EMBEDDING, DecoderEmbedder(model), **options)
    if task not in (None, "auto", "generate", "embed") or (task == "embed" and plugin.task != EMBEDDING):
        raise ValueError(f"{Path(model_dir).name}: task {task!r} does not fit a {plugin.task} model")
    if tensor_parallel_size > 1:
        if plugin.task != TEXT_GENERATION:
            raise ValueError(f"{Path(model_dir).name}: tensor parallelism serves text-generation models only")
        from ..parallel import load_tensor_parallel
        model = load_tensor_parallel(plugin, model_dir, tensor_parallel_size, device=device or default_device(),
                                     dtype=dtype, quantization=quantization, plugin_dirs=plugin_dirs)
        return build_engine(plugin.task, model, **options)
    model = plugin.load(Path(model_dir), device=device or default_device(), dtype=dtype)
    report = pack_as_asked(model, quantization)
    if report is not None:
        log.info("%s: %s", Path(model_dir).name, report)
    return build_engine(plugin.task, model, **options)


def run_engine(engine: Engine, requests: dict) -> dict:
    """Offline, without a driver: add every request (id -> request) to an engine of any task and
    step it until all finish; returns the last output of each."""
    for request_id, request in requests.items():
        engine.add(request_id, request)
    outs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id] = out
    return outs
