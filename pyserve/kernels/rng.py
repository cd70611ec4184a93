"""Counter-based random numbers (Philox4x32-10), the one generator every back-end reproduces.

A row's stream is keyed by its 64-bit seed; the counter is (offset, step, stream, 0). So a draw
depends only on (seed, step, offset), never on the batch it runs in, the back-end or the thread
count. `stream` separates uses: sampling draws and denoising noise never share numbers.
"""

import math

import torch

SAMPLE_STREAM = 0
NOISE_STREAM = 1
DIFFUSION_LATENT_STREAM = 2  # initial latents of denoising loops
GAN_LATENT_STREAM = 3
VAE_LATENT_STREAM = 4

SEED_RANGE = (-2**63, 2**64)  # the seeds a request may give: anything that fits in 64 bits
_GOLDEN = 0x9E3779B97F4A7C15


def row_seed(seed: int, index: int) -> int:
    """The seed of row `index` of a request seeded `seed` (its i-th completion, image or sample
    path): rows differ, and each depends on (seed, index) alone."""
    return (seed + index * _GOLDEN) % 2**63

_MASK = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # int64 multiplication wraps modulo 2**64, which keeps all 64 bits of a 32x32 product.
    p = b * a
    return (p >> 32) & _MASK, p & _MASK


def philox(seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: int) -> list[torch.Tensor]:
    """Four 32-bit words (as int64 tensors) for each broadcast (seed, c0, c1) and stream c2."""
    seed, c0, c1 = torch.broadcast_tensors(seed.long(), c0.long(), c1.long())
    k0, k1 = seed & _MASK, (seed >> 32) & _MASK
    x0, x1 = c0 & _MASK, c1 & _MASK
    x2 = torch.full_like(x0, c2 & _MASK)
    x3 = torch.zeros_like(x0)
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, x2)
        hi_a, lo_a = _mulhilo(_ROUND_A, x0)
        x0, x1, x2, x3 = hi_b ^ x1 ^ k0, lo_b, hi_a ^ x3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK, (k1 + _KEY_B) & _MASK
    return [x0, x1, x2, x3]


def to_uniform(word: torch.Tensor) -> torch.Tensor:
    """[0, 1) from the top 24 bits, exact in fp32 on every back-end."""
    return (word >> 8).float() * (1.0 / 16777216.0)


def uniform(seed: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, stream: int) -> torch.Tensor:
    return to_uniform(philox(seed, offset, step, stream)[0])


def normal(seed: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, stream: int) -> torch.Tensor:
    """Standard normals: each counter gives four, as two Box-Muller pairs (cos, sin).

    Element `offset` uses counter offset // 4 and lane offset % 4: lanes 0 and 1 come from
    words 0 and 1, lanes 2 and 3 from words 2 and 3.
    """
    w = philox(seed, offset // 4, step, stream)
    lane = offset % 4
    first = lane < 2
    a = torch.where(first, w[0], w[2])
    b = torch.where(first, w[1], w[3])
    u1 = ((a >> 8).float() + 1.0) * (1.0 / 16777216.0)  # (0, 1]: log stays finite
    angle = (2.0 * math.pi) * to_uniform(b)
    radius = torch.sqrt((-2.0 * torch.log(u1)).clamp_min(0.0))
    return radius * torch.where(lane % 2 == 0, torch.cos(angle), torch.sin(angle))


def seeded_normal(seeds: torch.Tensor, count: int, stream: int) -> torch.Tensor:
    """`count` standard normals for each seed, [len(seeds), count], each row from its seed alone
    (a latent that never depends on the batch it is drawn in)."""
    offsets = torch.arange(count, device=seeds.device)[None, :]
    return normal(seeds[:, None], torch.zeros_like(seeds)[:, None], offsets, stream)
