"""Replicas on Ray Serve: the routes of `pyserve serve` (OpenAI, KServe V2, metrics) in front of
each model's engine running in N Ray Serve replicas.

Each replica is one pyserve engine (its own continuous batching, as `pyserve serve` runs it),
wrapped in an `EngineReplica` deployment with its resource requests; Ray Serve places the
replicas and restarts one that dies. Requests go to replicas by the beginning of their prompt
(`ray_routing.PrefixAffinityRouter`: a conversation's turns meet their cached prefix), or by
load when that replica is much busier than the rest. The ingress deployment runs pyserve's own
Starlette app over a model registry whose drivers are `ReplicaDriver`s: every front-end feature
works unchanged, streaming included. Needs the `ray` extra (`pip install "pyserve[ray]"`).

    from pyserve.ray import RayOptions, build_application
    from ray import serve
    serve.run(build_application({"tiny": "path/to/model"}, RayOptions(replicas=2)), route_prefix="/")

or `pyserve serve path/to/model --ray --replicas 2`.
"""

import collections
import concurrent.futures
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayError
from ray.serve.config import RequestRouterConfig
from ray.util import metrics as ray_metrics

from .engine import EngineDriver, load_engine
from .engine.base import EngineStats
from .errors import ClientError, EngineUnavailable
from .server.app import build_app
from .server.auth import AccessPolicy
from .server.models import ModelRegistry

log = logging.getLogger("pyserve.ray")

APP_NAME = "pyserve"


@dataclass
class RayOptions:
    """How `build_application` deploys: replicas per model (or an autoscaling config, Ray
    Serve's dict), what each replica asks of the cluster, and the engine options."""

    replicas: int = 1
    autoscaling: dict | None = None
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    engine_options: dict[str, Any] = field(default_factory=dict)
    access: AccessPolicy = field(default_factory=AccessPolicy)
    allowed_image_hosts: frozenset[str] = frozenset()


class EngineReplica:
    """One pyserve engine in a Ray Serve replica."""

    def __init__(self, model: str, model_dir: str, engine_options: dict):
        self.driver = EngineDriver(load_engine(model_dir, **engine_options))
        self.replica = serve.get_replica_context().replica_id.unique_id
        # Engine steps happen here, so their figures go out through Ray's metrics export
        # (Prometheus format on each node's metrics port), tagged by model and replica.
        tags = {"model": model, "replica": self.replica}
        batch = ray_metrics.Histogram("pyserve_replica_batch_size_tokens", "Tokens (or images) per engine step",
                                      boundaries=[1, 4, 16, 64, 256, 1024, 4096], tag_keys=tuple(tags))
        step = ray_metrics.Histogram("pyserve_replica_engine_step_seconds", "Time per engine step",
                                     boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5], tag_keys=tuple(tags))
        self.driver.add_step_observer(lambda rows, tokens: batch.observe(tokens, tags=tags),
                                      lambda seconds: step.observe(seconds, tags=tags))

    def info(self):
        return self.driver.info

    async def generate(self, request_id: str | None, request) -> AsyncIterator[tuple[str, EngineStats, Any]]:
        """The request's outputs, each with this replica's id and load. A client that goes away
        cancels this generator, and the driver aborts the request."""
        async for out in self.driver.submit(request_id, request):
            yield self.replica, self.driver.stats(), out


class ReplicaDriver:
    """The engine-driver surface the front-ends use, over a model's replicas."""

    def __init__(self, name: str, handle, info):
        self.name, self.handle, self.info = name, handle, info
        self._loads: dict[str, EngineStats] = {}  # each replica's load, as of its latest output
        # Which replica answered each request: the app's /metrics exports it per replica.
        self.requests_by_replica: collections.Counter[str] = collections.Counter()

    @property
    def task(self) -> str:
        return self.info.task

    @property
    def ready(self) -> bool:
        return True  # Ray Serve replaces replicas; a request with none alive fails on its own

    def stats(self) -> EngineStats:
        """The replicas' loads added up (cache use averaged), as their latest outputs reported."""
        loads = list(self._loads.values())
        if not loads:
            return EngineStats()
        return EngineStats(running=sum(s.running for s in loads), waiting=sum(s.waiting for s in loads),
                           cache_usage=sum(s.cache_usage for s in loads) / len(loads))

    def add_step_observer(self, observer=None, timer=None) -> None:
        """Steps happen in the replicas, which report them to Ray's metrics export instead."""

    async def submit(self, request_id: str | None, request) -> AsyncIterator[Any]:
        stream = self.handle.options(stream=True).generate.remote(request_id, request)
        replica = None
        try:
            async for answering, load, out in stream:
                if replica is None:  # counted when its replica starts answering
                    replica = answering
                    self.requests_by_replica[replica] += 1
                self._loads[replica] = load
                yield out
        except RayError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ClientError):  # the request's own fault, as the engine said it
                raise cause from None
            self._loads.pop(replica, None)  # a dead replica's last load no longer counts
            log.warning("%s: the replica serving request %s failed: %s", self.name, request_id,
                        type(exc).__name__)
            raise EngineUnavailable(f"the replica serving this request stopped ({type(exc).__name__}); "
                                    "retry: Ray Serve is replacing it") from None
        finally:
            stream.cancel()

    async def call(self, fn):
        raise ClientError("run-time model changes (e.g. LoRA loading) are not available on Ray replicas; "
                          "redeploy with the adapter instead", "model")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ray Serve owns the replicas' lifetime."""


def _ingress(model_names: list[str], options: RayOptions):
    """The ASGI app of the ingress replica: pyserve's app over replica drivers."""
    def info(name: str):
        handle = serve.get_deployment_handle(_deployment_name(name), app_name=APP_NAME)
        return ReplicaDriver(name, handle, handle.info.remote().result())

    def build():
        # The builder runs on the replica's event loop, where a handle may not block: the model
        # descriptions (tokenizer, limits) are fetched from a thread, once, before serving.
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(model_names)) as pool:
            drivers = dict(zip(model_names, pool.map(info, model_names)))
        return build_app(ModelRegistry(drivers), options.access, options.allowed_image_hosts)
    return build


def _deployment_name(model: str) -> str:
    return f"engine-{model}"


def build_application(models: dict[str, str], options: RayOptions | None = None):
    """A Ray Serve application: an `EngineReplica` deployment per model (name -> directory) and
    the ingress; pass it to `serve.run`."""
    options = options or RayOptions()
    engines = []
    for name, model_dir in models.items():
        scale = {"autoscaling_config": options.autoscaling} if options.autoscaling else \
            {"num_replicas": options.replicas}
        deployment = serve.deployment(EngineReplica, name=_deployment_name(name), max_ongoing_requests=1024,
                                      ray_actor_options={"num_cpus": options.cpus_per_replica,
                                                         "num_gpus": options.gpus_per_replica},
                                      request_router_config=RequestRouterConfig(
                                          request_router_class="pyserve.ray_routing.PrefixAffinityRouter"),
                                      **scale)
        engines.append(deployment.bind(name, str(model_dir), options.engine_options))
    ingress = serve.deployment(serve.ingress(_ingress(list(models), options))(_Ingress), name="ingress",
                               max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
    return ingress.bind(*engines)  # the engines are bound so that they deploy with the app


class _Ingress:
    def __init__(self, *engines):
        self.engines = engines


def run(models: dict[str, str], options: RayOptions, *, address: str | None, host: str, port: int) -> None:
    """Connect to (or start) Ray, deploy, and serve until Ctrl-C or SIGTERM; then take the
    application down (and the local Ray instance, when this started it)."""
    ray.init(address=address, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}})
    signal.signal(signal.SIGTERM, _interrupt)  # after Ray's own handlers, which would abort the process
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_application(models, options), name=APP_NAME, route_prefix="/")
        print(f"pyserve: serving {', '.join(models)} on Ray Serve ({options.replicas} replica(s) each): "
              f"OpenAI API on http://{host}:{port}/v1, KServe V2 on http://{host}:{port}/v2", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        serve.delete(APP_NAME)
        ray.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
