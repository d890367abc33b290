"""Giving memory back after an overload.

A queue of 100,000 items takes tens of MiB in many small objects; once they are freed,
Python and the C allocator keep the pages for reuse, so the process's resident memory
stays at its peak. After a large queue has drained, a collection and ``malloc_trim``
hand those pages back to the system, so that memory returns to its level before the
overload (and a memory limit is not reached by a server that was busy once).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging

log = logging.getLogger(__name__)

# Items that must have waited at once before a drained queue is worth a trim.
TRIM_AFTER_ITEMS = 10_000


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: ctypes._CFuncPtr = ctypes.CDLL(name).malloc_trim  # type: ignore[name-defined]
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def give_back() -> None:
    """Collect garbage and return the freed heap to the system (glibc; elsewhere a no-op)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class AfterOverload:
    """Calls ``give_back`` once a queue that held TRIM_AFTER_ITEMS or more has drained."""

    def __init__(self) -> None:
        self._peak = 0

    def observe(self, queued_items: int) -> bool:
        """Feed the current queue length; True when memory was just given back."""
        if queued_items:
            self._peak = max(self._peak, queued_items)
            return False
        if self._peak < TRIM_AFTER_ITEMS:
            self._peak = 0
            return False
        log.info("the queue of %d items has drained; giving its memory back", self._peak)
        self._peak = 0
        give_back()
        return True
