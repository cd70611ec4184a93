"""Dynamic batching for one-shot models.

Requests queue per model. A batch goes as soon as the largest preferred size (or the max batch
size) can be formed; otherwise when the oldest queued request has waited `max_queue_delay_s`
since it arrived. Higher `priority` goes first, then arrival order. A request with more items
than fit is split across batches and answered once all its items are done, each request getting
its own slice. Past `max_queue_size` queued items new requests are refused at once (503); a
request that waited longer than its timeout gets a timeout error instead of a late answer.

Example:
    engine = BatchEngine(model, BatchPolicy(max_batch_size=16, max_queue_delay_s=0.002))
    engine.add("r1", TensorRequest({"seed": np.array([1, 2])}))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.outputs["images"].shape)   # (2, ...)
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ...errors import EngineUnavailable, InvalidParameter, TooLarge
from ...tasks import TENSOR, Operation, TensorModel, TensorSpec, operations_of
from ..base import EngineInfo, EngineStats, RequestTimes

log = logging.getLogger("pyserve.engine")

IDLE_POLL_S = 0.002  # how long a step waits for a batch to fill before handing back to the driver
TIMEOUT_STATUS = 504


@dataclass
class BatchPolicy:
    """A model's batching settings (its config's "batching" section, overridable per server)."""

    max_batch_size: int = 8
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_s: float = 0.005
    max_queue_size: int = 1024  # queued items
    timeout_s: float | None = None  # default per-request queue timeout

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_queue_size < 1 or self.max_queue_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1, max_queue_delay_s >= 0")
        if any(not 1 <= p <= self.max_batch_size for p in self.preferred_batch_sizes):
            raise ValueError(f"preferred_batch_sizes must lie in [1, {self.max_batch_size}]")

    @property
    def target(self) -> int:
        """The batch size that goes without waiting."""
        return max(self.preferred_batch_sizes, default=self.max_batch_size)

    @classmethod
    def from_config(cls, config: dict) -> "BatchPolicy":
        known = {k: v for k, v in config.items() if k in cls.__dataclass_fields__}
        if "preferred_batch_sizes" in known:
            known["preferred_batch_sizes"] = tuple(known["preferred_batch_sizes"])
        return cls(**known)


@dataclass
class TensorRequest:
    """Named input arrays whose first dimension stacks the request's items."""

    inputs: dict[str, np.ndarray]
    priority: int = 0  # higher goes first
    timeout_s: float | None = None
    operation: str | None = None  # for models that do several things; by default the one whose inputs were sent


@dataclass
class TensorOutput:
    request_id: str
    finished: bool = True
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    error: str | None = None
    status: int = 500  # the HTTP-like status of an error
    times: RequestTimes | None = None


@dataclass
class _Queued:
    request_id: str
    request: TensorRequest
    operation: Operation
    items: int
    times: RequestTimes
    deadline: float | None
    next_item: int = 0  # items before this one are in a batch already
    done: int = 0
    parts: list[tuple[int, dict[str, np.ndarray]]] = field(default_factory=list)


class BatchEngine:
    """Batches requests for one `TensorModel`. The policy comes from the model (its `batching`
    settings, from its directory's config, and `max_batch_size`); keyword options override it."""

    def __init__(self, model: TensorModel, policy: BatchPolicy | None = None, *, max_batch_size: int | None = None,
                 preferred_batch_sizes: tuple[int, ...] | None = None, max_queue_delay_s: float | None = None,
                 max_queue_size: int | None = None, timeout_s: float | None = None):
        if policy is None:
            config = {"max_batch_size": model.max_batch_size, **model.batching}
            policy = BatchPolicy.from_config(config)
        overrides = {"max_batch_size": max_batch_size, "preferred_batch_sizes": preferred_batch_sizes,
                     "max_queue_delay_s": max_queue_delay_s, "max_queue_size": max_queue_size, "timeout_s": timeout_s}
        self.policy = BatchPolicy(**{**policy.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
        self.model = model
        self.operations = operations_of(model)
        self.info = EngineInfo(TENSOR, operations=self.operations, class_names=tuple(model.class_names),
                               max_batch_size=self.policy.max_batch_size)
        self.requests: dict[str, _Queued] = {}
        self.queued_items = 0
        self.step_observers: list[Callable[[int, int], None]] = []  # (requests, items) of every batch

    # -- requests ------------------------------------------------------------------------------

    def prepare(self, request):
        return request  # nothing slow to do before `add`

    def add(self, request_id: str, request: TensorRequest) -> None:
        if request_id in self.requests:
            raise InvalidParameter("request_id", f"{request_id!r} is already in flight")
        operation = self._operation(request)
        items = self._check(request.inputs, operation)
        if items > self.policy.max_queue_size:  # could never be queued: not a matter of waiting
            raise TooLarge(f"{items} items exceed the queue's {self.policy.max_queue_size}; send at most that many "
                           "a request", next(iter(request.inputs)))
        if self.queued_items + items > self.policy.max_queue_size:
            raise EngineUnavailable(f"the queue is full ({self.queued_items} items waiting, limit "
                                    f"{self.policy.max_queue_size}); retry later")
        now = time.monotonic()
        timeout = request.timeout_s if request.timeout_s is not None else self.policy.timeout_s
        if timeout is not None and not timeout > 0:
            raise InvalidParameter("timeout", "must be a positive number of seconds")
        self.requests[request_id] = _Queued(request_id, request, operation, items, RequestTimes(now),
                                            None if timeout is None else now + timeout)
        self.queued_items += items

    def _operation(self, request: TensorRequest) -> Operation:
        if request.operation is not None or len(self.operations) == 1:
            for op in self.operations:
                if request.operation in (None, op.name):
                    return op
            raise InvalidParameter("operation", f"must be one of {', '.join(op.name for op in self.operations)}")
        sent = set(request.inputs)
        for op in self.operations:
            if {t.name for t in op.inputs} == sent:
                return op
        raise InvalidParameter("inputs", "send the inputs of one operation: " + "; ".join(
            f"{op.name} ({', '.join(t.name for t in op.inputs)})" for op in self.operations))

    def _check(self, inputs: dict[str, np.ndarray], operation: Operation) -> int:
        """The number of items, after checking every input against the operation's signature."""
        specs: dict[str, TensorSpec] = {s.name: s for s in operation.inputs}
        unknown = set(inputs) - set(specs)
        if unknown:
            raise InvalidParameter(sorted(unknown)[0], f"unknown input; the model takes {', '.join(specs)}")
        counts = set()
        for name, spec in specs.items():
            array = inputs.get(name)
            if array is None:
                raise InvalidParameter(name, "is required")
            if array.dtype != np.dtype(spec.dtype):
                raise InvalidParameter(name, f"must have dtype {spec.dtype}, got {array.dtype}")
            item_shape = array.shape[1:]
            if array.ndim != len(spec.shape) + 1 or any(s != -1 and s != n for s, n in zip(spec.shape, item_shape)):
                raise InvalidParameter(name, f"must have shape [n, {', '.join(map(str, spec.shape))}] "
                                             f"(-1: any), got {list(array.shape)}")
            counts.add(array.shape[0])
        if len(counts) != 1 or 0 in counts:
            raise InvalidParameter(next(iter(specs)), "every input must stack the same number (>= 1) of items")
        self.model.check(inputs, operation.name)  # the model's own value checks (a class label out of range)
        return counts.pop()

    def abort(self, request_id: str) -> TensorOutput | None:
        queued = self.requests.pop(request_id, None)
        if queued is None:
            return None
        self.queued_items -= queued.items - queued.next_item
        return TensorOutput(request_id, error="aborted")

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        return EngineStats(running=0, waiting=self.queued_items,
                           cache_usage=min(1.0, self.queued_items / self.policy.max_queue_size))

    # -- batching ------------------------------------------------------------------------------

    def step(self) -> list[TensorOutput]:
        """Expire timed-out requests, then run one batch if one is due; else wait a moment."""
        now = time.monotonic()
        outputs = [self._expire(q) for q in list(self.requests.values())
                   if q.deadline is not None and now > q.deadline and q.next_item == 0]
        waiting = sorted((q for q in self.requests.values() if q.next_item < q.items),
                         key=lambda q: (-q.request.priority, q.times.arrival))
        if not waiting:
            return outputs
        oldest = min(q.times.arrival for q in waiting)
        if now - oldest >= self.policy.max_queue_delay_s:  # waited long enough: whatever is there goes
            return outputs + self._run(waiting, min(self.queued_items, self.policy.max_batch_size))
        if self.queued_items >= self.policy.target:
            return outputs + self._run(waiting, self._preferred_size())
        time.sleep(min(IDLE_POLL_S, oldest + self.policy.max_queue_delay_s - now))
        return outputs

    def _preferred_size(self) -> int:
        available = min(self.queued_items, self.policy.max_batch_size)
        return max((p for p in self.policy.preferred_batch_sizes if p <= available), default=available)

    def _run(self, waiting: list[_Queued], size: int) -> list[TensorOutput]:
        taken: list[tuple[_Queued, int, int]] = []  # (request, first item, count)
        shapes = _item_shapes(waiting[0])  # other operations and shapes (-1 dimensions) wait for a batch of their own
        for q in waiting:
            if _item_shapes(q) != shapes:
                continue
            count = min(size - sum(c for _, _, c in taken), q.items - q.next_item)
            if count <= 0:
                break
            taken.append((q, q.next_item, count))
        start = time.monotonic()
        operation = waiting[0].operation
        batch = {spec.name: torch.from_numpy(np.concatenate([q.request.inputs[spec.name][i:i + c]
                                                             for q, i, c in taken]))
                 for spec in operation.inputs}
        for q, i, c in taken:
            q.next_item += c
            q.times.first_scheduled = q.times.first_scheduled or start
        self.queued_items -= sum(c for _, _, c in taken)
        for observe in self.step_observers:
            observe(len(taken), sum(c for _, _, c in taken))
        try:
            with torch.inference_mode():
                outputs = self.model.run(batch, operation.name)
                result = {name: t.cpu().numpy() for name, t in outputs.items()}
        except Exception as exc:  # noqa: BLE001 - this batch's requests fail; the engine goes on
            log.exception("batch of %d item(s) failed", sum(c for _, _, c in taken))
            return [self._fail(q.request_id, f"{type(exc).__name__}: {exc}") for q, _, _ in taken
                    if q.request_id in self.requests]
        outputs, at = [], 0
        for q, i, c in taken:
            q.parts.append((i, {name: array[at:at + c] for name, array in result.items()}))
            at += c
            q.done += c
            if q.done == q.items:
                outputs.append(self._finish(q))
        return outputs

    def _finish(self, q: _Queued) -> TensorOutput:
        del self.requests[q.request_id]
        parts = [p for _, p in sorted(q.parts, key=lambda part: part[0])]
        q.times.finished = q.times.first_token = time.monotonic()
        return TensorOutput(q.request_id, outputs={name: np.concatenate([p[name] for p in parts])
                                                   for name in parts[0]}, times=q.times)

    def _expire(self, q: _Queued) -> TensorOutput:
        self.abort(q.request_id)
        waited = time.monotonic() - q.times.arrival
        return TensorOutput(q.request_id, error=f"timed out after {waited:.3f}s in the queue",
                            status=TIMEOUT_STATUS, times=q.times)

    def _fail(self, request_id: str, error: str) -> TensorOutput:
        q = self.requests.pop(request_id)
        self.queued_items -= q.items - q.next_item
        return TensorOutput(request_id, error=error)


def _item_shapes(q: _Queued) -> tuple:
    """What items must share to go in one batch: the operation and every input's item shape."""
    return q.operation.name, tuple(sorted((name, array.shape[1:]) for name, array in q.request.inputs.items()))
