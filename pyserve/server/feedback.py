"""Feedback on what was said: POST /v1/feedback rates a stored chat completion (`rating`, and the
`correction` that should have been given, and a `comment`); POST /v1/feedback/datasets turns a
caller's ratings into a fine-tuning file in the files API (supervised and DPO lines, see
`pyserve.store.feedback.dataset_lines`); GET /v1/feedback/export (operators) writes every rating
as JSONL with the rated messages and answer.

Example (with the demo server running):
    >>> done = client.chat.completions.create(model="pydoc-chat", store=True, messages=[...])  # doctest: +SKIP
    >>> requests.post(f"{url}/v1/feedback", json={"response_id": done.id, "rating": -1,          # doctest: +SKIP
    ...                                            "correction": "json.dumps writes JSON text."})
"""

import asyncio
import json
import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import InvalidParameter
from ..store import training_data
from ..store.feedback import dataset_lines
from . import adapters
from .records import tenant_of
from .responses import json_body

log = logging.getLogger("pyserve.server")

FEEDBACK_FIELD_CHARS = {"response_id": 256, "comment": 10_000, "correction": 100_000, "user": 256, "model": 256}
METHODS = ("supervised", "dpo", "both")


async def add_feedback(request: Request) -> Response:
    body = await json_body(request)
    response_id, rating = adapters.required_text(body, "response_id"), body.get("rating")
    if not isinstance(rating, int) or isinstance(rating, bool) or not -1 <= rating <= 5:
        raise InvalidParameter("rating", "must be an integer from -1 to 5 (-1/1 for thumbs)")
    for name, limit in FEEDBACK_FIELD_CHARS.items():  # a row is a rating, not a place to store files
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidParameter(name, "must be a string")
        if value is not None and len(value) > limit:
            raise InvalidParameter(name, f"must be at most {limit} characters")
    row = await asyncio.to_thread(request.app.state.data.feedback.add, response_id, rating, body.get("comment"),
                                  body.get("user"), body.get("model"), tenant_of(request), body.get("correction"))
    log.info("feedback %d on %s: rating %d", row, response_id, rating)
    return JSONResponse({"id": row, "object": "feedback"}, status_code=201)


async def build_dataset(request: Request) -> Response:
    """{"method": supervised | dpo | both, "model", "metadata": {k: v}, "created_after",
    "created_before"} -> a fine-tune file made of the caller's ratings of stored completions."""
    body = await json_body(request)
    method = body.get("method", "both")
    if method not in METHODS:
        raise InvalidParameter("method", f"must be one of {', '.join(METHODS)}")
    wanted = adapters.metadata(body.get("metadata"))
    bounds = []
    for name in ("created_after", "created_before"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidParameter(name, "must be a time in seconds since the epoch")
        bounds.append(value)
    data, tenant = request.app.state.data, tenant_of(request)

    def wanted_pairs():
        # a rating of something not stored (or deleted) has nothing to learn from
        return [(rating, record) for rating, record in data.feedback.with_completions(tenant)
                if record is not None and not ((body.get("model") and record.model != body["model"])
                                               or any(record.metadata.get(k) != v for k, v in wanted.items())
                                               or (bounds[0] is not None and record.created < bounds[0])
                                               or (bounds[1] is not None and record.created > bounds[1]))]
    lines, supervised, dpo = dataset_lines(await asyncio.to_thread(wanted_pairs), method)
    if not lines:
        raise InvalidParameter("method", "no rated stored completion matches: nothing to make a dataset of")
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    await asyncio.to_thread(training_data.check, content)  # what the files API would take
    name = f"feedback-{method}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    record = await asyncio.to_thread(data.files.add, name, "fine-tune", content, tenant)
    return JSONResponse({"object": "feedback.dataset", "file": record.body(), "supervised_lines": supervised,
                         "dpo_lines": dpo})


async def export_feedback(request: Request) -> Response:
    """Every rating (an operator's route), each with the rated messages and answer when stored."""
    data = request.app.state.data

    def rows() -> str:
        out = []
        for rating, record in data.feedback.with_completions(every_tenant=True):
            out.append({"id": rating.id, "response_id": rating.response_id, "rating": rating.rating,
                        "comment": rating.comment, "correction": rating.correction, "user": rating.user,
                        "model": rating.model, "created": rating.created,
                        "messages": record.request_messages if record else None,
                        "answer": record.completion["choices"][0]["message"].get("content") if record else None})
        return "".join(json.dumps(row) + "\n" for row in out)
    return Response(await asyncio.to_thread(rows), media_type="application/x-ndjson")
