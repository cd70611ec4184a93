"""Prometheus metrics through prometheus_client (one registry per app), labelled by model and task
so that every engine kind reports into the same families."""

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
            for replica, count in getattr(model.driver, "requests_by_replica", {}).items():
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
        r.register(EngineLoad(models))
        for model in models:
            self.attach(model.name, model)
        models.on_change(self.attach)

    def attach(self, name: str, model: ServedModel | None) -> None:
        if model is not None:
            model.driver.set_step_observer(self._step_observer(model),
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

    def request_finished(self, model: ServedModel, out, images=None) -> None:
        """Record an image or tensor request that ended (its last output: `error`, `times`) and the
        images it made (an array of them, or None)."""
        labels = (model.name, model.task)
        self.requests.labels(*labels, "error" if out.error else "finished").inc()
        if images is not None and len(images):
            self.images.labels(*labels).inc(len(images))
        self._times(labels, out.times)

    def finished(self, model: ServedModel, outs: list, status: str | None = None) -> None:
        """Record requests that ended (status: the first one's finish reason unless given)."""
        labels = (model.name, model.task)
        for out in outs:
            generated = sum(len(o.token_ids) for o in out.outputs)
            state = status or ("error" if out.error else out.outputs[0].finish_reason or "unknown")
            self.requests.labels(*labels, state).inc()
            self.prompt_tokens.labels(*labels).inc(len(out.prompt_token_ids))
            self.generation_tokens.labels(*labels).inc(generated)
            t = out.times
            if not self._times(labels, t):
                continue
            if t.first_token is not None:
                self.ttft.labels(*labels).observe(t.first_token - t.arrival)
                per_seq = max(generated // max(len(out.outputs), 1), 1)
                if per_seq > 1:
                    mean = (t.finished - t.first_token) / (per_seq - 1)
                    for _ in range(per_seq - 1):
                        self.itl.labels(*labels).observe(mean)

    def render(self) -> bytes:
        return generate_latest(self.registry)
