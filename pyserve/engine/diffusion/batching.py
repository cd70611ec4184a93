"""How the diffusion engine cuts its work: model calls of a size fixed by the latent shape alone,
so that neither the batch nor the load changes an image; and a fair share of steps, so that no
request waits behind another's size.

Batch invariance. A convolution or matrix product over a batch of 3 rows may sum in another
order than over 1 or 8, enough to move a pixel. Rows of one call of a fixed size, though, are
computed independently of their neighbours. So every denoiser and VAE call takes exactly
`rows_per_call(shape)` rows, a short chunk padded with copies of its first row: an image meets
the same arithmetic alone or in any batch.

Fairness. Each request accumulates the seconds of model calls it has been given (a call's time
shared by its rows). The unit of scheduling is one model call, not a whole step: every engine
step makes the next call of the shape group holding the request that would have had the least
time after it (calls of a shape are timed as they run). A small request beside a large one thus
runs its steps between two of the large one's calls until it has caught up, instead of waiting
for each whole large step; a request that arrives starts level with the least-served request
there, so it cannot starve them either.
"""

from typing import Callable, Iterator

import torch

# Latent positions (rows x height x width) that one call covers. On CPUs a call is compute-bound
# from about a thousand positions (a 32x32 latent runs as fast alone as batched), so only small
# latents are batched; GPUs need wider calls to fill, and padding costs them little.
POSITIONS_PER_CALL = {"cpu": 1024, "cuda": 16384}
MAX_ROWS_PER_CALL = 16


def rows_per_call(latent_shape: tuple[int, ...], device: torch.device) -> int:
    """The rows of every model call for latents of this shape [C, h, w] on this device: a power
    of two from 1 to MAX_ROWS_PER_CALL, fixed by the shape so that it never depends on the load."""
    positions = latent_shape[-1] * latent_shape[-2]
    budget = POSITIONS_PER_CALL.get(device.type, POSITIONS_PER_CALL["cuda"])
    rows = 1
    while rows * 2 <= MAX_ROWS_PER_CALL and rows * 2 * positions <= budget:
        rows *= 2
    return rows


def chunks(total: int, rows: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Row indices of each call over `total` rows in calls of exactly `rows`: the last one padded
    with copies of its first row, whose results the caller drops (`[:total - start]`)."""
    for start in range(0, total, rows):
        index = torch.arange(start, min(start + rows, total), device=device)
        yield torch.cat([index, index[:1].expand(rows - len(index))])


def run_in_chunks(fn: Callable[..., torch.Tensor], rows: int, *tensors: torch.Tensor) -> torch.Tensor:
    """fn over the tensors' rows in calls of exactly `rows` rows each (see `chunks`)."""
    total = tensors[0].shape[0]
    outs = [fn(*(t[index] for t in tensors)) for index in chunks(total, rows, tensors[0].device)]
    return torch.cat(outs)[:total]
