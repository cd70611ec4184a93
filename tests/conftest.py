import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

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


def pytest_collection_modifyitems(items):
    """Every case that runs on a CUDA device carries the `gpu` mark, so `pytest -m gpu` (what
    scripts/gpu-check.sh runs) selects exactly the GPU suite."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.gpu)


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
def serving(model_dir, api_key=None, engine_options=None, loader=None, **config):
    """The tiny model behind a real server on free local ports; yields (server, its LLM).
    `config` takes ServerConfig fields; `api_key` is short for an access policy with that one key."""
    from pyserve import LLM
    from pyserve.engine.llm import AsyncLLMEngine
    from pyserve.server import start_in_thread
    from pyserve.server.auth import AccessPolicy
    from pyserve.server.config import ServerConfig
    llm = LLM(model_dir, device="cpu", **(engine_options or {}))
    if api_key is not None:
        config["access"] = AccessPolicy([api_key])
    config = ServerConfig(**{"port": 0, "msgpack_port": 0, "log_level": "warning", **config})
    server = start_in_thread({"tiny": AsyncLLMEngine(llm.engine)}, config, loader)
    try:
        yield server, llm
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    """The tiny Llama behind a real server with no keys, for a test module: (server, its LLM)."""
    with serving(tiny_llama_dir) as running:
        yield running


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cli_server(model_dir, *args: str, tls=None):
    """`pyserve serve` in a subprocess on free loopback ports (model_dir None: the demo models),
    once /health answers; yields (process, base URL, msgpack port). `tls`: the SSL context that
    trusts the server's certificate. Output is kept in process.stdout; the process is always ended."""
    http_port, tcp_port = free_port(), free_port()
    models = [] if model_dir is None else [str(model_dir), "--served-model-name", "tiny"]  # None: the demo models
    data_dir = tempfile.mkdtemp(prefix="pyserve-data-")
    if "--data-dir" not in args:
        args = (*args, "--data-dir", data_dir)
    proc = subprocess.Popen([sys.executable, "-m", "pyserve", "serve", *models, "--port", str(http_port),
                             "--msgpack-port", str(tcp_port), "--device", "cpu", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "TRITON_INTERPRET": "1"})
    url = f"{'https' if tls else 'http'}://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5, context=tls):
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                raise AssertionError(f"the server exited: {proc.stdout.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield proc, url, tcp_port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        shutil.rmtree(data_dir, ignore_errors=True)
