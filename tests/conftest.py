import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pyserve.kernels import dispatch  # noqa: E402

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
