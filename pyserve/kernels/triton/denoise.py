"""Triton fused scheduler step (see pyserve.kernels.denoise_step)."""

import torch
import triton
import triton.language as tl

from ..checks import MAX_GRID_YZ, check
from ..types import Coef
from .rng import normal

_NOISE_STREAM = 1
# The coefficient table's columns (types.Coef, the one definition), as compile-time constants.
_GUIDANCE, _X0_X, _X0_OUT = tl.constexpr(Coef.GUIDANCE), tl.constexpr(Coef.X0_X), tl.constexpr(Coef.X0_OUT)
_EPS_X, _EPS_OUT, _CLIP = tl.constexpr(Coef.EPS_X), tl.constexpr(Coef.EPS_OUT), tl.constexpr(Coef.CLIP)
_NEXT_X, _NEXT_X0, _NEXT_EPS = tl.constexpr(Coef.NEXT_X), tl.constexpr(Coef.NEXT_X0), tl.constexpr(Coef.NEXT_EPS)
_NEXT_PREV_X0, _NOISE = tl.constexpr(Coef.NEXT_PREV_X0), tl.constexpr(Coef.NOISE)


@triton.jit
def _denoise_kernel(x_ptr, cond_ptr, uncond_ptr, prev_ptr, coef_ptr, seed_ptr, step_ptr, next_ptr, x0_ptr, numel,
                    HAS_UNCOND: tl.constexpr, HAS_PREV: tl.constexpr, NCOEF: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(1)  # rows on the short axis; a row's elements (maybe many tiles) on axis 0
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    base = row.to(tl.int64) * numel
    c = coef_ptr + row * NCOEF
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(cond_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(uncond_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        out = u + tl.load(c + _GUIDANCE) * (out - u)
    x0 = tl.load(c + _X0_X) * x + tl.load(c + _X0_OUT) * out
    clip = tl.load(c + _CLIP)
    x0 = tl.where(clip > 0, tl.minimum(tl.maximum(x0, -clip), clip), x0)
    eps = tl.load(c + _EPS_X) * x + tl.load(c + _EPS_OUT) * out
    nxt = tl.load(c + _NEXT_X) * x + tl.load(c + _NEXT_X0) * x0 + tl.load(c + _NEXT_EPS) * eps
    if HAS_PREV:
        nxt += tl.load(c + _NEXT_PREV_X0) * tl.load(prev_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    noise = tl.load(c + _NOISE)
    if noise != 0.0:
        nxt += noise * normal(tl.load(seed_ptr + row), tl.load(step_ptr + row), offs, _NOISE_STREAM)
    tl.store(next_ptr + base + offs, nxt.to(next_ptr.dtype.element_ty), mask=mask)
    tl.store(x0_ptr + base + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def denoise_step(x, cond, uncond, prev_x0, coef, seed, step):
    batch = x.shape[0]
    numel = x[0].numel() if batch else 0
    x, cond = x.contiguous(), cond.contiguous()
    uncond = cond if uncond is None else uncond.contiguous()
    prev = cond if prev_x0 is None else prev_x0.contiguous()
    x_next, x0 = torch.empty_like(x), torch.empty_like(x)
    block = 1024
    check(batch <= MAX_GRID_YZ, f"the triton back-end takes at most {MAX_GRID_YZ} rows per denoising step, got {batch}")
    if batch and numel:
        _denoise_kernel[(triton.cdiv(numel, block), batch)](
            x, cond, uncond, prev, coef.float().contiguous(), seed.long().contiguous(), step.long().contiguous(),
            x_next, x0, numel, HAS_UNCOND=uncond is not cond, HAS_PREV=prev is not cond, NCOEF=Coef.COUNT,
            BLOCK=block)
    return x_next, x0
