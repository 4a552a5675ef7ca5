"""Handing memory back after a run inside a long-lived process (a WebUI runs many jobs in one process).

Tensors a finished run held are freed by Python, but neither allocator gives the pages back by itself: glibc keeps
freed heap in its arenas (the process's RSS stays up, and grows a little with each run's fragmentation) and
PyTorch's CUDA allocator keeps freed blocks cached for reuse. After a run both are asked to return what is free.
"""
from __future__ import annotations

import ctypes
import gc
import sys


def _malloc_trim() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return False


def hand_back() -> None:
    """Collect garbage, then return free heap pages to the OS and cached CUDA blocks to the driver."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()
    except Exception:  # never let cleanup fail a finished run
        pass
    _malloc_trim()
