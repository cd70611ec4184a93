"""Argument checks shared by the kernel entry points: each error names the argument at fault."""

import torch


class KernelInputError(ValueError):
    """A kernel was called with arguments of the wrong shape, dtype or device."""


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check(cond: bool, message: str) -> None:
    if not cond:
        raise KernelInputError(message)


def tensor(t: object, name: str, *, ndim: int | None = None, dtypes: tuple = (), device: torch.device | None = None,
           shape: tuple | None = None) -> torch.Tensor:
    """Check one tensor argument; `shape` entries of None match any size."""
    check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    assert isinstance(t, torch.Tensor)
    if ndim is not None:
        check(t.dim() == ndim, f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes:
        check(t.dtype in dtypes, f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None:
        check(t.device == device, f"{name} is on {t.device}, expected {device}")
    if shape is not None:
        ok = len(shape) == t.dim() and all(s is None or s == n for s, n in zip(shape, t.shape))
        check(ok, f"{name} must have shape {tuple('*' if s is None else s for s in shape)}, got {tuple(t.shape)}")
    return t
