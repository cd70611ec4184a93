"""OpenAI-compatible routes: /v1/models, /v1/completions and /v1/chat/completions (SSE streaming).

A completions request may carry several prompts; each becomes one engine request, and the
choices are numbered prompt by prompt, then by `n` within a prompt, as the OpenAI API does.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine.llm import RequestOutput
from ..errors import ClientError, InvalidParameter, ModelFailure
from ..tasks import TEXT_GENERATION
from . import adapters
from .models import ServedModel
from .responses import error_body, json_body

MAX_CHOICES = 1024  # prompts times n in one request


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def text_model(request: Request, body: dict) -> ServedModel:
    model = request.app.state.models.get(adapters.get_field(body, "model"))
    if model.task != TEXT_GENERATION:
        raise InvalidParameter("model", f"{model.name!r} is a {model.task} model, not a text model")
    return model


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [
        {"id": m.name, "object": "model", "created": m.created, "owned_by": "pyserve", "task": m.task}
        for m in request.app.state.models]})


async def completions(request: Request) -> Response:
    body = await json_body(request)
    model = text_model(request, body)
    params = adapters.sampling_params(body, chat=False)
    prompts = adapters.completion_prompts(body.get("prompt"))
    if len(prompts) * params.n > MAX_CHOICES:
        raise InvalidParameter("prompt", f"{len(prompts)} prompts times n={params.n} exceeds {MAX_CHOICES} choices")
    ids = [await adapters.prompt_ids(model, p) for p in prompts]
    return await _respond(request, body, model, ids, params, chat=False)


async def chat_completions(request: Request) -> Response:
    body = await json_body(request)
    model = text_model(request, body)
    params = adapters.sampling_params(body, chat=True)
    ids = await adapters.chat_prompt_ids(model, adapters.chat_messages(body.get("messages")))
    return await _respond(request, body, model, [ids], params, chat=True)


async def _respond(request: Request, body: dict, model: ServedModel, prompts: list[list[int]], params,
                   chat: bool) -> Response:
    stream_opt = adapters.get_field(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidParameter("stream_options", "must be an object")
    rid = request.headers.get("x-request-id") or new_id("chatcmpl" if chat else "cmpl")
    principal = request.state.principal
    streams = [model.driver.submit(f"{rid}-{new_id('r')}", adapters.text_request(p, params, body, principal))
               for p in prompts]
    merged = Merged(streams)
    await merged.start()  # raises a refused request's ClientError before any response is sent
    metrics = request.app.state.metrics
    if stream_opt:
        include_usage = bool((options or {}).get("include_usage"))
        return StreamingResponse(_sse(rid, model, merged, params.n, chat, include_usage, metrics),
                                 media_type="text/event-stream")
    try:
        async for _ in merged:
            pass
    finally:
        await merged.close()
    metrics.finished(model, merged.last)
    failed = next((o.error for o in merged.last if o.error), None)
    if failed:
        raise ModelFailure(f"the model failed: {failed}")
    shape = chat_body if chat else completion_body
    return JSONResponse(shape(rid, model, merged.last, params.n))


class Merged:
    """Outputs of several engine streams (one per prompt) as they come: (prompt index, output)."""

    def __init__(self, streams: list[AsyncIterator[RequestOutput]]):
        self.streams = streams
        self.last: list[RequestOutput | None] = [None] * len(streams)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        try:
            for i, stream in enumerate(self.streams):
                self.last[i] = await anext(stream)
                await self._queue.put((i, self.last[i]))
        except BaseException:
            await self.close()
            raise
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self.streams)
                       if not self.last[i].finished]

    async def _pump(self, i: int, stream) -> None:
        try:
            async for out in stream:
                await self._queue.put((i, out))
        except Exception as exc:  # noqa: BLE001 - handed to the reader
            await self._queue.put((i, exc))
        finally:
            await self._queue.put((i, None))

    async def __aiter__(self):
        remaining = len(self._tasks)
        while remaining or not self._queue.empty():
            i, item = await self._queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            self.last[i] = item
            yield i, item

    async def close(self) -> None:
        """Stop every stream; unfinished requests are aborted and free their resources."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for stream in self.streams:
            await stream.aclose()


async def _sse(rid: str, model: ServedModel, merged: Merged, n: int, chat: bool, include_usage: bool, metrics):
    kind = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())
    sent: dict[int, int] = {}
    status = "abort"

    def chunk(choices, usage=None):
        body = {"id": rid, "object": kind, "created": created, "model": model.name, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        async for i, out in merged:
            if out.error:
                yield f"data: {json.dumps(error_body('/v1', ModelFailure(out.error)))}\n\n"
                status = "error"
                break
            choices = []
            for o in out.outputs:
                index = i * n + o.index
                started = index in sent
                delta = o.text[sent.get(index, 0):]
                if not delta and o.finish_reason is None and started:
                    continue
                sent[index] = len(o.text)
                if chat:
                    message = {"content": delta} if started else {"role": "assistant", "content": delta}
                    choices.append({"index": index, "delta": message, "finish_reason": o.finish_reason,
                                    "logprobs": None})
                else:
                    choices.append({"index": index, "text": delta, "finish_reason": o.finish_reason,
                                    "logprobs": None})
            if choices:
                yield chunk(choices)
        else:
            status = None
            if include_usage:
                yield chunk([], adapters.usage(merged.last))
        yield "data: [DONE]\n\n"
    except ClientError as exc:  # the engine stopped mid-stream
        status = "error"
        yield f"data: {json.dumps(error_body('/v1', exc))}\n\n"
    finally:
        await merged.close()  # a client that went away aborts its requests
        metrics.finished(model, merged.last, status)


def _logprobs_of(o, tokenizer) -> dict:
    return {"tokens": [tokenizer.decode([e["token_id"]], False) for e in o.logprobs],
            "token_logprobs": [e["logprob"] for e in o.logprobs],
            "top_logprobs": [{tokenizer.decode([t], False): lp for t, lp in e["top"].items()} for e in o.logprobs],
            "text_offset": []}


def completion_body(rid: str, model: ServedModel, outs: list[RequestOutput], n: int) -> dict:
    choices = [{"index": i * n + o.index, "text": o.text, "finish_reason": o.finish_reason,
                "logprobs": _logprobs_of(o, model.tokenizer) if o.logprobs is not None else None}
               for i, out in enumerate(outs) for o in out.outputs]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model.name,
            "choices": choices, "usage": adapters.usage(outs)}


def chat_logprobs(entries: list[dict], tokenizer) -> dict:
    def item(token_id, logprob):
        text = tokenizer.decode([token_id], False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(e["token_id"], e["logprob"]),
                         "top_logprobs": [item(t, lp) for t, lp in e["top"].items()]} for e in entries]}


def chat_body(rid: str, model: ServedModel, outs: list[RequestOutput], n: int) -> dict:
    choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                "finish_reason": o.finish_reason,
                "logprobs": chat_logprobs(o.logprobs, model.tokenizer) if o.logprobs is not None else None}
               for o in outs[0].outputs]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model.name,
            "choices": choices, "usage": adapters.usage(outs)}


routes = [
    Route("/v1/models", list_models),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
]
