"""Triton batched LoRA (see pyserve.kernels.lora): a shrink kernel (one program per row: the
row's input against its adapter's A) and an expand kernel (one program per row and block of
output columns: B times the shrunk vector, added to y)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, index_ptr, rank_ptr, scale_ptr, out_ptr, K, R, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    i = tl.load(index_ptr + t)
    r = tl.arange(0, BLOCK_R)
    if i >= 0:
        rank = tl.load(rank_ptr + i)
        acc = tl.zeros((BLOCK_R,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + t.to(tl.int64) * K + k, mask=k < K, other=0.0).to(tl.float32)
            ok = (r[:, None] < rank) & (k[None, :] < K)
            w = tl.load(a_ptr + (i.to(tl.int64) * R + r[:, None]) * K + k[None, :], mask=ok, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        tl.store(out_ptr + t.to(tl.int64) * BLOCK_R + r, acc * tl.load(scale_ptr + i))


@triton.jit
def _expand_kernel(y_ptr, b_ptr, index_ptr, rank_ptr, shrunk_ptr, N, R, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    i = tl.load(index_ptr + t)
    if i >= 0:
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        rank = tl.load(rank_ptr + i)
        s = tl.load(shrunk_ptr + t.to(tl.int64) * BLOCK_R + r)
        ok = (n[:, None] < N) & (r[None, :] < rank)
        w = tl.load(b_ptr + (i.to(tl.int64) * N + n[:, None]) * R + r[None, :], mask=ok, other=0.0)
        delta = tl.sum(w.to(tl.float32) * s[None, :], axis=1)
        y = tl.load(y_ptr + t.to(tl.int64) * N + n, mask=n < N, other=0.0)
        tl.store(y_ptr + t.to(tl.int64) * N + n, (y.to(tl.float32) + delta).to(y.dtype), mask=n < N)


def lora(y, x, a, b, index, rank, scale) -> None:
    tokens, n = y.shape
    if tokens == 0:
        return
    k, r = x.shape[1], a.shape[1]
    block_r = max(16, triton.next_power_of_2(r))
    shrunk = torch.zeros(tokens, block_r, dtype=torch.float32, device=y.device)
    x, a, b = x.contiguous(), a.contiguous(), b.contiguous()
    index, rank, scale = index.to(torch.int32), rank.to(torch.int32), scale.float()
    _shrink_kernel[(tokens,)](x, a, index, rank, scale, shrunk, k, r, BLOCK_R=block_r, BLOCK_K=64)
    block_n = 64
    _expand_kernel[(tokens, triton.cdiv(n, block_n))](y, b, index, rank, shrunk, n, r, BLOCK_R=block_r,
                                                       BLOCK_N=block_n)
