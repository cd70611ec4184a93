"""Argument checks shared by the kernel entry points: each error names the argument at fault."""

import torch


class KernelInputError(ValueError):
    """A kernel was called with arguments of the wrong shape, dtype or device."""


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_GRID_YZ = 65535  # CUDA's limit on a launch grid's second and third axes (GPU back-ends)
INDEX_DTYPES = (torch.int32, torch.int64)


def check(cond: bool, message: str) -> None:
    if not cond:
        raise KernelInputError(message)


def tensor(t: object, name: str, *, ndim: int | None = None, dtypes: tuple = (), device: torch.device | None = None,
           shape: tuple | None = None, contiguous: bool = False) -> torch.Tensor:
    """Check one tensor argument; `shape` entries of None match any size.

    Runs on every kernel call, so messages are only formatted once a check has failed.
    """
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise KernelInputError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes and t.dtype not in dtypes:
        raise KernelInputError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise KernelInputError(f"{name} is on {t.device}, expected {device}")
    if shape is not None:
        sizes = t.shape
        if sizes != shape and (len(shape) != len(sizes) or any(s is not None and s != n for s, n in zip(shape, sizes))):
            expected = tuple("*" if s is None else s for s in shape)
            raise KernelInputError(f"{name} must have shape {expected}, got {tuple(sizes)}")
    if contiguous and not t.is_contiguous():
        raise KernelInputError(f"{name} must be contiguous (kernels address it by pointer), got strides {t.stride()}")
    return t
