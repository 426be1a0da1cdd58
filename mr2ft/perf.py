"""Process-level settings that make CPU training faster.

A training step allocates and frees the same large tensors (activations, gradients) every time. With glibc's
default malloc many of them come straight from the kernel, either as fresh ``mmap`` chunks or after the top of the
heap was handed back (trimmed), so every step pays tens of thousands of page faults: 5-10% of a CPU step in
``benchmarks/finetune_throughput.py``. PyTorch's CPU performance guide avoids this by preloading jemalloc or
tcmalloc; :func:`keep_freed_memory` gets the same effect from glibc itself, at run time.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_THRESHOLD = 2**30
TOP_PAD = 256 * 2**20
OPT_OUT = "MR2FT_MALLOC_TUNING"

_applied: bool | None = None


def _user_chose_an_allocator() -> bool:
    if any(key.startswith("MALLOC_") for key in os.environ):
        return True
    preload = os.environ.get("LD_PRELOAD", "")
    return any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc"))


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the kernel after each step.

    Blocks up to 32 MiB are served from the heap rather than ``mmap``, and up to 1 GiB of free memory at the top of
    the heap is kept rather than trimmed; the process's resident size then stays near its peak, which a training
    process reaches in its first step anyway. Process-wide and idempotent. Skipped where the C library is not glibc,
    where the user already set ``MALLOC_*`` variables or preloads jemalloc/tcmalloc/mimalloc, and when
    ``MR2FT_MALLOC_TUNING=0``.

    Returns:
        Whether the settings are in effect.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(OPT_OUT, "1") == "0" or _user_chose_an_allocator():
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
        _applied = all(libc.mallopt(param, value) == 1 for param, value in settings)
    except (OSError, AttributeError):
        _applied = False
    return _applied


__all__ = ["keep_freed_memory"]
