"""Prometheus metrics through prometheus_client (one registry per app), labelled by model and task
so that every engine kind reports into the same families.

Requests are counted where they end, in the model registry (`ModelRegistry.on_finish`), so that
every protocol (OpenAI, KServe, msgpack) reports the same names and labels; each task's
translator sums up its outputs as an `Outcome`."""

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import translators
from .models import ModelRegistry, ServedModel

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_LABELS = ["model", "task"]


class EngineLoad:
    """Running / waiting requests, cache use and readiness, read from the engine drivers at scrape time."""

    def __init__(self, models: ModelRegistry):
        self.models = models

    def collect(self):
        families = {
            "running": GaugeMetricFamily("pyserve_requests_running", "Sequences running", labels=_LABELS),
            "waiting": GaugeMetricFamily("pyserve_requests_waiting", "Sequences waiting", labels=_LABELS),
            "cache_usage": GaugeMetricFamily("pyserve_kv_cache_usage_ratio",
                                             "Fraction of the engine's cache in use", labels=_LABELS),
        }
        ready = GaugeMetricFamily("pyserve_engine_ready", "1 while the model's engine takes requests", labels=_LABELS)
        replicas = CounterMetricFamily("pyserve_replica_requests", "Requests answered by each replica (Ray Serve)",
                                       labels=[*_LABELS, "replica"])
        for model in self.models:
            stats, labels = model.driver.stats(), [model.name, model.task]
            for name, family in families.items():
                family.add_metric(labels, getattr(stats, name))
            ready.add_metric(labels, float(model.driver.ready))
            for replica, count in model.driver.requests_by_replica.items():
                replicas.add_metric([*labels, replica], count)
        return [*families.values(), ready, replicas]


class Metrics:
    def __init__(self, models: ModelRegistry):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pyserve_requests", "Finished requests by status", [*_LABELS, "status"], registry=r)
        self.prompt_tokens = Counter("pyserve_prompt_tokens", "Prompt tokens processed", _LABELS, registry=r)
        self.generation_tokens = Counter("pyserve_generation_tokens", "Tokens generated", _LABELS, registry=r)
        self.ttft = Histogram("pyserve_time_to_first_token_seconds", "Arrival to first output", _LABELS,
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("pyserve_inter_token_latency_seconds", "Time between generated tokens "
                             "(each request's mean, once per token)", _LABELS, buckets=_LATENCY, registry=r)
        self.e2e = Histogram("pyserve_e2e_request_latency_seconds", "Arrival to finish", _LABELS,
                             buckets=_LATENCY, registry=r)
        self.queue = Histogram("pyserve_queue_time_seconds", "Arrival to first scheduled", _LABELS,
                               buckets=_LATENCY, registry=r)
        self.batch_seqs = Histogram("pyserve_batch_size_sequences", "Requests' rows per engine step", _LABELS,
                                    buckets=_SIZES, registry=r)
        self.batch_tokens = Histogram("pyserve_batch_size_tokens", "Tokens (or images) per engine step", _LABELS,
                                      buckets=_SIZES, registry=r)
        self.step_time = Histogram("pyserve_engine_step_seconds", "Time per engine step", _LABELS,
                                   buckets=_LATENCY, registry=r)
        self.images = Counter("pyserve_images_generated", "Images generated", _LABELS, registry=r)
        self.last_finished: dict[str, float] = {}  # model -> wall time its latest request ended
        r.register(EngineLoad(models))
        for model in models:
            self.attach(model.name, model)
        models.on_change(self.attach)
        models.on_finish(self.finished)

    def attach(self, name: str, model: ServedModel | None) -> None:
        if model is not None:
            model.driver.add_step_observer(self._step_observer(model),
                                           self.step_time.labels(model.name, model.task).observe)

    def _step_observer(self, model: ServedModel):
        labels = (model.name, model.task)

        def observe(num_seqs: int, num_tokens: int) -> None:
            self.batch_seqs.labels(*labels).observe(num_seqs)
            self.batch_tokens.labels(*labels).observe(num_tokens)
        return observe

    def _times(self, labels: tuple, t) -> bool:
        """End-to-end and queue time of a finished request; whether it had its times."""
        if t is None or t.finished is None:
            return False
        self.e2e.labels(*labels).observe(t.finished - t.arrival)
        if t.first_scheduled is not None:
            self.queue.labels(*labels).observe(t.first_scheduled - t.arrival)
        return True

    def finished(self, model: ServedModel, out, aborted: bool) -> None:
        """Record a request that ended (its last output), on any protocol."""
        outcome = translators.for_model(model).outcome(out, aborted)
        labels = (model.name, model.task)
        self.last_finished[model.name] = time.time()
        self.requests.labels(*labels, outcome.status).inc()
        if outcome.prompt_tokens:
            self.prompt_tokens.labels(*labels).inc(outcome.prompt_tokens)
        if outcome.generated_tokens:
            self.generation_tokens.labels(*labels).inc(outcome.generated_tokens)
        if outcome.images:
            self.images.labels(*labels).inc(outcome.images)
        t = out.times
        if not self._times(labels, t) or t.first_token is None:
            return
        self.ttft.labels(*labels).observe(t.first_token - t.arrival)
        per_seq = max(outcome.generated_tokens // outcome.sequences, 1)
        if per_seq > 1:
            mean = (t.finished - t.first_token) / (per_seq - 1)
            for _ in range(per_seq - 1):
                self.itl.labels(*labels).observe(mean)

    def model_statistics(self, model: ServedModel) -> dict:
        """One model's figures in the shape of Triton's statistics extension (GET
        /v2/models/{m}/stats): request counts by outcome, their summed latency and queue time, and
        the engine's steps (Triton's executions) with their summed time. Times are nanoseconds;
        `success.ns` sums the end-to-end time of every timed request, failed ones included."""
        labels = {"model": model.name, "task": model.task}

        def value(name: str, **more) -> float:
            return self.registry.get_sample_value(name, {**labels, **more}) or 0.0

        by_status = {sample.labels["status"]: sample.value for family in self.requests.collect()
                     for sample in family.samples
                     if sample.name == "pyserve_requests_total" and sample.labels["model"] == model.name}
        failed = sum(n for status, n in by_status.items() if status in ("error", "abort"))
        succeeded = sum(by_status.values()) - failed

        def stat(count: float, seconds: float) -> dict:
            return {"count": int(count), "ns": int(seconds * 1e9)}
        steps = value("pyserve_engine_step_seconds_count")
        return {"name": model.name, "version": "1", "last_inference": int(self.last_finished.get(model.name, 0) * 1000),
                "inference_count": int(succeeded), "execution_count": int(steps),
                "inference_stats": {"success": stat(succeeded, value("pyserve_e2e_request_latency_seconds_sum")),
                                    "fail": stat(failed, 0.0),
                                    "queue": stat(value("pyserve_queue_time_seconds_count"),
                                                  value("pyserve_queue_time_seconds_sum")),
                                    "compute_input": stat(0, 0.0),
                                    "compute_infer": stat(steps, value("pyserve_engine_step_seconds_sum")),
                                    "compute_output": stat(0, 0.0)},
                "batch_stats": []}

    def render(self) -> bytes:
        return generate_latest(self.registry)
