"""The msgpack-over-TCP front-end: many requests in flight per connection, streamed partial
results, cancellation, error frames. A connection that closes cancels its requests; on shutdown
the listener closes, new requests get code 503, and open ones may finish within the drain time.

When the access policy has keys, a connection must send an `auth` frame first (within
AUTH_TIMEOUT seconds); a missing or wrong key gets an error frame with code 401 and the
connection closes. Until then the hello frame names no models."""

import asyncio
import logging
from dataclasses import replace

from ..errors import ClientError, InvalidParameter, Unauthorized
from ..protocol import (BAD_REQUEST, MAX_FRAME_BYTES, PROTOCOL_VERSION, SERVER_ERROR, UNAUTHORIZED, UNAVAILABLE,
                        ProtocolError, decode, encode, error_frame, frame_length, tensor_to_wire)
from . import adapters, inference, pictures, tensors, translators
from .auth import AccessPolicy, Principal
from .connections import HEADER_SECONDS, IDLE_SECONDS, default_max_connections
from .models import ModelRegistry
from .translators import Caller
from .vision_inputs import ImageFetcher

log = logging.getLogger("pyserve.msgpack")

AUTH_TIMEOUT = 10.0  # seconds an unauthenticated connection may stay open
AUTH_FRAME_BYTES = 64 * 2**10  # the largest frame taken before authentication
MIN_BYTES_PER_SECOND = 2**20  # past the frame time, a frame's rest must come at least this fast
RECEIVE_GRACE_SECONDS = 0.1  # at a drain, for frames already received to be read and answered


class Connection:
    def __init__(self, server: "MsgpackServer", reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server, self.models, self.reader, self.writer = server, server.models, reader, writer
        self.tasks: dict[int | str, asyncio.Task] = {}
        self.lock = asyncio.Lock()
        policy = server.access
        self.principal: Principal | None = None if policy.required else policy.authenticate(None)

    async def send(self, frame: bytes) -> None:
        async with self.lock:
            self.writer.write(frame)
            await self.writer.drain()

    async def serve(self) -> None:
        peer = self.writer.get_extra_info("peername")
        try:
            hello = {"type": "hello", "protocol": PROTOCOL_VERSION, "server": "pyserve",
                     "auth_required": self.principal is None}
            if self.principal is not None:
                hello["models"] = self.models.names()
            await self.send(encode(hello))
            while True:
                try:
                    body = await self._read_frame()
                except (asyncio.IncompleteReadError, TimeoutError):
                    return  # closed (possibly mid-frame), too slow, idle, or never authenticated
                except ProtocolError as exc:  # oversized: the stream can no longer be framed
                    await self.send(error_frame(None, exc.code, exc.message))
                    return
                try:
                    message = decode(body)
                except ProtocolError as exc:
                    await self.send(error_frame(None, exc.code, exc.message))
                    continue
                if self.principal is None or message.get("type") == "auth":
                    if not await self.authenticate(message):
                        return
                    continue
                await self.dispatch(message)
        except (ConnectionError, OSError) as exc:
            log.info("connection from %s closed: %s", peer, type(exc).__name__)
        finally:
            for task in self.tasks.values():
                task.cancel()
            self.writer.close()

    async def _read_frame(self) -> bytes:
        """The next frame. Before authentication it must come within AUTH_TIMEOUT; after, the
        connection may wait for it as long as it has requests in flight, or IDLE_SECONDS. Once a
        frame has begun, its rest must come within the server's frame time (and 1 s a MiB)."""
        limit = MAX_FRAME_BYTES if self.principal else AUTH_FRAME_BYTES
        while True:
            wait = IDLE_SECONDS if self.principal else AUTH_TIMEOUT
            try:
                header = await asyncio.wait_for(self.reader.readexactly(1), wait)
                break
            except TimeoutError:
                if not (self.principal and self.tasks):
                    raise
        header += await asyncio.wait_for(self.reader.readexactly(3), self.server.frame_seconds)
        length = frame_length(header, limit)
        # a large frame may take longer over a slow link, but not a trickle's time
        return await asyncio.wait_for(self.reader.readexactly(length),
                                      self.server.frame_seconds + length / MIN_BYTES_PER_SECOND)

    async def authenticate(self, message: dict) -> bool:
        """Take the connection's first frame, which must be `auth`; False closes the connection."""
        rid = message.get("id") if isinstance(message.get("id"), (int, str)) else None
        key = message.get("api_key")
        try:
            if message.get("type") != "auth":
                raise Unauthorized("authenticate first: send an auth frame with api_key")
            self.principal = self.server.access.authenticate(key if isinstance(key, str) else None)
        except Unauthorized as exc:
            log.info("connection from %s refused: %s", self.writer.get_extra_info("peername"), exc.message)
            await self.send(error_frame(rid, UNAUTHORIZED, exc.message))
            return False
        await self.send(encode({"type": "authenticated", "id": rid, "role": self.principal.role,
                                "models": self.models.names()}))
        return True

    async def dispatch(self, message: dict) -> None:
        kind, rid = message.get("type"), message.get("id")
        if rid is not None and (not isinstance(rid, (int, str)) or isinstance(rid, bool)):
            await self.send(error_frame(None, BAD_REQUEST, "id must be an integer or a string"))
            return
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
        if self.server.draining:
            await self.send(error_frame(rid, UNAVAILABLE, "the server is shutting down"))
            return
        self.tasks[rid] = asyncio.create_task(self.run(rid, message.get("method"), message.get("params") or {}))

    async def run(self, rid, method, params) -> None:
        try:
            if not isinstance(params, dict):
                raise InvalidParameter("params", "must be a map")
            if method == "models":
                await self.send(encode({"type": "result", "id": rid, "result": {"models": self.models.names()}}))
            elif method in ("load", "unload"):
                self.principal.require_admin()
                name = adapters.required_text(params, "model")
                await (self.models.load(name) if method == "load" else self.models.unload(name))
                await self.send(encode({"type": "result", "id": rid, "result": {"models": self.models.names()}}))
            elif method in ("generate", "chat"):
                await self.generate(rid, method, params)
            elif method == "infer":
                await self.infer(rid, params)
            elif method == "images":
                await self.images(rid, params)
            else:
                raise ProtocolError(BAD_REQUEST, f"unknown method {method!r}")
        except asyncio.CancelledError:
            pass
        except ClientError as exc:
            await self._send_error(rid, exc.status, exc.message)
        except ConnectionError:
            pass  # the client went away while its result was being sent; serve() logs the closed connection
        except Exception as exc:  # noqa: BLE001 - never let one request take the connection down
            log.exception("request %s failed", rid)
            await self._send_error(rid, SERVER_ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            self.tasks.pop(rid, None)

    async def _send_error(self, rid, code: int, message: str) -> None:
        try:
            await self.send(error_frame(rid, code, message))
        except (ConnectionError, OSError):
            pass  # the client is gone; serve() logs the closed connection

    @property
    def caller(self) -> Caller:
        return Caller(self.principal, self.server.images)

    async def generate(self, rid, method: str, params: dict) -> None:
        model = translators.text_model(self.models.get(params.get("model")))
        sampling = adapters.sampling_params(params, chat=method == "chat")
        images = []
        if method == "chat":
            ids, images = await adapters.chat_prompt(model, adapters.chat_messages(params.get("messages")),
                                                     images=self.server.images)
        else:
            prompt = adapters.completion_prompts(params.get("prompt"))
            if len(prompt) != 1:
                raise InvalidParameter("prompt", "one prompt per request (a string or a list of token ids)")
            ids = await adapters.prompt_ids(model, prompt[0])
        echo = ""
        if method == "generate" and params.get("echo"):  # the prompt comes back before the completion
            echo = prompt[0] if isinstance(prompt[0], str) else model.tokenizer.decode(ids)
            if sampling.logprobs is not None and sampling.prompt_logprobs is None:
                sampling = replace(sampling, prompt_logprobs=sampling.logprobs)
        stream = bool(params.get("stream"))
        sent = 0
        request = adapters.text_request(ids, sampling, params, self.principal, images, lora=model.lora)
        async for out in model.submit(None, request):
            if out.error:
                raise translators.for_model(model).failure(out)
            first = out.outputs[0]
            if stream and not out.finished:
                # Every step that adds tokens is sent, even when its text is still held back
                # (an incomplete character), so clients see token-level progress.
                await self.send(encode({"type": "partial", "id": rid,
                                        "result": {"text": first.text[sent:], "token_ids": first.token_ids}}))
                sent = len(first.text)
                continue
            if out.finished:
                result = {"outputs": [{"index": o.index, "text": echo + o.text, "token_ids": o.token_ids,
                                       "finish_reason": o.finish_reason, "logprobs": _wire_logprobs(o.logprobs)}
                                      for o in out.outputs],
                          "prompt_logprobs": _wire_logprobs(out.prompt_logprobs),
                          "usage": adapters.usage([out])}
                if stream:
                    result["delta"] = first.text[sent:]
                await self.send(encode({"type": "result", "id": rid, "result": result}))

    async def infer(self, rid, params: dict) -> None:
        """The tensor form, as KServe's infer: inputs {name: {dtype, shape, data}} -> outputs alike."""
        if not isinstance(params.get("inputs"), dict):
            raise InvalidParameter("inputs", "must be a map of name -> tensor")
        model = self.models.get(params.get("model"))
        inputs = {str(name): tensors.from_msgpack(str(name), t) for name, t in params["inputs"].items()}
        outputs, extras = await inference.infer(model, inputs, params.get("parameters"), self.caller)
        result = {"outputs": {name: tensor_to_wire(array) for name, array in outputs.items()}, **extras}
        await self.send(encode({"type": "result", "id": rid, "result": result}))

    async def images(self, rid, params: dict) -> None:
        """Images as files (PNG, or `output_format` jpeg or webp; img2img with `image` as bytes);
        with `progress`, a partial frame per step of a model that takes steps."""
        model = self.models.get(params.get("model"))
        file_format = pictures.FileFormat.of(params)
        init = None if params.get("image") is None else await pictures.decode_image(params["image"])
        job = await inference.images(model, params, init)
        progress = bool(params.get("progress"))
        out = None
        async for out in job.outputs:
            if progress and not out.finished:
                await self.send(encode({"type": "partial", "id": rid,
                                        "result": {"step": out.step, "total": out.total_steps}}))
        if out.error:
            raise job.failure(out)
        images = job.images_of(out)
        height, width = images.shape[1:3]
        result = {"images": await pictures.encode_pngs(images, file_format), "output_format": file_format.name,
                  "width": width, "height": height, **job.extras(out)}
        await self.send(encode({"type": "result", "id": rid, "result": result}))


class MsgpackServer:
    """The TCP listener and its connections."""

    def __init__(self, models: ModelRegistry, access: AccessPolicy | None = None,
                 image_hosts: frozenset[str] = frozenset(), max_connections: int | None = None,
                 frame_seconds: float = HEADER_SECONDS):
        self.models = models
        self.access = access or AccessPolicy()
        self.images = ImageFetcher(image_hosts)
        self.max_connections = max_connections or default_max_connections()
        self.frame_seconds = frame_seconds
        self.draining = False
        self.connections: set[Connection] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, ssl=None) -> int:
        self._server = await asyncio.start_server(self._on_connect, host, port, ssl=ssl)
        return self._server.sockets[0].getsockname()[1]

    async def _on_connect(self, reader, writer) -> None:
        if len(self.connections) >= self.max_connections:
            writer.write(error_frame(None, UNAVAILABLE, f"the server has {self.max_connections} connections open; "
                                                        "retry later"))
            writer.close()
            return
        connection = Connection(self, reader, writer)
        self.connections.add(connection)
        try:
            await connection.serve()
        finally:
            self.connections.discard(connection)

    async def drain(self, timeout: float) -> None:
        """Stop accepting; refuse new requests; let open ones finish for up to `timeout` seconds."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        # Frames already received but not yet read (a loop that was busy when the signal came) are
        # read now and answered: their requests start, or are refused with a 503 frame, not cut off.
        await asyncio.sleep(RECEIVE_GRACE_SECONDS)
        open_tasks = [t for c in self.connections for t in c.tasks.values()]
        if open_tasks:
            log.info("draining %d msgpack request(s)", len(open_tasks))
            await asyncio.wait(open_tasks, timeout=timeout)
        for connection in list(self.connections):
            connection.writer.close()


def _wire_logprobs(entries: list[dict | None] | None) -> list | None:
    """Logprob entries with their alternatives as [token_id, logprob] pairs (msgpack map keys are
    strings for most decoders)."""
    if entries is None:
        return None
    return [None if e is None else {"token_id": e["token_id"], "logprob": e["logprob"],
                                    "top": [[t, lp] for t, lp in e["top"].items()]} for e in entries]
