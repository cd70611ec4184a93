"""The HTTP app (Starlette): route lists from each API module, operations routes, and the
exception handlers that turn every error into the API's JSON shape.

Handlers reach models only through the `ModelRegistry` in `app.state.models` and engines only
through their drivers; a client that goes away mid-stream aborts its requests.
"""

import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ClientError
from ..store import DataDir
from . import (feedback, kserve, openai_api, openai_embeddings, openai_files, openai_fine_tuning, openai_images,
               openai_responses, stored_completions, vector_stores)
from .auth import AccessPolicy
from .fine_tuning_jobs import FineTuningJobs
from .retrieval import Retrieval
from .metrics import Metrics
from .middleware import Guard
from .vision_inputs import ImageFetcher
from .models import ModelRegistry
from .responses import ClientGone, error_response, on_client_gone

log = logging.getLogger("pyserve.server")


async def health(request: Request) -> Response:
    down = [m.name for m in request.app.state.models if not m.driver.ready]
    if down:
        return JSONResponse({"status": "unavailable", "engines_down": down}, status_code=503)
    return JSONResponse({"status": "ok"})


async def prometheus(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


async def repository_index(request: Request) -> Response:
    return JSONResponse([{"name": m.name, "version": "1", "state": "READY" if m.driver.ready else "UNAVAILABLE"}
                         for m in request.app.state.models])


async def repository_load(request: Request) -> Response:
    await request.app.state.models.load(request.path_params["model"])
    return JSONResponse({})


async def repository_unload(request: Request) -> Response:
    await request.app.state.models.unload(request.path_params["model"])
    return JSONResponse({})


def background(app: Starlette) -> list:
    """The app's background services, each with async start() and stop()."""
    return [app.state.fine_tuning, app.state.retrieval]


async def on_client_error(request: Request, exc: ClientError) -> Response:
    log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    return error_response(request.url.path, exc)


async def on_http_error(request: Request, exc: HTTPException) -> Response:
    return error_response(request.url.path, ClientError(exc.detail, status=exc.status_code))


async def on_server_error(request: Request, exc: Exception) -> Response:
    return error_response(request.url.path, ClientError(f"internal error: {type(exc).__name__}", status=500))


# The operations routes: only the admin key reaches them (see pyserve.server.auth).
admin_routes = [
    Route("/v1/feedback/export", feedback.export_feedback),
    Route("/v2/repository/models/{model}/load", repository_load, methods=["POST"]),
    Route("/v2/repository/models/{model}/unload", repository_unload, methods=["POST"]),
    # Loading reads a path on the server: an operator's act, as loading models is.
    Route("/v1/load_lora_adapter", openai_api.load_lora_adapter, methods=["POST"]),
    Route("/v1/unload_lora_adapter", openai_api.unload_lora_adapter, methods=["POST"]),
]


def build_app(models: ModelRegistry, policy: AccessPolicy | None = None, image_hosts: frozenset[str] = frozenset(),
              data: DataDir | None = None, store_all: bool = False, store_days: float | None = None,
              fine_tuning: FineTuningJobs | None = None) -> Starlette:
    """The app over the models in `models`; its repository routes load and unload through it.
    `data` keeps stored completions, responses, files, feedback and fine-tuning jobs (None: in
    memory); `store_all` stores every chat completion that does not say `store: false`; records
    older than `store_days` are deleted at start. `fine_tuning` runs the jobs (None: jobs are
    refused). The background services (`background(app)`: fine-tuning jobs, vector-store
    indexing) are started and stopped by the caller, on the server's event loop."""
    app = Starlette(routes=[
        Route("/health", health),
        Route("/metrics", prometheus),
        Route("/v1/feedback", feedback.add_feedback, methods=["POST"]),
        Route("/v1/feedback/datasets", feedback.build_dataset, methods=["POST"]),
        Route("/v2/repository/index", repository_index, methods=["GET", "POST"]),
        *admin_routes,
        *stored_completions.routes,
        *openai_api.routes,
        *openai_images.routes,
        *openai_embeddings.routes,
        *openai_responses.routes,
        *openai_files.routes,
        *openai_fine_tuning.routes,
        *vector_stores.routes,
        *kserve.routes,
    ], middleware=[Middleware(Guard, policy=policy or AccessPolicy(), admin_routes=admin_routes)], exception_handlers={
        ClientError: on_client_error, ClientGone: on_client_gone, HTTPException: on_http_error,
        Exception: on_server_error})
    app.state.models = models
    app.state.metrics = Metrics(models)
    app.state.data = data or DataDir(None)
    app.state.store_all = store_all
    app.state.fine_tuning = fine_tuning or FineTuningJobs(app.state.data, models, runner=None)
    app.state.retrieval = Retrieval(app.state.data, models)
    if store_days is not None:
        cutoff = time.time() - store_days * 86400
        expired = app.state.data.completions.expire(cutoff) + app.state.data.responses.expire(cutoff)
        log.info("%d stored completion(s) and response(s) older than %g days deleted", expired, store_days)
    app.state.images = ImageFetcher(image_hosts)  # remote images in chat messages
    return app
