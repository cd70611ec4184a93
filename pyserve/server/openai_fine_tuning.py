"""OpenAI's fine-tuning API: POST /v1/fine_tuning/jobs (create), GET /v1/fine_tuning/jobs (`after`,
`limit`, `metadata[key]=value`), GET /v1/fine_tuning/jobs/{id}, POST .../{id}/cancel,
GET .../{id}/events and GET .../{id}/checkpoints. The jobs themselves are `FineTuningJobs`'
(pyserve.server.fine_tuning_jobs); jobs belong to the key that made them.

Example (with the demo server running and a fine-tune file uploaded):
    >>> job = client.fine_tuning.jobs.create(model="pydoc-chat", training_file=file.id,   # doctest: +SKIP
    ...                                      method={"type": "supervised", "supervised": {
    ...                                          "hyperparameters": {"n_epochs": 3, "rank": 8}}})
    >>> client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model                        # doctest: +SKIP
    'ft:pydoc-chat::ftjob-...'
"""

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .records import by_path, int_param, metadata_filter, page, page_after, tenant_of
from .responses import json_body


async def create(request: Request) -> Response:
    job = await request.app.state.fine_tuning.create(await json_body(request), tenant_of(request))
    return JSONResponse(job.body())


async def list_jobs(request: Request) -> Response:
    metadata = metadata_filter(request)
    jobs, has_more = await asyncio.to_thread(request.app.state.data.fine_tuning.list, tenant_of(request),
                                             request.query_params.get("after"), int_param(request, "limit", 20),
                                             metadata)
    return JSONResponse(page([job.body() for job in jobs], has_more))


async def retrieve(request: Request) -> Response:
    return JSONResponse((await by_path(request, request.app.state.data.fine_tuning.get, "job_id")).body())


async def cancel(request: Request) -> Response:
    job = await request.app.state.fine_tuning.cancel(request.path_params["job_id"], tenant_of(request))
    return JSONResponse(job.body())


async def events(request: Request) -> Response:
    job = await by_path(request, request.app.state.data.fine_tuning.get, "job_id")
    found, has_more = await asyncio.to_thread(request.app.state.data.fine_tuning.events, job.id,
                                              request.query_params.get("after"), int_param(request, "limit", 20))
    return JSONResponse(page(found, has_more))


async def checkpoints(request: Request) -> Response:
    job = await by_path(request, request.app.state.data.fine_tuning.get, "job_id")
    found = await asyncio.to_thread(request.app.state.data.fine_tuning.checkpoints, job.id)
    return JSONResponse(page_after(request, [c.body() for c in found], default_limit=10))


routes = [
    Route("/v1/fine_tuning/jobs", create, methods=["POST"]),
    Route("/v1/fine_tuning/jobs", list_jobs, methods=["GET"]),
    Route("/v1/fine_tuning/jobs/{job_id}", retrieve, methods=["GET"]),
    Route("/v1/fine_tuning/jobs/{job_id}/cancel", cancel, methods=["POST"]),
    Route("/v1/fine_tuning/jobs/{job_id}/events", events, methods=["GET"]),
    Route("/v1/fine_tuning/jobs/{job_id}/checkpoints", checkpoints, methods=["GET"]),
]
