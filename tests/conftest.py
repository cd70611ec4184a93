import contextlib
import os
import socket
import time

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

from pyserve.kernels import dispatch  # noqa: E402

# Property tests search the same examples on every run, so CI results are reproducible.
settings.register_profile("reproducible", derandomize=True)
settings.load_profile("reproducible")

HAS_GPU = torch.cuda.is_available()


def backend_params(*, cpu_only_ok: bool = True) -> list:
    """(backend, device) pairs to compare with the reference; unavailable ones skip with a reason."""
    cases = [("cpu", "cpu"), ("triton", "cuda" if HAS_GPU else "cpu"), ("cuda", "cuda")]
    params = []
    for backend, device in cases:
        marks = []
        if device == "cuda" and not HAS_GPU:
            marks.append(pytest.mark.skip(reason="needs a CUDA device"))
        elif backend not in dispatch.available():
            marks.append(pytest.mark.skip(reason=f"back-end {backend!r} is not built here"))
        params.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return params


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from tiny_models import make_model
    return make_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """Expected outputs come from a second engine: a served one belongs to the server's thread."""
    from pyserve import LLM
    return LLM(tiny_llama_dir, device="cpu")


@contextlib.contextmanager
def serving(model_dir, api_key=None, engine_options=None, **server_options):
    """The tiny model behind a real server on free local ports; yields (server, its LLM)."""
    from pyserve import LLM
    from pyserve.engine.llm import AsyncLLMEngine
    from pyserve.server import start_in_thread
    llm = LLM(model_dir, device="cpu", **(engine_options or {}))
    server = start_in_thread({"tiny": AsyncLLMEngine(llm.engine)}, api_key=api_key, **server_options)
    try:
        yield server, llm
    finally:
        server.stop()


def wait_all_free(llm, seconds=20) -> bool:
    """Whether every KV block of the engine comes free within `seconds` (aborts land asynchronously)."""
    deadline = time.monotonic() + seconds
    while llm.engine.num_free_blocks() != llm.engine.num_blocks and time.monotonic() < deadline:
        time.sleep(0.05)
    return llm.engine.num_free_blocks() == llm.engine.num_blocks


def read_frame(sock):
    from pyserve.protocol import decode, frame_length
    header = sock.recv(4, socket.MSG_WAITALL)
    return decode(sock.recv(frame_length(header), socket.MSG_WAITALL))


def raw_connection(server):
    """A plain socket to the server's msgpack port, past the hello frame."""
    sock = socket.create_connection(("127.0.0.1", server.msgpack_port), timeout=10)
    read_frame(sock)
    return sock
