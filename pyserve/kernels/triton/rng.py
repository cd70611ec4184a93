"""Triton versions of pyserve.kernels.rng: Philox keyed by seed, counter (offset, step, stream, 0)."""

import triton
import triton.language as tl


@triton.jit
def to_uniform(word):
    return (word >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def uniform(seed, step, offset, stream: tl.constexpr):
    w0, _, _, _ = tl.philox(seed, offset.to(tl.uint32), step.to(tl.uint32), tl.full(offset.shape, stream, tl.uint32),
                            tl.zeros(offset.shape, tl.uint32))
    return to_uniform(w0)


@triton.jit
def normal(seed, step, offset, stream: tl.constexpr):
    """Element `offset`: counter offset // 4, lane offset % 4 (two Box-Muller pairs per counter)."""
    counter = (offset // 4).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, counter, step.to(tl.uint32) + tl.zeros(counter.shape, tl.uint32),
                               tl.full(counter.shape, stream, tl.uint32), tl.zeros(counter.shape, tl.uint32))
    lane = offset % 4
    a = tl.where(lane < 2, w0, w2)
    b = tl.where(lane < 2, w1, w3)
    u1 = ((a >> 8).to(tl.float32) + 1.0) * (1.0 / 16777216.0)
    angle = 6.283185307179586 * to_uniform(b)
    radius = tl.sqrt(tl.maximum(-2.0 * tl.log(u1), 0.0))  # a fast log may exceed 0 near u1 = 1
    return radius * tl.where(lane % 2 == 0, tl.cos(angle), tl.sin(angle))
