"""Which back-end runs an op: chosen from the tensors' device and what was built.

Order of precedence: the `backend=` argument of a call, then the PYSERVE_KERNEL_BACKEND
environment variable, then the default for the device (CPU: the C++ kernels; CUDA: the CUDA
kernels, else Triton). `reference` is always there.
"""

import importlib
import os
from functools import cache
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "PYSERVE_KERNEL_BACKEND"


class BackendUnavailable(RuntimeError):
    pass


@cache
def _load(name: str) -> ModuleType | None:
    """The back-end's module, or None when it cannot run here."""
    try:
        module = importlib.import_module(f"pyserve.kernels.{name}")
    except ImportError:
        return None
    return module if getattr(module, "AVAILABLE", True) else None


def _why(name: str) -> str:
    try:
        reason = getattr(importlib.import_module(f"pyserve.kernels.{name}"), "UNAVAILABLE_REASON", None)
    except ImportError as exc:
        reason = str(exc)
    return f": {reason}" if reason else ""


def available() -> list[str]:
    return [name for name in BACKENDS if _load(name) is not None]


def _default(device: torch.device) -> str:
    if device.type == "cuda":
        for name in ("cuda", "triton"):
            if _load(name) is not None:
                return name
        return "reference"
    return "cpu" if _load("cpu") is not None else "reference"


def backend_for(device: torch.device, backend: str | None = None) -> ModuleType:
    name = backend or os.environ.get(ENV_VAR) or _default(device)
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    module = _load(name)
    if module is None:
        raise BackendUnavailable(f"kernel back-end {name!r} is not available on this machine{_why(name)} "
                                 f"(available: {', '.join(available())})")
    if name == "cpu" and device.type != "cpu":
        raise BackendUnavailable("the 'cpu' back-end needs CPU tensors")
    if name == "cuda" and device.type != "cuda":
        raise BackendUnavailable("the 'cuda' back-end needs CUDA tensors")
    return module
