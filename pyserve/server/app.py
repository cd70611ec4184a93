"""The HTTP front-end (Starlette): OpenAI-compatible /v1 routes, KServe V2 /v2 routes, health, metrics.

It talks to engines only through `AsyncLLMEngine.generate` (an async stream of outputs); a client
that goes away mid-stream closes that stream, which aborts the request and frees its blocks.
"""

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine.llm import AsyncLLMEngine
from ..engine.llm.params import InvalidParameter
from . import openai_api as oa
from .feedback import FeedbackStore
from .kserve import kserve_routes
from .metrics import Metrics

log = logging.getLogger("pyserve.server")

MAX_BODY_BYTES = 8 * 2**20
OPEN_PATHS = ("/health", "/v2/health/live", "/v2/health/ready")


@dataclass
class ServedModel:
    name: str
    engine: AsyncLLMEngine
    created: int

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer


class Guard(BaseHTTPMiddleware):
    """API key, body size limit, and X-Request-Id echo, for every route."""

    def __init__(self, app, api_key: str | None):
        super().__init__(app)
        self.api_key = api_key

    async def dispatch(self, request: Request, call_next):
        if self.api_key and request.url.path not in OPEN_PATHS:
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                return _error(oa.BadRequest(401, "a valid API key is required (Authorization: Bearer ...)",
                                            kind="authentication_error"))
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _error(oa.BadRequest(413, f"the request body exceeds {MAX_BODY_BYTES} bytes"))
        response = await call_next(request)
        if "x-request-id" in request.headers:
            response.headers["X-Request-Id"] = request.headers["x-request-id"]
        return response


def _error(exc: oa.BadRequest) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise oa.BadRequest(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise oa.BadRequest(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise oa.BadRequest(400, "the body must be a JSON object")
    return body


def build_app(models: dict[str, AsyncLLMEngine], api_key: str | None = None, feedback_db: str | None = None,
              loader: Callable[[str], AsyncLLMEngine] | None = None) -> Starlette:
    """The app over `models` (name -> engine). With `loader`, the repository routes can load any
    model it knows by name and unload served ones."""
    served = {name: ServedModel(name, engine, int(time.time())) for name, engine in models.items()}
    metrics = Metrics(models)
    feedback = FeedbackStore(feedback_db or ":memory:")

    def model_for(body: dict) -> ServedModel:
        name = oa._get(body, "model")
        if name is None:
            if len(served) == 1:
                return next(iter(served.values()))
            raise oa.BadRequest(400, "model is required", "model")
        if name not in served:
            raise oa.BadRequest(404, f"the model {name!r} does not exist; served: {', '.join(served)}", "model",
                                kind="not_found_error")
        return served[name]

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    async def add_feedback(request: Request) -> Response:
        try:
            body = await _json_body(request)
            response_id = body.get("response_id")
            rating = body.get("rating")
            if not isinstance(response_id, str) or not response_id:
                raise oa.BadRequest(400, "response_id must be a non-empty string", "response_id")
            if not isinstance(rating, int) or isinstance(rating, bool) or not -1 <= rating <= 5:
                raise oa.BadRequest(400, "rating must be an integer from -1 to 5 (-1/1 for thumbs)", "rating")
            for name in ("comment", "user", "model"):
                if body.get(name) is not None and not isinstance(body[name], str):
                    raise oa.BadRequest(400, f"{name} must be a string", name)
        except oa.BadRequest as exc:
            return _error(exc)
        row = feedback.add(response_id, rating, body.get("comment"), body.get("user"), body.get("model"))
        log.info("feedback %d on %s: rating %d", row, response_id, rating)
        return JSONResponse({"id": row, "object": "feedback"}, status_code=201)

    async def export_feedback(request: Request) -> Response:
        return Response(feedback.export_jsonl(), media_type="application/x-ndjson")

    async def repository_index(request: Request) -> Response:
        return JSONResponse([{"name": name, "version": "1", "state": "READY"} for name in served])

    async def repository_load(request: Request) -> Response:
        name = request.path_params["model"]
        if name in served:
            return JSONResponse({})
        if loader is None:
            return JSONResponse({"error": "this server cannot load models"}, status_code=400)
        try:
            engine = await asyncio.to_thread(loader, name)
        except (KeyError, FileNotFoundError, LookupError) as exc:
            return JSONResponse({"error": f"cannot load {name!r}: {exc}"}, status_code=404)
        served[name] = ServedModel(name, engine, int(time.time()))
        models[name] = engine
        metrics.attach(name, engine)
        log.info("model %s loaded", name)
        return JSONResponse({})

    async def repository_unload(request: Request) -> Response:
        name = request.path_params["model"]
        model = served.pop(name, None)
        if model is None:
            return JSONResponse({"error": f"model {name!r} is not served"}, status_code=404)
        models.pop(name, None)
        await asyncio.to_thread(model.engine.shutdown)
        log.info("model %s unloaded", name)
        return JSONResponse({})

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "pyserve"} for m in served.values()]})

    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await _generate(request, chat=True)

    async def _generate(request: Request, chat: bool) -> Response:
        try:
            body = await _json_body(request)
            model = model_for(body)
            params = oa.sampling_params(body, chat)
            prompt = _chat_prompt(body, model) if chat else _completion_prompt(body)
            rid = request.headers.get("x-request-id") or oa.new_id("chatcmpl" if chat else "cmpl")
            stream = model.engine.generate(prompt, params, request_id=f"{rid}-{oa.new_id('r')}")
            first = await anext(stream)  # surfaces invalid prompts before any response is sent
        except oa.BadRequest as exc:
            return _error(exc)
        except InvalidParameter as exc:
            return _error(oa.BadRequest(400, str(exc), exc.field))

        def on_end(out, status=None):
            metrics.finished(model.name, out, status)

        if oa._get(body, "stream", False):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_sse(rid, model, first, stream, chat, include_usage, on_end),
                                     media_type="text/event-stream")
        out = first
        async for out in stream:
            pass
        on_end(out)
        if out.error:
            return _error(oa.BadRequest(500, f"the model failed: {out.error}", kind="server_error"))
        shape = oa.chat_body if chat else oa.completion_body
        return JSONResponse(shape(rid, model.name, out, model.tokenizer))

    return Starlette(routes=[
        Route("/health", health),
        Route("/metrics", prometheus),
        Route("/v1/models", list_models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/feedback", add_feedback, methods=["POST"]),
        Route("/v1/feedback/export", export_feedback),
        Route("/v2/repository/index", repository_index, methods=["GET", "POST"]),
        Route("/v2/repository/models/{model}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", repository_unload, methods=["POST"]),
        *kserve_routes(served, metrics.finished),
    ], middleware=[Middleware(Guard, api_key=api_key)])


def _completion_prompt(body: dict):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise oa.BadRequest(400, "prompt must be a non-empty string or list of token ids (one prompt per request)",
                        "prompt")


def _chat_prompt(body: dict, model: ServedModel) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise oa.BadRequest(400, "messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise oa.BadRequest(400, f"messages[{i}] must be an object with a role", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            m["content"] = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        elif not isinstance(content, str):
            raise oa.BadRequest(400, f"messages[{i}].content must be a string", "messages")
    try:
        return model.tokenizer.encode_chat(messages)
    except Exception as exc:  # noqa: BLE001 - a template error is the request's problem
        raise oa.BadRequest(400, f"the chat template failed: {exc}", "messages") from None


async def _sse(rid: str, model: ServedModel, first, stream, chat: bool, include_usage: bool, on_end):
    kind = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())
    sent = [0] * len(first.outputs)
    started = [False] * len(first.outputs)

    def chunk(choices, usage=None):
        body = {"id": rid, "object": kind, "created": created, "model": model.name, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def outputs():
        yield first
        async for out in stream:
            yield out

    last = first
    try:
        async for out in outputs():
            last = out
            if out.error:
                yield f"data: {json.dumps(oa.BadRequest(500, out.error, kind='server_error').body())}\n\n"
                break
            choices = []
            for o in out.outputs:
                delta = o.text[sent[o.index]:]
                if not delta and o.finish_reason is None and started[o.index]:
                    continue
                sent[o.index] = len(o.text)
                if chat:
                    message = {"content": delta}
                    if not started[o.index]:
                        message["role"] = "assistant"
                    choices.append({"index": o.index, "delta": message, "finish_reason": o.finish_reason,
                                    "logprobs": None})
                else:
                    choices.append({"index": o.index, "text": delta, "finish_reason": o.finish_reason,
                                    "logprobs": None})
                started[o.index] = True
            if choices:
                yield chunk(choices)
        if include_usage:
            yield chunk([], oa.usage_of(last).body())
        yield "data: [DONE]\n\n"
    finally:
        await stream.aclose()  # a client that went away aborts the request
        on_end(last, None if last.finished else "abort")
