"""Fine-tuning jobs (OpenAI's /v1/fine_tuning/jobs), their events and checkpoints, per tenant.

A job is kept as its OpenAI object plus what the server needs to run it again after a restart
(the base model's name, where its adapters go); its status has a column of its own so a restart
can find the jobs that were queued or running.
"""

from __future__ import annotations  # annotations below name the builtin list, which a method shadows

import json
import time
import uuid
from dataclasses import asdict, dataclass, field

from ..errors import NotFound
from .database import Database

MAX_LIST = 100
ACTIVE = ("validating_files", "queued", "running")
FINAL = ("succeeded", "failed", "cancelled")


@dataclass
class FineTuningJob:
    model: str  # the base model's served name
    training_file: str
    method: dict  # OpenAI's method object, hyperparameters included
    output_dir: str  # where the adapter and its checkpoints are written
    validation_file: str | None = None
    suffix: str | None = None
    seed: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    id: str = field(default_factory=lambda: f"ftjob-{uuid.uuid4().hex[:24]}")
    tenant: str | None = None
    status: str = "validating_files"
    error: dict | None = None  # {"code", "message", "param"} when it failed
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    result_files: list[str] = field(default_factory=list)
    created_at: int = field(default_factory=lambda: int(time.time()))
    finished_at: int | None = None

    @property
    def model_name(self) -> str:
        """The name the finished model is served under: ft:{base}:{suffix}:{job id}."""
        return f"ft:{self.model}:{self.suffix or ''}:{self.id}"

    def body(self) -> dict:
        return {"object": "fine_tuning.job", "id": self.id, "model": self.model, "created_at": self.created_at,
                "finished_at": self.finished_at, "fine_tuned_model": self.fine_tuned_model, "status": self.status,
                "error": self.error, "training_file": self.training_file, "validation_file": self.validation_file,
                "hyperparameters": self.method[self.method["type"]]["hyperparameters"], "method": self.method,
                "trained_tokens": self.trained_tokens, "result_files": self.result_files, "seed": self.seed,
                "metadata": self.metadata or None, "user_provided_suffix": self.suffix, "organization_id": "pyserve",
                "integrations": None, "estimated_finish": None}


@dataclass
class Checkpoint:
    job_id: str
    step: int
    model: str  # served as ft:...:ckpt-step-{step}
    metrics: dict
    path: str
    id: str = field(default_factory=lambda: f"ftckpt-{uuid.uuid4().hex[:24]}")
    created_at: int = field(default_factory=lambda: int(time.time()))

    def body(self) -> dict:
        return {"object": "fine_tuning.job.checkpoint", "id": self.id, "created_at": self.created_at,
                "fine_tuned_model_checkpoint": self.model, "step_number": self.step,
                "metrics": {"step": self.step, **self.metrics}, "fine_tuning_job_id": self.job_id}


class FineTuningStore:
    def __init__(self, database: Database):
        self.database = database

    def add(self, job: FineTuningJob) -> None:
        with self.database.transaction() as db:
            db.execute("INSERT INTO fine_tuning_jobs (id, tenant, status, created_at, job) VALUES (?, ?, ?, ?, ?)",
                       (job.id, job.tenant, job.status, job.created_at, json.dumps(asdict(job))))

    def save(self, job: FineTuningJob) -> None:
        with self.database.transaction() as db:
            db.execute("UPDATE fine_tuning_jobs SET status = ?, job = ? WHERE id = ?",
                       (job.status, json.dumps(asdict(job)), job.id))

    def get(self, job_id: str, tenant: str | None) -> FineTuningJob:
        """The tenant's job; to another tenant it does not exist."""
        job = self.get_any(job_id)
        if job.tenant != tenant:
            raise NotFound(f"no fine-tuning job has id {job_id!r}", "fine_tuning_job_id")
        return job

    def get_any(self, job_id: str) -> FineTuningJob:
        """The job, whoever made it (the server's own view)."""
        with self.database.transaction() as db:
            row = db.execute("SELECT job FROM fine_tuning_jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no fine-tuning job has id {job_id!r}", "fine_tuning_job_id")
        return FineTuningJob(**json.loads(row[0]))

    def list(self, tenant: str | None, after: str | None = None, limit: int = 20,
             metadata: dict[str, str] | None = None) -> tuple[list[FineTuningJob], bool]:
        """A page of jobs, newest first, after the job `after`; and whether more follow."""
        query, args = "SELECT job FROM fine_tuning_jobs WHERE tenant IS ?", [tenant]
        if after is not None:
            query += " AND rowid < (SELECT rowid FROM fine_tuning_jobs WHERE id = ?)"
            args.append(after)
        with self.database.transaction() as db:
            rows = db.execute(query + " ORDER BY rowid DESC", args).fetchall()
        jobs = [FineTuningJob(**json.loads(row[0])) for row in rows]
        if metadata:
            jobs = [j for j in jobs if all(j.metadata.get(k) == v for k, v in metadata.items())]
        return jobs[:limit], len(jobs) > limit

    def with_status(self, statuses: tuple[str, ...]) -> list[FineTuningJob]:
        """Every tenant's jobs in these statuses, oldest first (the restart's view)."""
        with self.database.transaction() as db:
            rows = db.execute(f"SELECT job FROM fine_tuning_jobs WHERE status IN ({', '.join('?' * len(statuses))}) "
                              f"ORDER BY rowid", statuses).fetchall()
        return [FineTuningJob(**json.loads(row[0])) for row in rows]

    def add_event(self, job_id: str, message: str, *, kind: str = "message", level: str = "info",
                  data: dict | None = None) -> None:
        with self.database.transaction() as db:
            db.execute("INSERT INTO fine_tuning_events (job_id, created_at, level, message, type, data) VALUES "
                       "(?, ?, ?, ?, ?, ?)", (job_id, int(time.time()), level, message, kind,
                                              json.dumps(data) if data is not None else None))

    def events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """A page of a job's events, newest first (as OpenAI lists them), after the event `after`."""
        query, args = "SELECT id, created_at, level, message, type, data FROM fine_tuning_events WHERE job_id = ?", \
            [job_id]
        if after is not None and after.removeprefix("ftevent-").isdigit():
            query += " AND id < ?"
            args.append(int(after.removeprefix("ftevent-")))
        with self.database.transaction() as db:
            rows = db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit + 1)).fetchall()
        events = [{"object": "fine_tuning.job.event", "id": f"ftevent-{i}", "created_at": created, "level": level,
                   "message": message, "type": kind, "data": json.loads(data) if data else {}}
                  for i, created, level, message, kind, data in rows[:limit]]
        return events, len(rows) > limit

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        with self.database.transaction() as db:
            db.execute("INSERT INTO fine_tuning_checkpoints (id, job_id, created_at, step, model, metrics, path) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (checkpoint.id, checkpoint.job_id, checkpoint.created_at,
                                                        checkpoint.step, checkpoint.model,
                                                        json.dumps(checkpoint.metrics), checkpoint.path))

    def delete_checkpoints(self, job_id: str) -> None:
        with self.database.transaction() as db:
            db.execute("DELETE FROM fine_tuning_checkpoints WHERE job_id = ?", (job_id,))

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        """A job's checkpoints, newest first."""
        with self.database.transaction() as db:
            rows = db.execute("SELECT job_id, step, model, metrics, path, id, created_at FROM fine_tuning_checkpoints "
                              "WHERE job_id = ? ORDER BY step DESC", (job_id,)).fetchall()
        return [Checkpoint(job_id, step, model, json.loads(metrics), path, id_, created)
                for job_id, step, model, metrics, path, id_, created in rows]
