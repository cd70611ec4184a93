"""The CUDA C++ back-end (`pyserve._C_cuda`): fp32, fp16 and bf16 tensors on a CUDA device.

The module links the CUDA runtime statically, so it needs a driver at least as new as the
toolkit it was built with; an older driver makes the back-end unavailable with a message that
says so (`UNAVAILABLE_REASON`), rather than failing at the first launch.
"""

import logging

import torch

from .checks import MAX_GRID_YZ, check
from .quantize import FORMAT_CODES, packed_rows, unpacked_linear
from .reference import greedy, rms_norm, rotary, silu_mul  # noqa: F401  (torch on the GPU, for now)
from .types import SampleResult, SamplingTensors

log = logging.getLogger("pyserve.kernels")


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def driver_problem(runtime: int, driver: int) -> str | None:
    """Why a driver cannot run kernels built against `runtime` (CUDA versions as 1000*major + 10*minor)."""
    if driver == 0:
        return "no CUDA driver was found"
    if driver < runtime:
        return (f"pyserve's CUDA kernels were built with CUDA {_version(runtime)}, but the driver supports CUDA "
                f"{_version(driver)}: update the driver, or rebuild with an older toolkit "
                f"(PYSERVE_REINSTALL=1 ./scripts/test.sh), or use the triton back-end")
    return None


try:
    from pyserve import _C_cuda
    UNAVAILABLE_REASON = driver_problem(*_C_cuda.versions()) if torch.cuda.is_available() else "no CUDA device"
except ImportError:  # built without nvcc
    _C_cuda = None
    UNAVAILABLE_REASON = "pyserve was built without nvcc"
AVAILABLE = UNAVAILABLE_REASON is None
if _C_cuda is not None and torch.cuda.is_available() and not AVAILABLE:
    log.warning("CUDA kernels unavailable: %s", UNAVAILABLE_REASON)

_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_SPLIT_KEYS = 512


def decoder_stack(*args):
    return None  # no fused stack here yet: the model runs its layers op by op


def decode_step(*args):
    return None  # nor a fused decode step


def linear(x, weight, bias=None):
    """Packed weights at decode sizes read in the kernel; everything else through cuBLAS."""
    rows = packed_rows(x, weight)
    if not rows:
        return unpacked_linear(x, weight, bias)
    n, k = weight.shape
    xc = x.reshape(rows, k).contiguous()
    b = None if bias is None else bias.to(x.dtype).contiguous()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    _C_cuda.quantized_linear(_DTYPE[x.dtype], xc.data_ptr(), weight.data.data_ptr(),
                             0 if weight.scales is None else weight.scales.data_ptr(), 0 if b is None else b.data_ptr(),
                             out.data_ptr(), rows, n, k, FORMAT_CODES[weight.format], _stream())
    return out.view(*x.shape[:-1], n)


def lora(y, x, a, b, index, rank, scale) -> None:
    tokens, n = y.shape
    kept = [x.to(y.dtype).contiguous(), a.to(y.dtype).contiguous(), b.to(y.dtype).contiguous(), _i32(index),
            _i32(rank), _f32(scale)]
    shrunk = torch.empty(tokens, a.shape[1], dtype=torch.float32, device=y.device)
    _C_cuda.lora(_DTYPE[y.dtype], y.data_ptr(), *(t.data_ptr() for t in kept), shrunk.data_ptr(), tokens, n,
                 x.shape[1], a.shape[1], _stream())


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).contiguous()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _check_head_dim(d: int) -> None:
    check(d % 32 == 0 and d <= 256, f"the cuda back-end needs head_dim a multiple of 32 and <= 256, got {d}")


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    k, v = k.to(k_cache.dtype).contiguous(), v.to(k_cache.dtype).contiguous()
    _C_cuda.write_kv(_DTYPE[k_cache.dtype], k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                     slot_mapping.to(torch.int64).contiguous().data_ptr(), k.shape[0], k.shape[1], k_cache.shape[2], k.shape[2],
                     _stream())


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window=0,
                    max_query_len=0, max_seq_len=0):
    t, h, d = q.shape
    _check_head_dim(d)
    check(h <= MAX_GRID_YZ, f"the cuda back-end takes at most {MAX_GRID_YZ} heads, got {h}")
    dtype = q.dtype
    q = q.to(k_cache.dtype).contiguous()  # the kernel reads q in the cache's type
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # Split long decode-only contexts among blocks; at most 65,535 splits (grid.z), so very long
    # contexts get longer splits. Sizes come from the host: no device sync.
    split_keys = max(_SPLIT_KEYS, -(-max_seq_len // MAX_GRID_YZ))
    num_splits = max(1, -(-max_seq_len // split_keys)) if max_query_len <= 1 else 1
    scratch = torch.empty(num_splits * t * h * (d + 2) if num_splits > 1 else 1, dtype=torch.float32,
                          device=q.device)
    _C_cuda.paged_attention(_DTYPE[q.dtype], q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                            _i32(block_tables).data_ptr(), _i32(seq_lens).data_ptr(),
                            _i32(query_start_loc).data_ptr(), out.data_ptr(), scratch.data_ptr(), t,
                            seq_lens.shape[0], h, k_cache.shape[1], d, k_cache.shape[2], block_tables.shape[1],
                            float(scale), int(sliding_window), num_splits, split_keys, _stream())
    return out if out.dtype == dtype else out.to(dtype)


def dense_attention(q, k, v, scale, causal=False):
    b, h, lq, d = q.shape
    _check_head_dim(d)
    check(b * h * lq < 2**31, f"the cuda back-end takes fewer than 2^31 (batch x heads x queries), got {b * h * lq}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    _C_cuda.dense_attention(_DTYPE[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, h,
                            k.shape[1], lq, k.shape[2], d, float(scale), bool(causal), _stream())
    return out


def varlen_attention(q, k, v, cu_seqlens, scale, causal=False, max_seqlen=0):
    t, h, d = q.shape
    _check_head_dim(d)
    check(h <= MAX_GRID_YZ, f"the cuda back-end takes at most {MAX_GRID_YZ} heads, got {h}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    _C_cuda.varlen_attention(_DTYPE[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                             _i32(cu_seqlens).data_ptr(), t, cu_seqlens.shape[0] - 1, h, k.shape[1], d, float(scale),
                             bool(causal), _stream())
    return out


def sample(logits: torch.Tensor, p: SamplingTensors, num_logprobs: int = 0) -> SampleResult:
    batch, vocab = logits.shape
    dev = logits.device
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    scratch = torch.zeros(4, batch, vocab, dtype=torch.float32, device=dev)
    tokens = torch.empty(batch, dtype=torch.int64, device=dev)
    logprobs = torch.empty(batch, dtype=torch.float32, device=dev)
    top_tokens = torch.empty(batch, num_logprobs, dtype=torch.int64, device=dev)
    top_logprobs = torch.empty(batch, num_logprobs, dtype=torch.float32, device=dev)
    kept = [_f32(p.temperature), _i32(p.top_k), _f32(p.top_p), _f32(p.min_p), _f32(p.repetition_penalty),
            _f32(p.presence_penalty), _f32(p.frequency_penalty), p.seed.long().contiguous(),
            p.step.long().contiguous(), _i32(p.prompt_tokens), _i32(p.prompt_offsets), _i32(p.output_tokens),
            _i32(p.output_offsets), _i32(p.bias_tokens), _i32(p.bias_offsets), _f32(p.bias_values)]
    masks = [None if t is None else _i32(t) for t in (p.allowed_bits, p.allowed_row)]  # alive through the call
    _C_cuda.sample(_DTYPE[logits.dtype], logits.data_ptr(), scratch.data_ptr(), batch, vocab, logits.stride(0),
                   *(t.data_ptr() for t in kept), *(0 if t is None else t.data_ptr() for t in masks), num_logprobs, tokens.data_ptr(), logprobs.data_ptr(),
                   top_tokens.data_ptr(), top_logprobs.data_ptr(), _stream())
    return SampleResult(tokens, logprobs, top_tokens, top_logprobs)


def denoise_step(x, cond, uncond, prev_x0, coef, seed, step):
    batch = x.shape[0]
    x, cond = x.contiguous(), cond.to(x.dtype).contiguous()
    uncond = None if uncond is None else uncond.to(x.dtype).contiguous()
    prev_x0 = None if prev_x0 is None else prev_x0.to(x.dtype).contiguous()
    x_next, x0 = torch.empty_like(x), torch.empty_like(x)
    _C_cuda.denoise_step(_DTYPE[x.dtype], x.data_ptr(), cond.data_ptr(), 0 if uncond is None else uncond.data_ptr(),
                         0 if prev_x0 is None else prev_x0.data_ptr(), _f32(coef).data_ptr(),
                         seed.long().contiguous().data_ptr(), step.long().contiguous().data_ptr(), x_next.data_ptr(),
                         x0.data_ptr(), batch, x[0].numel() if batch else 0, _stream())
    return x_next, x0
