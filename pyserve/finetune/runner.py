"""Where a training job runs. `JobRunner` is the interface the server's job queue uses; the
default, `ProcessRunner`, trains in a worker process of its own (spawned, niced, with its own
torch threads), so the server's event loop and engines keep their cores and a crash in training
never takes serving down. Another runner (a Ray task, docs/scaling.md) implements the same two
methods.

A running job is read as a stream of `TrainingEvent`s ending with one of kind `succeeded` (data:
the TrainingResult's fields), `failed` (message: why) or `cancelled`.
"""

import multiprocessing
import os
import queue
from dataclasses import asdict
from typing import Protocol

from .trainer import Cancelled, TrainingEvent, TrainingSpec, train

FINAL_KINDS = ("succeeded", "failed", "cancelled")
# A cancelled job's process gets this long to leave its step before it is terminated.
CANCEL_SECONDS = 5.0


class RunningJob(Protocol):
    def next_event(self, timeout: float) -> TrainingEvent | None:
        """The next event, or None when none came within `timeout` seconds."""

    def cancel(self) -> None:
        """Stop training; a `cancelled` event follows (within CANCEL_SECONDS)."""


class JobRunner(Protocol):
    def start(self, spec: TrainingSpec) -> RunningJob:
        ...


class ProcessRunner:
    """Each job in a spawned process with `threads` torch threads (None: torch's default)."""

    def __init__(self, threads: int | None = None, niceness: int = 10):
        self.threads, self.niceness = threads, niceness
        self._context = multiprocessing.get_context("spawn")  # no fork of a process with running threads

    def start(self, spec: TrainingSpec) -> "ProcessJob":
        events, stop = self._context.Queue(), self._context.Event()
        process = self._context.Process(target=_work, args=(spec, events, stop, self.threads, self.niceness),
                                        name="pyserve-finetune", daemon=True)
        process.start()
        return ProcessJob(process, events, stop)


class ProcessJob:
    def __init__(self, process, events, stop):
        self.process, self._events, self._stop = process, events, stop
        self._ended = False

    def next_event(self, timeout: float) -> TrainingEvent | None:
        if self._ended:
            return None
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            if self.process.is_alive():
                if self._stop.is_set():
                    self.process.join(CANCEL_SECONDS)
                    if self.process.is_alive():  # stuck inside a step: end it
                        self.process.terminate()
                        self.process.join()
                        return self._end(TrainingEvent("cancelled"))
                return None
            try:  # it may have put its last event just before leaving
                event = self._events.get(timeout=0.5)
            except queue.Empty:
                return self._end(TrainingEvent("failed", f"the training process ended unexpectedly "
                                                         f"(exit code {self.process.exitcode})"))
        return self._end(event) if event.kind in FINAL_KINDS else event

    def _end(self, event: TrainingEvent) -> TrainingEvent:
        self._ended = True
        self.process.join(CANCEL_SECONDS)
        return event

    def cancel(self) -> None:
        self._stop.set()


def job_runner(threads: int | None = None, ray_address: str | None = None) -> JobRunner:
    """The local worker process, or actors on the Ray cluster at `ray_address` ("auto": the one
    this machine is in) with `threads` CPUs each."""
    if ray_address:
        from .ray_runner import RayRunner
        return RayRunner(ray_address, num_cpus=threads or 1)
    return ProcessRunner(threads)


def _work(spec: TrainingSpec, events, stop, threads: int | None, niceness: int) -> None:
    """The worker process: train, sending every event, and the end."""
    import torch

    if niceness:
        os.nice(niceness)  # serving comes first on a shared machine
    if threads:
        torch.set_num_threads(threads)
    parent = os.getppid()

    def orphaned() -> bool:  # the server died (SIGKILL): nobody reads the events any more
        return os.getppid() != parent

    try:
        result = train(spec, report=events.put, cancelled=lambda: orphaned() or stop.is_set())
        events.put(TrainingEvent("succeeded", data=asdict(result)))
    except Cancelled:
        events.put(TrainingEvent("cancelled"))
    except Exception as exc:  # noqa: BLE001 - the job fails with the reason; the server goes on
        events.put(TrainingEvent("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        if orphaned():  # exit now: flushing the queue into a pipe nobody reads would wait forever
            os._exit(0)
