"""The per-layer decoder steps (RMS norm with the residual add, rotary embedding, SiLU-gated
product) on each back-end against the reference, which the model tests check against
transformers end to end."""

import pytest
import torch

from pyserve import kernels
from pyserve.kernels import reference

from conftest import backend_params

BACKENDS = backend_params()
ROWS = [1, 3, 700]  # decode sizes run on the calling thread, prefill sizes on the thread team


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(backend, device, rows, with_residual):
    dim = 173
    x, weight, residual = rand(rows, dim), rand(dim, seed=1), rand(rows, dim, seed=2) if with_residual else None
    want_y, want_h = reference.rms_norm(x, weight, 1e-5, residual)
    y, h = kernels.rms_norm(x.to(device), weight.to(device), 1e-5,
                            residual=None if residual is None else residual.to(device), backend=backend)
    torch.testing.assert_close(y.cpu(), want_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.cpu(), want_h)
    ms = (want_h ** 2).mean(-1, keepdim=True)  # the definition, independently
    torch.testing.assert_close(want_y, want_h / torch.sqrt(ms + 1e-5) * weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("rows", ROWS)
def test_rotary_rotates_the_leading_heads_in_place(backend, device, rows):
    heads, kv_heads, dim = 4, 2, 16
    qkv = rand(rows, (heads + 2 * kv_heads) * dim)
    angles = torch.arange(rows, dtype=torch.float32)[:, None] * (1.0 / 10000 ** (torch.arange(0, dim, 2) / dim))
    cos, sin = angles.cos(), angles.sin()
    want = qkv.clone()
    reference.rotary(want, cos, sin, heads + kv_heads)
    got = qkv.to(device)
    kernels.rotary(got, cos.to(device), sin.to(device), heads + kv_heads, backend=backend)
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
    rotated = (heads + kv_heads) * dim
    assert torch.equal(want[:, rotated:], qkv[:, rotated:])  # v untouched
    # A rotation keeps each pair's length, and position 0 is the identity.
    pairs = lambda t: t[:, :rotated].view(rows, -1, 2, dim // 2)  # noqa: E731
    torch.testing.assert_close(pairs(want).norm(dim=2), pairs(qkv).norm(dim=2), atol=1e-5, rtol=1e-5)
    assert torch.equal(want[0], qkv[0])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul(backend, device, rows):
    x = rand(rows, 2 * 101) * 4
    got = kernels.silu_mul(x.to(device), backend=backend).cpu()
    gate, up = x[:, :101], x[:, 101:]
    torch.testing.assert_close(got, gate * torch.sigmoid(gate) * up, atol=1e-5, rtol=1e-5)


def test_layer_ops_check_their_arguments():
    with pytest.raises(kernels.KernelInputError, match="residual"):
        kernels.rms_norm(rand(2, 8), rand(8), 1e-6, residual=rand(3, 8))
    with pytest.raises(kernels.KernelInputError, match="do not fit"):
        kernels.rotary(rand(2, 16), rand(2, 4), rand(2, 4), 3)
    with pytest.raises(kernels.KernelInputError, match="even"):
        kernels.silu_mul(rand(2, 7))
