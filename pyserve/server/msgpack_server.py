"""The msgpack-over-TCP front-end: many requests in flight per connection, streamed partial
results, cancellation, error frames. A connection that closes cancels its requests."""

import asyncio
import logging

import numpy as np

from ..engine.llm import AsyncLLMEngine
from ..engine.llm.params import InvalidParameter
from ..protocol import (BAD_REQUEST, NOT_FOUND, PROTOCOL_VERSION, SERVER_ERROR, ProtocolError, decode, encode,
                        error_frame, frame_length)
from . import openai_api as oa
from .kserve import SCALAR_INPUTS

log = logging.getLogger("pyserve.msgpack")


class Connection:
    def __init__(self, engines: dict[str, AsyncLLMEngine], reader, writer):
        self.engines, self.reader, self.writer = engines, reader, writer
        self.tasks: dict[object, asyncio.Task] = {}
        self.lock = asyncio.Lock()

    async def send(self, frame: bytes) -> None:
        async with self.lock:
            self.writer.write(frame)
            await self.writer.drain()

    async def serve(self) -> None:
        await self.send(encode({"type": "hello", "protocol": PROTOCOL_VERSION, "server": "pyserve",
                                "models": list(self.engines)}))
        try:
            while True:
                try:
                    header = await self.reader.readexactly(4)
                    body = await self.reader.readexactly(frame_length(header))
                except asyncio.IncompleteReadError:
                    return  # closed, possibly mid-frame
                except ProtocolError as exc:  # oversized: the stream can no longer be framed
                    await self.send(error_frame(None, exc.code, exc.message))
                    return
                try:
                    message = decode(body)
                except ProtocolError as exc:
                    await self.send(error_frame(None, exc.code, exc.message))
                    continue
                await self.dispatch(message)
        finally:
            for task in self.tasks.values():
                task.cancel()
            self.writer.close()

    async def dispatch(self, message: dict) -> None:
        kind, rid = message.get("type"), message.get("id")
        if kind == "cancel":
            task = self.tasks.pop(rid, None)
            if task is not None:
                task.cancel()
            return
        if kind != "request":
            await self.send(error_frame(rid, BAD_REQUEST, f"unknown frame type {kind!r}"))
            return
        if rid is None or rid in self.tasks:
            await self.send(error_frame(rid, BAD_REQUEST, "a request needs an id not already in flight"))
            return
        self.tasks[rid] = asyncio.create_task(self.run(rid, message.get("method"), message.get("params") or {}))

    async def run(self, rid, method, params: dict) -> None:
        try:
            if method == "models":
                await self.send(encode({"type": "result", "id": rid, "result": {"models": list(self.engines)}}))
            elif method in ("generate", "chat"):
                await self.generate(rid, method, params)
            elif method == "infer":
                await self.infer(rid, params)
            else:
                raise ProtocolError(BAD_REQUEST, f"unknown method {method!r}")
        except asyncio.CancelledError:
            pass
        except ProtocolError as exc:
            await self.send(error_frame(rid, exc.code, exc.message))
        except oa.BadRequest as exc:
            await self.send(error_frame(rid, exc.status, exc.message))
        except InvalidParameter as exc:
            await self.send(error_frame(rid, BAD_REQUEST, str(exc)))
        except Exception as exc:  # noqa: BLE001 - never let one request take the connection down
            log.exception("request %s failed", rid)
            await self.send(error_frame(rid, SERVER_ERROR, f"{type(exc).__name__}: {exc}"))
        finally:
            self.tasks.pop(rid, None)

    def engine_for(self, params: dict) -> AsyncLLMEngine:
        name = params.get("model")
        if name not in self.engines:
            raise ProtocolError(NOT_FOUND, f"model {name!r} is not served; served: {', '.join(self.engines)}")
        return self.engines[name]

    async def generate(self, rid, method: str, params: dict) -> None:
        if not isinstance(params, dict):
            raise ProtocolError(BAD_REQUEST, "params must be a map")
        engine = self.engine_for(params)
        sampling = oa.sampling_params(params, chat=method == "chat")
        if method == "chat":
            messages = params.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ProtocolError(BAD_REQUEST, "messages must be a non-empty list")
            prompt = engine.engine.tokenizer.encode_chat(messages)
        else:
            prompt = params.get("prompt")
            if not prompt or not isinstance(prompt, (str, list)):
                raise ProtocolError(BAD_REQUEST, "prompt must be a non-empty string or list of token ids")
        stream = bool(params.get("stream"))
        sent = 0
        async for out in engine.generate(prompt, sampling):
            if out.error:
                raise ProtocolError(SERVER_ERROR, f"the model failed: {out.error}")
            first = out.outputs[0]
            if stream and not out.finished:
                # Every step that adds tokens is sent, even when its text is still held back
                # (an incomplete character), so clients see token-level progress.
                await self.send(encode({"type": "partial", "id": rid,
                                        "result": {"text": first.text[sent:], "token_ids": first.token_ids}}))
                sent = len(first.text)
                continue
            if out.finished:
                result = {"outputs": [{"index": o.index, "text": o.text, "token_ids": o.token_ids,
                                       "finish_reason": o.finish_reason} for o in out.outputs],
                          "usage": oa.usage_of(out).body()}
                if stream:
                    result["delta"] = first.text[sent:]
                await self.send(encode({"type": "result", "id": rid, "result": result}))


    async def infer(self, rid, params: dict) -> None:
        """The tensor form, as KServe's infer: inputs {name: {dtype, shape, data}} -> outputs alike.

        A text model takes text_input (dtype "bytes", one element) plus scalar inputs or
        `parameters` for sampling, and answers text_output.
        """
        if not isinstance(params, dict) or not isinstance(params.get("inputs"), dict):
            raise ProtocolError(BAD_REQUEST, "infer needs params.inputs, a map of name -> tensor")
        engine = self.engine_for(params)
        options = dict(params.get("parameters") or {})
        text = None
        for input_name, tensor in params["inputs"].items():
            values = tensor_values(input_name, tensor)
            if input_name == "text_input":
                if len(values) != 1 or not isinstance(values[0], bytes):
                    raise ProtocolError(BAD_REQUEST, "text_input must hold exactly one bytes element")
                text = values[0].decode("utf-8", errors="replace")
            elif input_name in SCALAR_INPUTS and len(values) == 1:
                options[input_name] = values[0]
            else:
                raise ProtocolError(BAD_REQUEST, f"unknown input {input_name!r}")
        if not text:
            raise ProtocolError(BAD_REQUEST, "text_input is required")
        options.setdefault("max_tokens", 16)
        out = None
        async for out in engine.generate(text, oa.sampling_params(options, chat=False)):
            pass
        if out.error:
            raise ProtocolError(SERVER_ERROR, f"the model failed: {out.error}")
        result = {"outputs": {"text_output": {"dtype": "bytes", "shape": [1], "data": [out.outputs[0].text.encode()]}},
                  "usage": oa.usage_of(out).body()}
        await self.send(encode({"type": "result", "id": rid, "result": result}))


def tensor_values(name: str, tensor) -> list:
    """Elements of a wire tensor: bytes tensors carry a list of bin; others raw little-endian data."""
    if not isinstance(tensor, dict) or "dtype" not in tensor or "data" not in tensor:
        raise ProtocolError(BAD_REQUEST, f"input {name!r} must be a map with dtype, shape and data")
    dtype, data = tensor["dtype"], tensor["data"]
    if dtype == "bytes":
        if not isinstance(data, list) or not all(isinstance(v, bytes) for v in data):
            raise ProtocolError(BAD_REQUEST, f"input {name!r}: bytes tensors hold a list of binary elements")
        return data
    if not isinstance(data, bytes):
        raise ProtocolError(BAD_REQUEST, f"input {name!r}: data must be raw bytes")
    try:
        return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).tolist()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(BAD_REQUEST, f"input {name!r}: {exc}") from None


async def start_msgpack_server(engines: dict[str, AsyncLLMEngine], host: str, port: int) -> asyncio.AbstractServer:
    async def on_connect(reader, writer):
        await Connection(engines, reader, writer).serve()

    return await asyncio.start_server(on_connect, host, port)
