"""Keeping freed memory in the process while a CPU trains.

glibc's malloc hands every block above its mmap threshold (32 MB at most) to the kernel when it
is freed, and trims the heap's top as soon as a few hundred kilobytes are free. A training step
frees and allocates many such blocks (the loss's logit chunks, gradients, the optimizer's
temporaries), so every step faults them back in page by page, each page zeroed by the kernel:
in a long-lived process that holds the teacher, the student and calibration statistics this
costs more system time than the step's arithmetic. :func:`retained_heap` turns both off while
it lasts (``mallopt``: no mmap for large blocks, no trimming) and gives the memory back afterwards
(``malloc_trim``); nested, the outermost decides. The command line holds it for a whole command
(the heap is laid out that way from the start), a heal loop for its own duration. Elsewhere than
glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Iterator
from contextlib import contextmanager

#: mallopt parameters and glibc's defaults for them.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_NEVER_TRIM = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_depth = 0


@contextmanager
def retained_heap() -> Iterator[None]:
    """Within it, freed memory stays in the process for the next allocation (see the module)."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield
        return
    if _depth == 0:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)
