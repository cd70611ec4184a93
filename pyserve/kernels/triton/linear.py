"""Triton products over packed weights for decode-sized batches (see pyserve.kernels.quantize):
each program computes BLOCK_N outputs of one input row, unpacking its weight tile in registers,
so the packed bytes are read once. Larger batches unpack the weight, a block of rows at a time, for a
GEMM."""

import torch
import triton
import triton.language as tl

from ..quantize import FORMAT_CODES, packed_rows, unpacked_linear


@triton.jit
def _packed_linear_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, N, K, FORMAT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_ptr + row * K + k, mask=k_ok, other=0.0).to(tl.float32)
        ok = n_ok[:, None] & k_ok[None, :]
        if FORMAT == 1:  # bf16 as int16 bits: the top half of an fp32
            bits = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=ok, other=0).to(tl.int32)
            w = ((bits & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        else:
            scale = tl.load(s_ptr + n[:, None].to(tl.int64) * (K // 32) + (k // 32)[None, :], mask=ok,
                            other=0.0).to(tl.float32)
            if FORMAT == 2:  # int8
                q = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=ok, other=0).to(tl.float32)
            else:  # int4: in a group's 16 bytes, element j sits in byte j % 16, low nibble first
                j = k % 32
                at = (k // 32) * 16 + j % 16
                byte = tl.load(w_ptr + n[:, None].to(tl.int64) * (K // 2) + at[None, :], mask=ok, other=0).to(tl.int32)
                q = ((byte >> tl.where(j >= 16, 4, 0)[None, :]) & 0xF).to(tl.float32) - 8.0
            w = q * scale
        acc += tl.sum(w * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + n, acc, mask=n_ok)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    rows = packed_rows(x, weight)
    if not rows:
        return unpacked_linear(x, weight, bias)
    n, k = weight.shape
    xf = x.reshape(rows, k).contiguous()
    data = weight.data.view(torch.int16) if weight.format == "bf16" else weight.data
    out = torch.empty(rows, n, dtype=torch.float32, device=x.device)
    block_n = 32
    _packed_linear_kernel[(triton.cdiv(n, block_n), rows)](
        xf, data, weight.scales if weight.scales is not None else out, bias if bias is not None else out, out, n, k,
        FORMAT=FORMAT_CODES[weight.format], HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=128)
    return out.view(*x.shape[:-1], n).to(x.dtype)
