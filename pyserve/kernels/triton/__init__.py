"""Triton back-end: GPU kernels that also run on the CPU under TRITON_INTERPRET=1 (for tests)."""

import os

import torch

try:
    import triton  # noqa: F401
    AVAILABLE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
except ImportError:
    AVAILABLE = False

if AVAILABLE:
    from .attention import dense_attention, paged_attention, varlen_attention, write_kv  # noqa: F401
    from .denoise import denoise_step  # noqa: F401
    from .sampling import sample  # noqa: F401
    from .linear import linear  # noqa: F401  (packed weights; otherwise torch's GEMM)
    from .lora import lora  # noqa: F401
    from ..reference import greedy, rms_norm, rotary, silu_mul  # noqa: F401  (torch, for now)

    def decoder_stack(*args):
        return None  # no fused stack here yet: the model runs its layers op by op

    def decode_step(*args):
        return None  # nor a fused decode step
