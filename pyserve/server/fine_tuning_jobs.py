"""The server's fine-tuning jobs: checked at creation, queued, trained by a `JobRunner` (a worker
process by default) a few at a time, and their adapters served the moment they exist: each
checkpoint as `ft:{base}:{suffix}:{job}:ckpt-step-{n}`, the finished model as
`ft:{base}:{suffix}:{job}`, LoRA adapters on the base model's engine (in the same batches as the
base). Everything a job does is written to the data directory first, so a restart serves the
finished models again, queues the queued jobs again, and fails those that were running, saying why.
"""

import asyncio
import importlib.util
import logging
import re
import time
from pathlib import Path

from ..errors import ClientError, InvalidParameter, NotFound
from ..finetune.config import TrainingConfig
from ..finetune.data import read_examples
from ..finetune.runner import JobRunner, RunningJob
from ..finetune.report import write_report
from ..finetune.trainer import TrainingEvent, TrainingResult, TrainingSpec
from ..store import Checkpoint, DataDir, FineTuningJob
from ..store.fine_tuning import ACTIVE, FINAL
from ..tasks import TEXT_GENERATION
from . import adapters
from .models import ModelRegistry, ServedModel

log = logging.getLogger("pyserve.finetune")

MAX_SUFFIX = 64
# Jobs one key may have queued or running: training is the costliest thing a key can ask for.
MAX_ACTIVE_PER_KEY = 4
# How often a running job's events are looked for (and a cancel noticed).
POLL_SECONDS = 0.25


class FineTuningJobs:
    def __init__(self, data: DataDir, models: ModelRegistry, runner: JobRunner | None,
                 model_dirs: dict[str, str] | None = None, concurrent: int = 1):
        self.data, self.models, self.runner = data, models, runner
        self.model_dirs = {name: str(path) for name, path in (model_dirs or {}).items()}
        self.concurrent = concurrent
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._cancelled: set[str] = set()  # ids of jobs asked to stop
        self._running: dict[str, RunningJob] = {}
        self._workers: list[asyncio.Task] = []

    # -- the server's life

    async def start(self) -> None:
        """After a restart: serve the finished models again, fail the jobs that were running,
        queue the queued ones; then start taking jobs."""
        for job in await asyncio.to_thread(self.data.fine_tuning.with_status, ("succeeded",)):
            await self._serve_again(job)
        for job in await asyncio.to_thread(self.data.fine_tuning.with_status, ACTIVE):
            if job.status == "queued":
                self._queue.put_nowait(job.id)
            else:
                await self._finish(job, "failed", error=("server_restarted", "the server stopped while this job "
                                                         "was running; create the job again"))
        self._workers = [asyncio.create_task(self._work(), name=f"pyserve-finetune-{i}")
                         for i in range(self.concurrent)]

    async def stop(self) -> None:
        """Stop taking jobs and end the running ones; they stay `running` in the records, so the
        next start fails them with the reason."""
        for task in self._workers:
            task.cancel()
        for running in self._running.values():
            running.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def _serve_again(self, job: FineTuningJob) -> None:
        if job.model not in self.models:
            log.warning("fine-tuned model %s is not served: its base %s is not", job.fine_tuned_model, job.model)
            return
        checkpoints = await asyncio.to_thread(self.data.fine_tuning.checkpoints, job.id)
        for name, path in [(c.model, c.path) for c in checkpoints] + [(job.fine_tuned_model, _final(job))]:
            try:
                await self.models.load_lora(name, path, job.model)
            except ClientError as exc:
                log.warning("fine-tuned model %s is not served: %s", name, exc.message)

    # -- the routes' operations

    async def create(self, body: dict, tenant: str | None) -> FineTuningJob:
        """Check a job (model, files, method, hyperparameters, suffix, metadata) and queue it; a
        fault is a ClientError naming the field, and leaves no job behind."""
        if self.runner is None:
            raise ClientError("this server does not run fine-tuning jobs", "model")
        if importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None:
            raise ClientError('fine-tuning needs the finetune extra on the server: pip install "pyserve[finetune]"',
                              status=501)
        if not isinstance(body, dict):
            raise InvalidParameter("body", "must be a JSON object")
        served = self._base_model(body.get("model"))
        config = TrainingConfig.from_request(body.get("method"), body.get("hyperparameters"), body.get("seed"))
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", suffix)):
            raise InvalidParameter("suffix", f"must be 1 to {MAX_SUFFIX} letters, digits, '.', '_' or '-'")
        metadata = adapters.metadata(body.get("metadata"))
        paths = {}
        for name in ("training_file", "validation_file"):
            file_id = body.get(name)
            if file_id is None and name == "validation_file":
                continue
            paths[name] = path = await asyncio.to_thread(self._file_path, file_id, tenant, name)
            await asyncio.to_thread(read_examples, path, served.tokenizer, config.method, served.max_model_len, name)
        active = [j for j in await asyncio.to_thread(self.data.fine_tuning.with_status, ACTIVE) if j.tenant == tenant]
        if len(active) >= MAX_ACTIVE_PER_KEY:
            raise ClientError(f"this API key has {len(active)} fine-tuning jobs queued or running, the most it may "
                              f"have; wait for one to finish or cancel one", status=429)
        job = FineTuningJob(served.name, body["training_file"], config.method_object(), "",
                            validation_file=body.get("validation_file"), suffix=suffix, seed=config.seed,
                            metadata=metadata, tenant=tenant)
        job.output_dir = str(self.data.adapters / job.id)
        await asyncio.to_thread(self._add, job)
        self._queue.put_nowait(job.id)
        return job

    def _add(self, job: FineTuningJob) -> None:
        store = self.data.fine_tuning
        store.add(job)
        store.add_event(job.id, f"Validated training file: {job.training_file}")
        job.status = "queued"
        store.save(job)
        store.add_event(job.id, "Fine-tuning job queued")

    def _base_model(self, name) -> ServedModel:
        if not isinstance(name, str) or not name:
            raise InvalidParameter("model", "must be the name of a served text model")
        try:
            model = self.models.get(name)
        except NotFound:
            raise InvalidParameter("model", f"{name!r} is not served; served: {', '.join(self.models.names())}") \
                from None
        if model.lora is not None:
            raise InvalidParameter("model", f"{name!r} is a LoRA adapter; fine-tune its base {model.parent!r}")
        if model.task != TEXT_GENERATION or not model.driver.info.adapters:
            raise InvalidParameter("model", f"{name!r} is a {model.task} model; fine-tuning trains text models "
                                            f"that take LoRA adapters")
        base_dir = self.model_dirs.get(name)
        if base_dir is None or not (Path(base_dir) / "config.json").is_file():
            raise InvalidParameter("model", f"{name!r} cannot be fine-tuned: it was not loaded from a Hugging Face "
                                            f"model directory this server knows")
        return model

    def _file_path(self, file_id, tenant: str | None, name: str) -> str:
        if not isinstance(file_id, str) or not file_id:
            raise InvalidParameter(name, "must be the id of an uploaded file")
        try:
            record = self.data.files.get(file_id, tenant)
        except NotFound:
            raise InvalidParameter(name, f"no file has id {file_id!r}") from None
        if record.purpose != "fine-tune":
            raise InvalidParameter(name, f"{file_id} was uploaded with purpose {record.purpose!r}, not 'fine-tune'")
        return str(self.data.files.folder / record.id)

    async def cancel(self, job_id: str, tenant: str | None) -> FineTuningJob:
        job = await asyncio.to_thread(self.data.fine_tuning.get, job_id, tenant)
        if job.status in FINAL:
            raise ClientError(f"job {job_id} has already {job.status}", "fine_tuning_job_id")
        self._cancelled.add(job.id)
        running = self._running.get(job.id)
        if running is not None:
            running.cancel()
        else:  # queued: its worker will pass it by
            await self._finish(job, "cancelled")
        job.status = "cancelled"
        return job

    # -- running jobs

    async def _work(self) -> None:
        while True:
            job_id = await self._queue.get()
            job = await asyncio.to_thread(self.data.fine_tuning.get_any, job_id)
            if job.status != "queued" or job.id in self._cancelled:
                continue
            try:
                await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one job's fault never stops the queue
                log.exception("fine-tuning job %s failed", job.id)
                await self._finish(job, "failed", error=("internal_error", f"{type(exc).__name__}: {exc}"))

    async def _run(self, job: FineTuningJob) -> None:
        store = self.data.fine_tuning
        job.status = "running"
        await asyncio.to_thread(store.save, job)
        await asyncio.to_thread(store.add_event, job.id, "Fine-tuning job started")
        files = self.data.files
        spec = TrainingSpec(self.model_dirs[job.model], str(files.folder / job.training_file), job.output_dir,
                            TrainingConfig.from_request(job.method, seed=job.seed),
                            str(files.folder / job.validation_file) if job.validation_file else None)
        running = self._running[job.id] = await asyncio.to_thread(self.runner.start, spec)
        served: list[str] = []  # the checkpoints' models, unloaded again if the job does not succeed
        try:
            while True:
                event = await asyncio.to_thread(running.next_event, POLL_SECONDS)
                if event is None:
                    continue
                if event.kind in ("succeeded", "failed", "cancelled"):
                    break
                await self._record(job, event, served)
        finally:
            del self._running[job.id]
        if event.kind == "succeeded" and job.id not in self._cancelled:
            try:
                await self.models.load_lora(job.model_name, event.data["adapter_dir"], job.model)
            except ClientError as exc:
                event = TrainingEvent("failed", f"the trained adapter cannot be served: {exc.message}")
        if event.kind != "succeeded" or job.id in self._cancelled:
            for name in served:
                await self.models.unload_lora(name)
            await asyncio.to_thread(store.delete_checkpoints, job.id)
        if job.id in self._cancelled:
            await self._finish(job, "cancelled")
        elif event.kind == "succeeded":
            job.fine_tuned_model, job.trained_tokens = job.model_name, event.data["trained_tokens"]
            job.result_files = await asyncio.to_thread(self._result_files, job, TrainingResult(**event.data))
            await self._finish(job, "succeeded", message=f"The job has successfully completed: "
                                                         f"{event.data['steps']} steps in {event.data['seconds']:.1f} s")
        else:
            await self._finish(job, "failed", error=("training_failed", event.message or "training failed"))

    def _result_files(self, job: FineTuningJob, result: TrainingResult) -> list[str]:
        """The steps' metrics (CSV, as OpenAI's result file) and the loss curve (PNG), in the files API."""
        paths = write_report(result, job.output_dir, title=job.model_name)
        return [self.data.files.add(name, "fine-tune-results", paths[name].read_bytes(), job.tenant).id
                for name in ("metrics.csv", "loss.png")]

    async def _record(self, job: FineTuningJob, event: TrainingEvent, served: list[str]) -> None:
        store = self.data.fine_tuning
        if event.kind == "checkpoint" and job.id not in self._cancelled:
            name = f"{job.model_name}:ckpt-step-{event.data['step']}"
            await self.models.load_lora(name, event.data["path"], job.model)
            served.append(name)
            checkpoint = Checkpoint(job.id, event.data["step"], name, event.data["metrics"], event.data["path"])
            await asyncio.to_thread(store.add_checkpoint, checkpoint)
        kind = "metrics" if event.kind == "metrics" else "message"
        await asyncio.to_thread(store.add_event, job.id, event.message, kind=kind,
                                data=event.data if kind == "metrics" else None)

    async def _finish(self, job: FineTuningJob, status: str, message: str | None = None,
                      error: tuple[str, str] | None = None) -> None:
        job.status, job.finished_at = status, int(time.time())
        if error is not None:
            job.error = {"code": error[0], "message": error[1], "param": None}
        store = self.data.fine_tuning
        await asyncio.to_thread(store.save, job)
        text = message or (f"The job failed: {error[1]}" if error else f"The job was {status}")
        await asyncio.to_thread(store.add_event, job.id, text, level="error" if error else "info")
        log.info("fine-tuning job %s %s", job.id, status)


def _final(job: FineTuningJob) -> str:
    return str(Path(job.output_dir) / "final")
