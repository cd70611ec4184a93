"""Where packed weights live: one buffer, backed by 2 MiB pages where the OS grants them.

A decode step streams every weight once (~90 MB for a 112M-parameter model in int8). With 4 KiB
pages each 4 KiB of that stream costs a TLB miss and a page walk, and small tensors scattered
over the heap never get huge pages (Linux's transparent huge pages are opt-in per range here:
"madvise" mode). Gathered into one advised buffer, in the order a step reads them, the 112M
model's 40 decode products read ~36 GB/s instead of ~28 on this machine (same weights, same run).
"""

import ctypes
import sys

import torch

from .quantize import QuantizedWeight

HUGE_PAGE = 2 * 2**20
_MADV_HUGEPAGE = 14  # linux/mman.h
_ALIGN = 64  # a cache line: what the kernels' vector loads like


def _advise_huge_pages(address: int, length: int) -> bool:
    """Ask Linux to back [address, address + length) with huge pages; False where it can't."""
    if not sys.platform.startswith("linux") or length <= 0:
        return False
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise(address, length, _MADV_HUGEPAGE) == 0


def gather(weights: list[QuantizedWeight]) -> torch.Tensor | None:
    """Move the CPU weights' data and scales into one buffer, in the order given, each part
    cache-line aligned; the weights then hold views of it. The buffer is advised before anything
    touches it, since Linux backs a range with huge pages as its pages are first touched.
    Returns the buffer, or None when there is too little to gain (under one huge page)."""
    parts = [(w, name) for w in weights if w.device.type == "cpu" for name in ("data", "scales")
             if getattr(w, name) is not None]
    sizes = [-(-getattr(w, name).nbytes // _ALIGN) * _ALIGN for w, name in parts]
    total = sum(sizes)
    if total < HUGE_PAGE:
        return None
    buffer = torch.empty(total + HUGE_PAGE, dtype=torch.uint8)
    start = -buffer.data_ptr() % HUGE_PAGE
    _advise_huge_pages(buffer.data_ptr() + start, (buffer.numel() - start) // HUGE_PAGE * HUGE_PAGE)
    offset = start
    for (w, name), size in zip(parts, sizes):
        old = getattr(w, name)
        new = buffer[offset:offset + old.nbytes].view(old.dtype).view(old.shape)
        new.copy_(old)
        setattr(w, name, new)
        offset += size
    return buffer
