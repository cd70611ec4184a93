"""Python clients for pyserve's msgpack protocol (docs/protocol.md): `Client` and `AsyncClient`.

    from pyserve.client import Client
    with Client("127.0.0.1", 8001) as c:
        print(c.generate("tiny-llama", "Hello", max_tokens=16).text)
        for chunk in c.stream("tiny-llama", "Hello", max_tokens=16):
            print(chunk.text, end="")

    async with await AsyncClient.connect("127.0.0.1", 8001) as c:   # many requests in flight
        outs = await asyncio.gather(*(c.generate("tiny-llama", p, max_tokens=8) for p in prompts))

    with Client("127.0.0.1", 8001) as c:                               # images, with a progress bar
        result = c.generate_images("tiny-sd", "a red fox", num_inference_steps=20, seed=1,
                                   progress=lambda step, total: print(f"{step}/{total}"))
        open("fox.png", "wb").write(result.images[0])

A server started with API keys needs one: `Client(host, port, api_key="...")`, or set
PYSERVE_API_KEY. Over TLS, pass an `ssl.SSLContext` (`ssl.create_default_context(cafile=...)`).
"""

import asyncio
import itertools
import os
import socket
import ssl as _ssl
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

from .protocol import decode, encode, frame_length
from .protocol import tensor_to_wire as to_wire


class RemoteError(Exception):
    """The server answered with an error frame."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    outputs: list[dict] = field(default_factory=list)
    usage: dict = field(default_factory=dict)
    # With `logprobs` / `prompt_logprobs`: per token {"token_id", "logprob", "top": [[id, logprob], ...]}
    # (None for the prompt's first token).
    logprobs: list[dict] | None = None
    prompt_logprobs: list[dict | None] | None = None

    @classmethod
    def from_result(cls, result: dict) -> "Completion":
        first = result["outputs"][0]
        return cls(first["text"], first["token_ids"], first["finish_reason"], result["outputs"], result["usage"],
                   first.get("logprobs"), result.get("prompt_logprobs"))


@dataclass
class ImageResult:
    images: list[bytes]  # PNG files, one per image
    seeds: list[int]  # each image's seed: the same seed gives the same image again
    width: int = 0
    height: int = 0

    @classmethod
    def from_result(cls, result: dict) -> "ImageResult":
        return cls(result["images"], result["seeds"], result.get("width", 0), result.get("height", 0))


Progress = Callable[[int, int], None]  # (steps done, total steps)


@dataclass
class Chunk:
    text: str  # the new text since the previous chunk
    finished: bool = False
    completion: Completion | None = None  # on the last chunk


def _check(message: dict) -> dict:
    if message.get("type") == "error":
        raise RemoteError(message.get("code", 500), message.get("message", ""))
    return message


def _auth_frame(api_key: str | None) -> bytes | None:
    api_key = api_key if api_key is not None else os.environ.get("PYSERVE_API_KEY")
    return encode({"type": "auth", "api_key": api_key}) if api_key else None


class Client:
    """A blocking client: one request at a time on its connection."""

    def __init__(self, host: str, port: int, timeout: float = 120.0, api_key: str | None = None,
                 ssl: _ssl.SSLContext | None = None):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if ssl is not None:
            self.sock = ssl.wrap_socket(self.sock, server_hostname=host)
        self.ids = itertools.count(1)
        try:
            hello = self._read()
            self.protocol = hello.get("protocol")
            auth = _auth_frame(api_key)
            if auth is not None:
                self.sock.sendall(auth)
                hello = _check(self._read())
            elif hello.get("auth_required"):
                raise RemoteError(401, "the server requires an API key: pass api_key= or set PYSERVE_API_KEY")
        except BaseException:
            self.close()
            raise
        self.server_models = hello.get("models", [])

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            buf += chunk
        return bytes(buf)

    def _read(self) -> dict:
        return decode(self._read_exact(frame_length(self._read_exact(4))))

    def _send(self, message: dict) -> None:
        self.sock.sendall(encode(message))

    def _call(self, method: str, params: dict) -> int:
        rid = next(self.ids)
        self._send({"type": "request", "id": rid, "method": method, "params": params})
        return rid

    def _frames(self, rid: int) -> Iterator[dict]:
        while True:
            message = self._read()
            if message.get("id") not in (rid, None):
                continue  # left over from a cancelled request
            yield _check(message)
            if message.get("type") == "result":
                return

    def models(self) -> list[str]:
        rid = self._call("models", {})
        return [m for m in self._frames(rid)][-1]["result"]["models"]

    def generate(self, model: str, prompt: str | list[int], **params) -> Completion:
        rid = self._call("generate", {"model": model, "prompt": prompt, **params})
        return Completion.from_result(list(self._frames(rid))[-1]["result"])

    def chat(self, model: str, messages: list[dict], **params) -> Completion:
        rid = self._call("chat", {"model": model, "messages": messages, **params})
        return Completion.from_result(list(self._frames(rid))[-1]["result"])

    def infer(self, model: str, inputs: dict, **parameters) -> dict:
        """Tensors in, tensors out (KServe-style); e.g. {"text_input": [b"Hello"]} -> result["outputs"]."""
        rid = self._call("infer", {"model": model, "inputs": {k: to_wire(v) for k, v in inputs.items()},
                                   "parameters": parameters})
        return list(self._frames(rid))[-1]["result"]

    def generate_images(self, model: str, prompt: str = "", progress: Progress | None = None,
                        **params) -> ImageResult:
        """Images from an image model (`n`, `size` or `width`/`height`, `num_inference_steps`,
        `guidance_scale`, `seed`, `scheduler`, `negative_prompt`; `image` bytes and `strength` for
        img2img); `progress(step, total)` is called after each denoising step."""
        rid = self._call("images", {"model": model, "prompt": prompt, "progress": progress is not None, **params})
        for message in self._frames(rid):
            if message["type"] == "partial" and progress is not None:
                progress(message["result"]["step"], message["result"]["total"])
            elif message["type"] == "result":
                return ImageResult.from_result(message["result"])

    def load(self, model: str) -> list[str]:
        """Load a model the server knows (needs the admin key); returns the served models."""
        return list(self._frames(self._call("load", {"model": model})))[-1]["result"]["models"]

    def unload(self, model: str) -> list[str]:
        return list(self._frames(self._call("unload", {"model": model})))[-1]["result"]["models"]

    def stream(self, model: str, prompt: str | list[int], **params) -> Iterator[Chunk]:
        """Chunks of new text as they are generated; leaving the loop early cancels the request."""
        rid = self._call("generate", {"model": model, "prompt": prompt, "stream": True, **params})
        done = False
        try:
            for message in self._frames(rid):
                if message["type"] == "partial":
                    yield Chunk(message["result"]["text"])
                else:
                    done = True
                    result = message["result"]
                    yield Chunk(result.get("delta", ""), True, Completion.from_result(result))
        finally:
            if not done:
                self._send({"type": "cancel", "id": rid})


class AsyncClient:
    """An asyncio client: any number of requests in flight on one connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: dict):
        self.reader, self.writer = reader, writer
        self.server_models = hello.get("models", [])
        self.ids = itertools.count(1)
        self.queues: dict[int, asyncio.Queue] = {}
        self.pump = asyncio.create_task(self._pump())

    @classmethod
    async def connect(cls, host: str, port: int, api_key: str | None = None,
                      ssl: _ssl.SSLContext | None = None) -> "AsyncClient":
        reader, writer = await asyncio.open_connection(host, port, ssl=ssl, server_hostname=host if ssl else None)

        async def read() -> dict:
            return decode(await reader.readexactly(frame_length(await reader.readexactly(4))))

        hello = await read()
        auth = _auth_frame(api_key)
        try:
            if auth is not None:
                writer.write(auth)
                hello = _check(await read())
            elif hello.get("auth_required"):
                raise RemoteError(401, "the server requires an API key: pass api_key= or set PYSERVE_API_KEY")
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, hello)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        self.pump.cancel()
        self.writer.close()

    async def _pump(self) -> None:
        try:
            while True:
                message = decode(await self.reader.readexactly(frame_length(await self.reader.readexactly(4))))
                queue = self.queues.get(message.get("id"))
                if queue is not None:
                    queue.put_nowait(message)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            for queue in self.queues.values():
                queue.put_nowait({"type": "error", "code": 503, "message": f"connection lost: {exc}"})

    async def _frames(self, method: str, params: dict) -> AsyncIterator[dict]:
        rid = next(self.ids)
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[rid] = queue
        self.writer.write(encode({"type": "request", "id": rid, "method": method, "params": params}))
        done = False
        try:
            while not done:
                message = _check(await queue.get())
                done = message["type"] == "result"
                yield message
        finally:
            self.queues.pop(rid, None)
            if not done:
                self.writer.write(encode({"type": "cancel", "id": rid}))

    async def models(self) -> list[str]:
        return [m async for m in self._frames("models", {})][-1]["result"]["models"]

    async def generate(self, model: str, prompt: str | list[int], **params) -> Completion:
        frames = [m async for m in self._frames("generate", {"model": model, "prompt": prompt, **params})]
        return Completion.from_result(frames[-1]["result"])

    async def chat(self, model: str, messages: list[dict], **params) -> Completion:
        frames = [m async for m in self._frames("chat", {"model": model, "messages": messages, **params})]
        return Completion.from_result(frames[-1]["result"])

    async def infer(self, model: str, inputs: dict, **parameters) -> dict:
        params = {"model": model, "inputs": {k: to_wire(v) for k, v in inputs.items()}, "parameters": parameters}
        return [m async for m in self._frames("infer", params)][-1]["result"]

    async def generate_images(self, model: str, prompt: str = "", progress: Progress | None = None,
                              **params) -> ImageResult:
        """As `Client.generate_images`."""
        params = {"model": model, "prompt": prompt, "progress": progress is not None, **params}
        async for message in self._frames("images", params):
            if message["type"] == "partial" and progress is not None:
                progress(message["result"]["step"], message["result"]["total"])
            elif message["type"] == "result":
                return ImageResult.from_result(message["result"])

    async def load(self, model: str) -> list[str]:
        """Load a model the server knows (needs the admin key); returns the served models."""
        return [m async for m in self._frames("load", {"model": model})][-1]["result"]["models"]

    async def unload(self, model: str) -> list[str]:
        return [m async for m in self._frames("unload", {"model": model})][-1]["result"]["models"]

    async def stream(self, model: str, prompt: str | list[int], **params) -> AsyncIterator[Chunk]:
        async for message in self._frames("generate", {"model": model, "prompt": prompt, "stream": True, **params}):
            if message["type"] == "partial":
                yield Chunk(message["result"]["text"])
            else:
                result = message["result"]
                yield Chunk(result.get("delta", ""), True, Completion.from_result(result))
