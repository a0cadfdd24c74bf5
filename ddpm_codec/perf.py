"""Process-level performance settings for CPU inference and training."""
from __future__ import annotations

import ctypes
import ctypes.util

import torch

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


def tune_allocator(nbytes: int = 1 << 30) -> bool:
    """Keep freed memory in the heap instead of returning it to the OS after every large
    batch (page faults dominated large-batch inference when measured). Returns False off glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, nbytes) == 1
        ok &= libc.mallopt(_M_TOP_PAD, nbytes // 4) == 1
        return bool(ok)
    except (OSError, AttributeError, TypeError):
        return False


def setup(threads: int | None = None) -> None:
    """Threads (default: all cores torch sees) and allocator settings for a CLI process."""
    if threads:
        torch.set_num_threads(threads)
    tune_allocator()
