"""Training jobs on a Ray cluster: the same `train` as the local worker process, in a Ray actor
placed where the cluster has room (`num_cpus`, `num_gpus`). The job's paths (base model, data,
output) must name storage every node sees (a shared or network file system), as they do for a
single machine. See docs/scaling.md.

    pyserve serve --finetune-ray-address auto        # jobs go to the cluster this machine is in

Example:
    >>> runner = RayRunner(address="auto", num_cpus=4)                       # doctest: +SKIP
    >>> job = runner.start(spec); job.next_event(timeout=1.0)               # doctest: +SKIP
"""

import threading
from collections import deque
from dataclasses import asdict

from .runner import FINAL_KINDS
from .trainer import Cancelled, TrainingEvent, TrainingSpec, train


class _Trainer:
    """The actor: runs one job, keeps its events until they are read, stops when asked. Its two
    method calls (run, and drain or cancel) are served at once (max_concurrency=2)."""

    def __init__(self):
        self._events: deque[TrainingEvent] = deque()
        self._stop = threading.Event()

    def run(self, spec: TrainingSpec, threads: int | None) -> TrainingEvent:
        import torch
        if threads:
            torch.set_num_threads(threads)
        try:
            result = train(spec, report=self._events.append, cancelled=self._stop.is_set)
            return TrainingEvent("succeeded", data=asdict(result))
        except Cancelled:
            return TrainingEvent("cancelled")
        except Exception as exc:  # noqa: BLE001 - the job fails with the reason
            return TrainingEvent("failed", f"{type(exc).__name__}: {exc}")

    def drain(self) -> list[TrainingEvent]:
        events = list(self._events)
        for _ in events:
            self._events.popleft()
        return events

    def cancel(self) -> None:
        self._stop.set()


class RayRunner:
    """Each job in an actor with `num_cpus` CPUs (its torch threads) and `num_gpus` GPUs."""

    def __init__(self, address: str | None = None, num_cpus: int = 1, num_gpus: float = 0):
        import ray
        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, configure_logging=False)
        self._actor_class = ray.remote(_Trainer).options(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=2)
        self.num_cpus = num_cpus

    def start(self, spec: TrainingSpec) -> "RayJob":
        actor = self._actor_class.remote()
        return RayJob(actor, actor.run.remote(spec, self.num_cpus))


class RayJob:
    def __init__(self, actor, result):
        self._actor, self._result = actor, result
        self._pending: deque[TrainingEvent] = deque()
        self._ended = False

    def next_event(self, timeout: float) -> TrainingEvent | None:
        import ray
        if self._ended:
            return None
        if not self._pending:
            self._pending.extend(ray.get(self._actor.drain.remote()))
        if self._pending:
            return self._pending.popleft()
        done, _ = ray.wait([self._result], timeout=timeout)
        if not done:
            return None
        self._pending.extend(ray.get(self._actor.drain.remote()))  # what it reported just before the end
        if self._pending:
            return self._pending.popleft()
        try:
            event = ray.get(self._result)
        except ray.exceptions.RayError as exc:  # the actor or its node died
            event = TrainingEvent("failed", f"the training actor ended: {exc}")
        self._ended = event.kind in FINAL_KINDS
        ray.kill(self._actor)
        return event

    def cancel(self) -> None:
        self._actor.cancel.remote()
