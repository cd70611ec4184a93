"""OpenAI-compatible routes: /v1/models, /v1/completions and /v1/chat/completions (SSE streaming).

A completions request may carry several prompts; each becomes one engine request, and the
choices are numbered prompt by prompt, then by `n` within a prompt, as the OpenAI API does.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine.llm import RequestOutput, SamplingParams
from ..errors import ClientError, InvalidParameter
from ..engine.llm import StructuredOutput
from . import adapters, stored_completions, tool_calls, translators
from .models import ServedModel
from .records import tenant_of
from .tool_calls import CallFormat
from .responses import error_body, json_body, unless_client_leaves

MAX_CHOICES = 1024  # prompts times n in one request


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def text_model(request: Request, body: dict) -> ServedModel:
    return translators.text_model(request.app.state.models.get(adapters.get_field(body, "model")))


def _model_card(model: ServedModel) -> dict:
    return {"id": model.name, "object": "model", "created": model.created, "owned_by": "pyserve", "task": model.task,
            "parent": model.parent}


async def list_models(request: Request) -> Response:
    models = request.app.state.models
    return JSONResponse({"object": "list", "data": [_model_card(m) for m in [*models, *models.adapters()]]})


async def retrieve_model(request: Request) -> Response:
    """GET /v1/models/{id}: one model (or LoRA adapter), or a 404 in OpenAI's error shape."""
    return JSONResponse(_model_card(request.app.state.models.get(request.path_params["model"])))


async def load_lora_adapter(request: Request) -> Response:
    """vLLM's shape: {"lora_name", "lora_path"} (and, with several base models, "model")."""
    body = await json_body(request)
    name, path = adapters.required_text(body, "lora_name"), adapters.required_text(body, "lora_path")
    await request.app.state.models.load_lora(name, path, adapters.get_field(body, "model"))
    return JSONResponse({"lora_name": name, "loaded": True})


async def unload_lora_adapter(request: Request) -> Response:
    name = adapters.required_text(await json_body(request), "lora_name")
    await request.app.state.models.unload_lora(name)
    return JSONResponse({"lora_name": name, "unloaded": True})


async def completions(request: Request) -> Response:
    body = await json_body(request)
    model = text_model(request, body)
    params = adapters.sampling_params(body, chat=False)
    prompts = adapters.completion_prompts(body.get("prompt"))
    if len(prompts) * params.n > MAX_CHOICES:
        raise InvalidParameter("prompt", f"{len(prompts)} prompts times n={params.n} exceeds {MAX_CHOICES} choices")
    ids = [await adapters.prompt_ids(model, p) for p in prompts]
    echo = None
    if adapters.get_field(body, "echo", False):  # the prompt comes back before the completion
        if model.tokenizer is None:
            raise InvalidParameter("echo", "this model has no tokenizer to write the prompt back with")
        echo = [p if isinstance(p, str) else model.tokenizer.decode(p) for p in prompts]
        if params.logprobs is not None and params.prompt_logprobs is None:
            params = replace(params, prompt_logprobs=params.logprobs)
    return await _respond(request, body, model, ids, params, chat=False, echo=echo)


@dataclass
class ChatJob:
    """A checked chat request, ready for the engine."""

    model: ServedModel
    params: SamplingParams
    prompt: list[int]
    images: list
    calls: CallFormat | None  # how tool calls are parsed out of the reply; None without tools
    sources: list | None = None  # a grounded chat's sources (pyserve.server.retrieval.SearchResult)


async def prepare_chat(request: Request, body: dict) -> ChatJob:
    """The chat completions body, checked and rendered: model, sampling, the prompt's token ids
    (chat template, tools, images) and, where a call must be made, its grammar."""
    model = text_model(request, body)
    params = adapters.sampling_params(body, chat=True)
    tools = tool_calls.tools_of(body)
    choice = tool_calls.choice_of(body, tools)
    messages, sources = adapters.chat_messages(body.get("messages")), None
    if body.get("retrieval") is not None:  # pyserve's grounded chat: sources from vector stores
        messages, sources = await request.app.state.retrieval.ground(tenant_of(request), body["retrieval"], messages)
    ids, images = await adapters.chat_prompt(model, messages, tools or None, request.app.state.images)
    calls = None
    if tools and choice != "none":
        calls = tool_calls.call_format(model.tokenizer)
        if choice != "auto":  # a call must be made: a grammar makes it valid
            if params.structured is not None:
                raise InvalidParameter("tool_choice", "a required tool call cannot be combined with response_format "
                                                      "or guided_* constraints")
            chosen = tools if choice == "required" else [t for t in tools if t["function"]["name"] == choice]
            parallel = choice == "required" and adapters.get_field(body, "parallel_tool_calls", True)
            params = replace(params, structured=StructuredOutput(grammar=calls.grammar(chosen, parallel),
                                                                 field="tool_choice"))
    return ChatJob(model, params, ids, images, calls, sources)


async def chat_completions(request: Request) -> Response:
    body = await json_body(request)
    job = await prepare_chat(request, body)
    return await _respond(request, body, job.model, [job.prompt], job.params, chat=True, calls=job.calls,
                          images=job.images, sources=job.sources)


def source_body(result) -> dict:
    """A grounded chat's source, beside the answer: which file, which chunk, how relevant."""
    return {"file_id": result.file_id, "filename": result.filename, "chunk_id": result.chunk_id,
            "score": result.score, "text": result.text}


async def start(request: Request, body: dict, rid: str, model: ServedModel, prompts: list[list[int]], params,
                images: list | None = None) -> "Merged":
    """One engine request per prompt, admitted (a refused one raises its ClientError here, before
    any response is sent), their outputs merged."""
    principal = request.state.principal
    streams = [model.submit(f"{rid}-{new_id('r')}", adapters.text_request(p, params, body, principal,
                                                                              images or [], model.lora))
               for p in prompts]
    merged = Merged(streams)
    await merged.start()
    return merged


async def _respond(request: Request, body: dict, model: ServedModel, prompts: list[list[int]], params,
                   chat: bool, echo: list[str] | None = None, calls: CallFormat | None = None,
                   images: list | None = None, sources: list | None = None) -> Response:
    stream_opt = adapters.get_field(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidParameter("stream_options", "must be an object")
    keep = chat and stored_completions.wants_storing(request, body)
    if keep:
        adapters.metadata(body.get("metadata"))  # checked before the model runs
    rid = request.headers.get("x-request-id") or new_id("chatcmpl" if chat else "cmpl")
    merged = await start(request, body, rid, model, prompts, params, images)
    if stream_opt:
        include_usage = bool((options or {}).get("include_usage"))
        async def store_when_done(outs):  # a streamed completion is stored once it has finished
            await stored_completions.store(request, body, chat_body(rid, model, outs, params.n, calls))
        return StreamingResponse(_sse(rid, model, merged, params.n, chat, include_usage, echo, calls,
                                      store_when_done if keep else None, sources), media_type="text/event-stream")
    try:
        await unless_client_leaves(request, merged.drain())
    finally:
        await merged.close()
    failed = next((o for o in merged.last if o.error), None)
    if failed is not None:
        raise translators.for_model(model).failure(failed)
    if chat:
        completion = chat_body(rid, model, merged.last, params.n, calls)
        if sources is not None:
            completion["sources"] = [source_body(r) for r in sources]
        if keep:
            await stored_completions.store(request, body, completion)
        return JSONResponse(completion)
    return JSONResponse(completion_body(rid, model, merged.last, params.n, echo))


class Merged:
    """Outputs of several engine streams (one per prompt) as they come: (prompt index, output)."""

    def __init__(self, streams: list[AsyncIterator[RequestOutput]]):
        self.streams = streams
        self.last: list[RequestOutput | None] = [None] * len(streams)
        # Bounded: a reader that does not keep up (a client that does not read its stream) leaves
        # the outputs with the driver, which keeps only the latest of each stream.
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=2 * len(streams))
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

    async def drain(self) -> None:
        """Read every stream to its end (`last` holds each one's final output)."""
        async for _ in self:
            pass

    async def close(self) -> None:
        """Stop every stream; unfinished requests are aborted and free their resources."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for stream in self.streams:
            await stream.aclose()


async def _sse(rid: str, model: ServedModel, merged: Merged, n: int, chat: bool, include_usage: bool,
               echo: list[str] | None = None, calls: CallFormat | None = None, on_done=None,
               sources: list | None = None):
    kind = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())
    if sources is not None:  # a grounded chat's sources come first, in a chunk of their own
        first = {"id": rid, "object": kind, "created": created, "model": model.name, "choices": [],
                 "sources": [source_body(r) for r in sources]}
        yield f"data: {json.dumps(first)}\n\n"
    sent: dict[int, int] = {}  # characters of each choice's text sent
    scored_tokens: dict[int, int] = {}  # tokens of each choice whose logprobs were sent
    tool_streams: dict[int, ToolCallStream] = {}

    def chunk(choices, usage=None):
        body = {"id": rid, "object": kind, "created": created, "model": model.name, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        async for i, out in merged:
            if out.error:
                yield f"data: {json.dumps(error_body('/v1', translators.for_model(model).failure(out)))}\n\n"
                break
            choices = []
            for o in out.outputs:
                index = i * n + o.index
                if calls is not None:
                    choice = tool_streams.setdefault(index, ToolCallStream(calls)).chunk(o, index)
                    if choice is not None:
                        choices.append(choice)
                    continue
                started = index in sent
                delta = o.text[sent.get(index, 0):]
                if not delta and o.finish_reason is None and started:
                    continue
                sent[index] = len(o.text)
                scored = None
                if o.logprobs is not None:  # the tokens drawn since the last chunk
                    new = o.logprobs[scored_tokens.get(index, 0):]
                    scored_tokens[index] = len(o.logprobs)
                    scored = (chat_logprobs(new, model.tokenizer) if chat else
                              completion_logprobs([e["token_id"] for e in new], new, model.tokenizer))
                if chat:
                    message = {"content": delta} if started else {"role": "assistant", "content": delta}
                    choices.append({"index": index, "delta": message, "finish_reason": o.finish_reason,
                                    "logprobs": scored})
                else:
                    if echo is not None and not started:
                        delta = echo[i] + delta
                    choices.append({"index": index, "text": delta, "finish_reason": o.finish_reason,
                                    "logprobs": scored})
            if choices:
                yield chunk(choices)
        else:
            if include_usage:
                yield chunk([], adapters.usage(merged.last))
            if on_done is not None:
                await on_done(merged.last)
        yield "data: [DONE]\n\n"
    except ClientError as exc:  # the engine stopped mid-stream
        yield f"data: {json.dumps(error_body('/v1', exc))}\n\n"
    finally:
        await merged.close()  # a client that went away aborts its requests


def completion_logprobs(token_ids: list[int], entries: list[dict | None], tokenizer) -> dict:
    """The completions API's logprobs: per token its text, log-probability, top alternatives and
    character offset; a token without a score (the prompt's first) has nulls."""
    tokens = [tokenizer.decode([t], False) for t in token_ids]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens,
            "token_logprobs": [None if e is None else e["logprob"] for e in entries],
            "top_logprobs": [None if e is None else {tokenizer.decode([t], False): lp for t, lp in e["top"].items()}
                             for e in entries],
            "text_offset": offsets}


def _completion_choice(out: RequestOutput, o, index: int, tokenizer, echo: str | None) -> dict:
    text, logprobs = o.text, None
    if echo is not None:
        text = echo + text
    if o.logprobs is not None:
        ids, entries = list(o.token_ids), list(o.logprobs)
        if echo is not None:
            ids = out.prompt_token_ids + ids
            entries = (out.prompt_logprobs or [None] * len(out.prompt_token_ids)) + entries
        logprobs = completion_logprobs(ids, entries, tokenizer)
    return {"index": index, "text": text, "finish_reason": o.finish_reason, "logprobs": logprobs}


def completion_body(rid: str, model: ServedModel, outs: list[RequestOutput], n: int,
                    echo: list[str] | None = None) -> dict:
    choices = [_completion_choice(out, o, i * n + o.index, model.tokenizer, None if echo is None else echo[i])
               for i, out in enumerate(outs) for o in out.outputs]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model.name,
            "choices": choices, "usage": adapters.usage(outs)}


def chat_logprobs(entries: list[dict], tokenizer) -> dict:
    def item(token_id, logprob):
        text = tokenizer.decode([token_id], False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(e["token_id"], e["logprob"]),
                         "top_logprobs": [item(t, lp) for t, lp in e["top"].items()]} for e in entries]}


def _assistant_message(o, calls: CallFormat | None) -> tuple[dict, str | None]:
    """The reply and its finish reason, with any tool calls parsed out of the text."""
    if calls is None:
        return {"role": "assistant", "content": o.text}, o.finish_reason
    content, found = calls.parse(o.text)
    if not found:
        return {"role": "assistant", "content": o.text}, o.finish_reason
    return ({"role": "assistant", "content": content, "tool_calls": [c.to_openai() for c in found]},
            "tool_calls" if o.finish_reason == "stop" else o.finish_reason)


def chat_body(rid: str, model: ServedModel, outs: list[RequestOutput], n: int, calls: CallFormat | None = None) -> dict:
    choices = []
    for o in outs[0].outputs:
        message, finish_reason = _assistant_message(o, calls)
        choices.append({"index": o.index, "message": message, "finish_reason": finish_reason,
                        "logprobs": chat_logprobs(o.logprobs, model.tokenizer) if o.logprobs is not None else None})
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model.name,
            "choices": choices, "usage": adapters.usage(outs)}


class ToolCallStream:
    """One streamed choice of a chat with tools: content as it comes, held back where a call may be
    starting; each call as one `tool_calls` delta once it is complete (all of them at the end)."""

    def __init__(self, calls: CallFormat):
        self.calls = calls
        self.sent = 0  # characters of content sent
        self.num_calls = 0
        self.started = False

    def chunk(self, o, index: int) -> dict | None:
        finished = o.finish_reason is not None
        content, found = self.calls.so_far(o.text, finished)
        delta = {}
        if content and len(content) > self.sent:
            delta["content"] = content[self.sent:]
            self.sent = len(content)
        if len(found) > self.num_calls:
            delta["tool_calls"] = [{"index": k, **c.to_openai()} for k, c in enumerate(found) if k >= self.num_calls]
            self.num_calls = len(found)
        if not delta and not finished:
            return None
        if not self.started:
            delta, self.started = {"role": "assistant", **delta}, True
        reason = ("tool_calls" if self.num_calls and o.finish_reason == "stop" else o.finish_reason) if finished else None
        return {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}


routes = [
    Route("/v1/models", list_models),
    Route("/v1/models/{model:path}", retrieve_model),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
]
