"""LoRA: the batched kernel (each row gathers its own adapter, Punica's BGMV) on every back-end
against the reference, and the reference against the plain definition."""

import pytest
import torch

from pyserve import kernels
from pyserve.kernels import reference

from conftest import backend_params

BACKENDS = backend_params()


def adapters(count: int, n: int, k: int, ranks: list[int], seed: int = 0):
    """Stacked adapter weights padded to the largest rank (padding left as noise: it must not be read)."""
    g = torch.Generator().manual_seed(seed)
    r = max(ranks)
    a, b = torch.randn(count, r, k, generator=g), torch.randn(count, n, r, generator=g)
    return a, b, torch.tensor(ranks, dtype=torch.int32), torch.rand(count, generator=g) + 0.5


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("tokens,n,k", [(1, 8, 16), (7, 100, 70), (40, 300, 256)])
def test_mixed_adapters_and_ranks_match_the_reference(backend, device, tokens, n, k):
    a, b, rank, scale = adapters(4, n, k, [1, 8, 3, 16])
    g = torch.Generator().manual_seed(tokens)
    x, y = torch.randn(tokens, k, generator=g), torch.randn(tokens, n, generator=g)
    index = torch.randint(-1, 4, (tokens,), generator=g, dtype=torch.int32)
    index[0] = 3
    want = y.clone()
    reference.lora(want, x, a, b, index, rank, scale)
    got = y.clone().to(device)  # (to() on the same device would alias y)
    kernels.lora(got, x.to(device), a.to(device), b.to(device), index.to(device), rank.to(device), scale.to(device),
                 backend=backend)
    torch.testing.assert_close(got.cpu(), want, atol=1e-3, rtol=1e-4)
    for t, i in enumerate(index.tolist()):  # the definition, row by row
        delta = 0 if i < 0 else scale[i] * (b[i, :, :rank[i]] @ (a[i, :rank[i]] @ x[t]))
        torch.testing.assert_close(want[t], y[t] + delta, atol=1e-3, rtol=1e-4)


def test_lora_checks_its_arguments():
    a, b, rank, scale = adapters(2, 8, 16, [2, 4])
    y, x = torch.zeros(3, 8), torch.zeros(3, 16)
    with pytest.raises(kernels.KernelInputError, match="index must be in"):
        kernels.lora(y, x, a, b, torch.tensor([0, 2, -1], dtype=torch.int32), rank, scale)
    with pytest.raises(kernels.KernelInputError, match="rank must be in"):
        kernels.lora(y, x, a, b, torch.zeros(3, dtype=torch.int32), torch.tensor([2, 9], dtype=torch.int32), scale)
    with pytest.raises(kernels.KernelInputError, match="b must have shape"):
        kernels.lora(y, x, a, b[:, :4], torch.zeros(3, dtype=torch.int32), rank, scale)
