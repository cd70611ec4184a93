"""OpenAI's Responses API: POST /v1/responses (plain and streamed), GET and DELETE
/v1/responses/{id}, GET /v1/responses/{id}/input_items.

A response is a chat completion in other clothes: its input items (and, with
`previous_response_id`, the stored turns before them) become chat messages, its fields the
chat fields they stand for, and the chat path (`openai_api.prepare_chat`) checks and renders
them. The reply comes back as output items: a message with `output_text`, and a
`function_call` item per tool call. Responses are stored by default (`store`) in the data
directory (`pyserve.store.ResponseStore`).

Example (with the demo server running):
    >>> import openai                                                               # doctest: +SKIP
    >>> client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")  # doctest: +SKIP
    >>> first = client.responses.create(model="demo-chat", input="Name a colour.")  # doctest: +SKIP
    >>> client.responses.create(model="demo-chat", input="Another?",                # doctest: +SKIP
    ...                         previous_response_id=first.id).output_text
"""

import asyncio
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine.llm import RequestOutput
from ..errors import ClientError, InvalidParameter
from . import adapters, translators
from .openai_api import ChatJob, Merged, prepare_chat, start
from ..store import StoredResponse
from .records import by_path, page, tenant_of
from .responses import json_body, unless_client_leaves
from .tool_calls import CallFormat

ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
# chat fields named in errors, as the Responses API calls them
FIELD_NAMES = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
               "response_format": "text.format"}
TYPES = {"previous_response_id": str, "instructions": str, "stream": bool, "store": bool, "background": bool,
         "text": dict, "metadata": dict}  # the chat path checks the fields it is passed


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- input items to chat messages --------------------------------------------------------------

def input_items(value) -> list[dict]:
    """The request's `input` as items with ids: a string is one user message."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InvalidParameter("input", "must be a string or a non-empty list of items")
    items = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidParameter("input", f"input[{i}] must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise InvalidParameter("input", f"input[{i}].role must be one of {', '.join(ROLES)}")
            content = item.get("content")
            if isinstance(content, str):
                content = [{"type": "output_text" if role == "assistant" else "input_text", "text": content}]
            if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
                raise InvalidParameter("input", f"input[{i}].content must be a string or a list of parts")
            items.append({"type": "message", "id": item.get("id") or _id("msg"), "role": role, "content": content,
                          "status": "completed"})
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise InvalidParameter("input", f"input[{i}]: a function_call needs call_id, name and arguments "
                                                "(strings)")
            items.append({"id": _id("fc"), "status": "completed", **item})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
                raise InvalidParameter("input", f"input[{i}]: a function_call_output needs call_id and output "
                                                "(strings)")
            items.append({"id": _id("fco"), "status": "completed", **item})
        else:
            raise InvalidParameter("input", f"input[{i}].type {kind!r} is not served here (message, function_call, "
                                            "function_call_output)")
    return items


def _chat_part(part: dict, where: str) -> dict:
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": part.get("text")}
    if kind == "refusal":
        return {"type": "text", "text": part.get("refusal")}
    if kind == "input_image":
        return {"type": "image_url", "image_url": {"url": part.get("image_url")}}
    raise InvalidParameter("input", f"{where}: a part of type {kind!r} is not served here (input_text, "
                                    "output_text, input_image)")


def chat_messages(items: list[dict], instructions: str | None) -> list[dict]:
    """Chat messages for a conversation's items; consecutive function calls become one assistant
    turn's tool calls, their outputs tool messages."""
    messages = [{"role": "system", "content": instructions}] if instructions else []
    for i, item in enumerate(items):
        kind = item["type"]
        if kind == "message":
            parts = [_chat_part(p, f"input[{i}]") for p in item["content"]]
            text_only = all(p["type"] == "text" for p in parts)
            content = "".join(str(p["text"]) for p in parts) if text_only else parts
            messages.append({"role": ROLES[item["role"]], "content": content})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def _chat_tools(tools) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise InvalidParameter("tools", "must be a list")
    out = []
    for i, tool in enumerate(tools):
        if isinstance(tool, dict) and tool.get("type") == "file_search":
            continue  # becomes the chat's retrieval (chat_body)
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidParameter("tools", f"tools[{i}]: only function and file_search tools are served here")
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters",
                                                                         "strict") if k in tool}})
    return out


def _chat_tool_choice(choice):
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise InvalidParameter("tool_choice", "must be auto, none, required or {'type': 'function', 'name': ...}")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text) -> dict | None:
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if text is not None and not isinstance(fmt, (dict, type(None))):
        raise InvalidParameter("text.format", "must be an object")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    raise InvalidParameter("text.format", "type must be text, json_object or json_schema")


def chat_body(body: dict, messages: list[dict]) -> dict:
    """The chat completions body that this Responses body stands for."""
    chat = {"model": body.get("model"), "messages": messages}
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("user", "user"), ("parallel_tool_calls", "parallel_tool_calls"), ("seed", "seed")):
        if body.get(ours) is not None:
            chat[theirs] = body[ours]
    tools = _chat_tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
        if body.get("tool_choice") is not None:
            chat["tool_choice"] = _chat_tool_choice(body["tool_choice"])
    elif body.get("tool_choice") not in (None, "none", "auto"):
        raise InvalidParameter("tool_choice", "needs `tools`")
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    searches = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "file_search"]
    if len(searches) > 1:
        raise InvalidParameter("tools", "one file_search tool at most")
    if searches:  # the file_search tool: retrieval from its vector stores before answering
        chat["retrieval"] = {k: searches[0][k] for k in ("vector_store_ids", "max_num_results", "filters",
                                                         "ranking_options") if k in searches[0]}
    return chat


# -- output items and the Response object ------------------------------------------------------

def message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    return {"type": "message", "id": item_id or _id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def file_search_item(query: str, sources: list) -> dict:
    """The file_search tool's call, with what it found (as `include=["file_search_call.results"]` asks)."""
    return {"type": "file_search_call", "id": _id("fs"), "status": "completed", "queries": [query],
            "results": [{"file_id": r.file_id, "filename": r.filename, "score": r.score, "text": r.text,
                         "attributes": r.attributes} for r in sources]}


def call_item(call, item_id: str | None = None) -> dict:
    return {"type": "function_call", "id": item_id or _id("fc"), "call_id": _id("call"), "name": call.name,
            "arguments": call.arguments, "status": "completed"}


@dataclass
class Turn:
    """One response being made: what it echoes of the request, and where it is stored."""

    body: dict
    model: str
    input_items: list[dict]
    tenant: str | None
    id: str = field(default_factory=lambda: _id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(self, status: str, output: list[dict], out: RequestOutput | None = None,
                 error: dict | None = None) -> dict:
        body = self.body
        usage = None
        if out is not None:
            chat = adapters.usage([out])
            usage = {"input_tokens": chat["prompt_tokens"], "output_tokens": chat["completion_tokens"],
                     "total_tokens": chat["total_tokens"], "input_tokens_details": chat["prompt_tokens_details"],
                     "output_tokens_details": {"reasoning_tokens": 0}}
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "error": error, "incomplete_details": incomplete, "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"), "model": self.model, "output": output,
                "parallel_tool_calls": body.get("parallel_tool_calls", True),
                "previous_response_id": body.get("previous_response_id"), "reasoning": {"effort": None,
                                                                                        "summary": None},
                "store": body.get("store", True), "temperature": body.get("temperature", 1.0),
                "text": body.get("text") or {"format": {"type": "text"}},
                "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
                "top_p": body.get("top_p", 1.0), "truncation": "disabled", "usage": usage,
                "user": body.get("user"), "metadata": body.get("metadata") or {}}

    async def finish(self, request: Request, out: RequestOutput, output: list[dict]) -> dict:
        """The final Response object, stored when the request asked for it."""
        response = self.response(status_of(out), output, out)
        if self.body.get("store", True) is not False:
            await asyncio.to_thread(request.app.state.data.responses.put,
                                    StoredResponse(response, self.input_items, self.tenant))
        return response


def status_of(out: RequestOutput) -> str:
    """A finished reply's status: cut by max_output_tokens is `incomplete`."""
    return "incomplete" if out.outputs[0].finish_reason == "length" else "completed"


def output_items(text: str, calls: CallFormat | None, status: str) -> list[dict]:
    content, found = calls.so_far(text, True) if calls is not None else (text, [])
    items = [message_item(content, status)] if content or not found else []
    return items + [call_item(c) for c in found]


# -- routes ------------------------------------------------------------------------------------

async def create_response(request: Request) -> Response:
    body = await json_body(request)
    for name in TYPES:
        adapters.get_field(body, name, types=TYPES)
    if body.get("background"):
        raise InvalidParameter("background", "background responses are not served here")
    body["metadata"] = adapters.metadata(body.get("metadata"))
    items = input_items(body.get("input"))
    history = []
    previous = body.get("previous_response_id")
    if previous is not None:
        history = await asyncio.to_thread(request.app.state.data.responses.conversation, previous, tenant_of(request))
    chat = chat_body(body, chat_messages(history + items, body.get("instructions")))
    try:
        job = await prepare_chat(request, chat)
    except InvalidParameter as exc:  # named as the Responses API names the field
        name = "tools" if (exc.field or "").startswith("retrieval.") else FIELD_NAMES.get(exc.field, exc.field)
        raise InvalidParameter(name, exc.message.split(": ", 1)[-1]) from None
    turn = Turn(body, job.model.name, items, tenant_of(request))
    merged = await start(request, chat, turn.id, job.model, [job.prompt], job.params, job.images)
    if body.get("stream"):
        return StreamingResponse(_events(request, turn, job, merged), media_type="text/event-stream")
    try:
        await unless_client_leaves(request, merged.drain())
    finally:
        await merged.close()
    out = merged.last[0]
    if out.error:
        raise translators.for_model(job.model).failure(out)
    output = output_items(out.outputs[0].text, job.calls, status_of(out))
    if job.sources is not None:
        output = [file_search_item(_last_user_text(items), job.sources)] + output
    return JSONResponse(await turn.finish(request, out, output))


def _last_user_text(items: list[dict]) -> str:
    for item in reversed(items):
        if item.get("role") == "user":
            content = item.get("content")
            return content if isinstance(content, str) else " ".join(
                p.get("text", "") for p in content if isinstance(p, dict))
    return ""


async def retrieve_response(request: Request) -> Response:
    return JSONResponse((await by_path(request, request.app.state.data.responses.get, "response_id")).response)


async def delete_response(request: Request) -> Response:
    await by_path(request, request.app.state.data.responses.delete, "response_id")
    return JSONResponse({"id": request.path_params["response_id"], "object": "response", "deleted": True})


async def list_input_items(request: Request) -> Response:
    stored = await by_path(request, request.app.state.data.responses.get, "response_id")
    return JSONResponse(page(stored.input_items))


# -- streaming ---------------------------------------------------------------------------------

async def _events(request: Request, turn: Turn, job: ChatJob, merged: Merged):
    """The documented event sequence: response.created, response.in_progress; per output item
    output_item.added, (content_part.added, output_text.delta..., output_text.done,
    content_part.done | function_call_arguments.delta, .done), output_item.done; then
    response.completed or response.incomplete (or error and response.failed)."""
    numbers = itertools.count()
    output: list[dict] = []
    text_item: dict | None = None  # the message item being streamed
    sent, calls_sent = 0, 0

    def event(kind: str, **fields) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(numbers), **fields})}\n\n"

    def close_text(status: str) -> list[str]:
        part = text_item["content"][0]
        index = output.index(text_item)
        text_item["status"] = status
        where = {"item_id": text_item["id"], "output_index": index, "content_index": 0}
        return [event("response.output_text.done", **where, text=part["text"], logprobs=[]),
                event("response.content_part.done", **where, part=part),
                event("response.output_item.done", output_index=index, item=text_item)]

    try:
        yield event("response.created", response=turn.response("in_progress", []))
        yield event("response.in_progress", response=turn.response("in_progress", []))
        async for _, out in merged:
            if out.error:
                raise translators.for_model(job.model).failure(out)
            o = out.outputs[0]
            finished = o.finish_reason is not None
            content, found = job.calls.so_far(o.text, finished) if job.calls is not None else (o.text, [])
            if content and len(content) > sent:
                if text_item is None:
                    text_item = message_item("", "in_progress")
                    output.append(text_item)
                    yield event("response.output_item.added", output_index=len(output) - 1,
                                item={**text_item, "content": []})
                    yield event("response.content_part.added", item_id=text_item["id"],
                                output_index=len(output) - 1, content_index=0, part=text_item["content"][0])
                delta = content[sent:]
                text_item["content"][0]["text"], sent = content, len(content)
                yield event("response.output_text.delta", item_id=text_item["id"], output_index=output.index(text_item),
                            content_index=0, delta=delta, logprobs=[])
            for call in found[calls_sent:]:
                if text_item is not None and text_item["status"] == "in_progress":
                    for line in close_text("completed"):
                        yield line
                item = call_item(call)
                output.append(item)
                index = len(output) - 1
                yield event("response.output_item.added", output_index=index,
                            item={**item, "arguments": "", "status": "in_progress"})
                yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                            delta=item["arguments"])
                yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            name=item["name"], arguments=item["arguments"])
                yield event("response.output_item.done", output_index=index, item=item)
            calls_sent = len(found)
            if finished:
                status = status_of(out)
                if text_item is not None and text_item["status"] == "in_progress":
                    for line in close_text(status):
                        yield line
                if not output:  # an empty reply is still a message
                    output.append(message_item("", status))
                response = await turn.finish(request, out, output)
                yield event(f"response.{status}", response=response)
    except ClientError as exc:  # the model failed, or the engine stopped mid-stream
        error = {"code": exc.kind, "message": exc.message}
        yield event("error", code=exc.kind, message=exc.message, param=exc.field)
        yield event("response.failed", response=turn.response("failed", output, error=error))
    finally:
        await merged.close()  # a client that went away aborts its request


routes = [
    Route("/v1/responses", create_response, methods=["POST"]),
    Route("/v1/responses/{response_id}", retrieve_response, methods=["GET"]),
    Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
    Route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"]),
]
