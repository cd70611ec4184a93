"""The msgpack-over-TCP front-end: many requests in flight per connection, streamed partial
results, cancellation, error frames. A connection that closes cancels its requests."""

import asyncio
import logging

from ..engine.llm import AsyncLLMEngine
from ..engine.llm.params import InvalidParameter
from ..protocol import (BAD_REQUEST, NOT_FOUND, PROTOCOL_VERSION, SERVER_ERROR, ProtocolError, decode, encode,
                        error_frame, frame_length)
from . import openai_api as oa

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

    async def generate(self, rid, method: str, params: dict) -> None:
        if not isinstance(params, dict):
            raise ProtocolError(BAD_REQUEST, "params must be a map")
        name = params.get("model")
        if name not in self.engines:
            raise ProtocolError(NOT_FOUND, f"model {name!r} is not served; served: {', '.join(self.engines)}")
        engine = self.engines[name]
        sampling = oa.sampling_params(params, chat=method == "chat")
        if method == "chat":
            messages = params.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ProtocolError(BAD_REQUEST, "messages must be a non-empty list")
            tok = engine.engine.tokenizer
            prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
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
                if len(first.text) > sent:
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


async def start_msgpack_server(engines: dict[str, AsyncLLMEngine], host: str, port: int) -> asyncio.AbstractServer:
    async def on_connect(reader, writer):
        await Connection(engines, reader, writer).serve()

    return await asyncio.start_server(on_connect, host, port)
