"""Prometheus metrics for the server, through prometheus_client (one registry per app)."""

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..engine.llm import AsyncLLMEngine, RequestOutput

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class EngineLoad:
    """Running / waiting sequences and KV-cache use, read from the engines at scrape time."""

    def __init__(self, engines: dict[str, AsyncLLMEngine]):
        self.engines = engines

    def collect(self):
        running = GaugeMetricFamily("pyserve_requests_running", "Sequences running", labels=["model"])
        waiting = GaugeMetricFamily("pyserve_requests_waiting", "Sequences waiting", labels=["model"])
        kv = GaugeMetricFamily("pyserve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", labels=["model"])
        for name, engine in self.engines.items():
            r, w, used = engine.engine.load()
            running.add_metric([name], r)
            waiting.add_metric([name], w)
            kv.add_metric([name], used)
        return [running, waiting, kv]


class Metrics:
    def __init__(self, engines: dict[str, AsyncLLMEngine]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pyserve_requests", "Finished requests by status", ["model", "status"], registry=r)
        self.prompt_tokens = Counter("pyserve_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("pyserve_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("pyserve_time_to_first_token_seconds", "Arrival to first token", ["model"],
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("pyserve_inter_token_latency_seconds", "Time between generated tokens "
                             "(each request's mean, once per token)", ["model"], buckets=_LATENCY, registry=r)
        self.e2e = Histogram("pyserve_e2e_request_latency_seconds", "Arrival to finish", ["model"],
                             buckets=_LATENCY, registry=r)
        self.queue = Histogram("pyserve_queue_time_seconds", "Arrival to first scheduled", ["model"],
                               buckets=_LATENCY, registry=r)
        self.batch_seqs = Histogram("pyserve_batch_size_sequences", "Sequences per engine step", ["model"],
                                    buckets=_SIZES, registry=r)
        self.batch_tokens = Histogram("pyserve_batch_size_tokens", "Tokens per engine step", ["model"],
                                      buckets=_SIZES, registry=r)
        r.register(EngineLoad(engines))  # reads the live dict, so loaded models appear too
        for name, engine in engines.items():
            self.attach(name, engine)

    def attach(self, name: str, engine: AsyncLLMEngine) -> None:
        engine.engine.on_step = self._step_observer(name)

    def _step_observer(self, model: str):
        def observe(num_seqs: int, num_tokens: int) -> None:
            self.batch_seqs.labels(model).observe(num_seqs)
            self.batch_tokens.labels(model).observe(num_tokens)
        return observe

    def finished(self, model: str, out: RequestOutput, status: str | None = None) -> None:
        """Record a request that ended (status: its finish reason unless given)."""
        generated = sum(len(o.token_ids) for o in out.outputs)
        status = status or ("error" if out.error else out.outputs[0].finish_reason or "unknown")
        self.requests.labels(model, status).inc()
        self.prompt_tokens.labels(model).inc(len(out.prompt_token_ids))
        self.generation_tokens.labels(model).inc(generated)
        t = out.times
        if t is None or t.finished is None:
            return
        self.e2e.labels(model).observe(t.finished - t.arrival)
        if t.first_scheduled is not None:
            self.queue.labels(model).observe(t.first_scheduled - t.arrival)
        if t.first_token is not None:
            self.ttft.labels(model).observe(t.first_token - t.arrival)
            per_seq = max(generated // max(len(out.outputs), 1), 1)
            if per_seq > 1:
                mean = (t.finished - t.first_token) / (per_seq - 1)
                for _ in range(per_seq - 1):
                    self.itl.labels(model).observe(mean)

    def render(self) -> bytes:
        return generate_latest(self.registry)
