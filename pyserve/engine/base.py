"""What every engine offers the engine driver, whatever its task.

An engine describes itself in `info` and is driven from one thread only: `add` (validate and queue
a request, raising a `ClientError` for bad input), `abort`, `step` (run one batch; returns outputs
of the requests that progressed, each with `request_id`, `finished` and `error`), `has_unfinished`
and `stats`. Each step calls every one of `step_observers` with the step's rows and work items
(an LLM's sequences and tokens, a diffusion engine's images, a batch's requests and items).
The one exception is `prepare`, which the driver calls in a thread of its own before `add`: the
slow, thread-safe part of admission (compiling a structured-output constraint), so that it
never stalls the engine's steps.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class EngineInfo:
    """What front-ends need to know of an engine's model, fixed when the engine is built."""

    task: str
    tokenizer: Any = None  # a pyserve.tokenizer.Tokenizer, for text models
    max_model_len: int = 0
    operations: tuple = ()  # pyserve.tasks.Operation of tensor models: named inputs and outputs
    class_names: tuple[str, ...] = ()  # what a class-conditional model's class labels stand for
    vision: Any = None  # a pyserve.tasks.VisionSpec for text models that read images
    encoder: Any = None  # a pyserve.tasks.EncoderSpec for embedding models
    adapters: bool = False  # takes LoRA adapters (load_lora / unload_lora on the engine)
    max_batch_size: int = 0  # items a request's first dimension stacks into one batch; 0: not batched so
    # Each output holds everything before it (an LLM's text so far, every token's logprobs): an
    # unread one may be replaced by the next (the driver's backpressure for clients that do not read).
    cumulative_outputs: bool = False

    def operation(self, name: str | None = None, *, takes: str | None = None, makes: str | None = None):
        """The operation called `name`, or the first that takes and makes the named tensors; None if none."""
        for op in self.operations:
            if (name is None or op.name == name) and (takes is None or any(t.name == takes for t in op.inputs)) \
                    and (makes is None or any(t.name == makes for t in op.outputs)):
                return op
        return None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's load, taken on its own thread after each step."""

    running: int = 0
    waiting: int = 0
    cache_usage: float = 0.0  # fraction of the engine's cache (KV blocks, latents, ...) in use


@dataclass
class RequestTimes:
    """Wall-clock times (time.monotonic) of a request's life, for metrics; `first_token` is the
    first output of any kind (a token, a denoising step)."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


class EngineOutput(Protocol):
    request_id: str
    finished: bool
    error: str | None


StepObserver = Callable[[int, int], None]  # (rows, work items) of a step, on the engine's thread


class Engine(Protocol):
    info: EngineInfo
    step_observers: list[StepObserver]

    def prepare(self, request: Any) -> Any:
        """Off the engine thread, before `add`: the request with its slow parts done (or a
        ClientError); engines with nothing to prepare return it as it is."""

    def add(self, request_id: str, request: Any) -> None: ...

    def abort(self, request_id: str) -> Any: ...

    def step(self) -> list[EngineOutput]: ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> EngineStats: ...
