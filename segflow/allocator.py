"""The C allocator settings of an inference process.

glibc's ``malloc`` serves blocks from 128 KiB up with fresh ``mmap`` pages and returns them to
the kernel on ``free``, and it trims the heap's free top past 128 KiB too. A CPU forward
pass allocates and frees tens of megabytes of activations per batch, so every batch's
activations land on new pages that the kernel must fault in and zero. On this project's
2-core machine, espnet_camvid at batch 8 ran at 16.8 img/s with 4.4 million minor page
faults, and at 27.7 img/s with 0.5 million once freed memory was kept for reuse (the
``bench/segment.py`` forward pass, one process).

Workers call :func:`retain_freed_memory` before they load their model. The price is that a
process keeps up to :data:`TRIM_THRESHOLD` of freed heap instead of returning it; its
peak resident size grew by 5% in the measurement above.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# The largest mmap threshold glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks up
# to this size come from the heap, where they are reused.
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30
TOP_PAD = 256 * 2**20


def retain_freed_memory() -> bool:
    """Make this process's allocator keep freed memory for reuse. Returns whether it could:
    only glibc has these settings (elsewhere the allocator is left as it is)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD),
    )
    return all([mallopt(parameter, value) == 1 for parameter, value in settings])
