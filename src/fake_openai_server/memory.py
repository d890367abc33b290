"""The server process's memory: its garbage collector, and giving memory back after an
overload.

Once start-up is done, ``settle_after_start`` takes what start-up built out of the cyclic
garbage collector's passes and lets its youngest generation grow larger before one. With
Python's defaults, a busy server spent a quarter of its time collecting: under load a
request's objects outlive the default passes (every 700 new objects), so they were
promoted and kept triggering full passes over the ~270,000 objects of the libraries and
the app (~160 ms each on a 2-core EPYC; 22 in 13 s with 256 clients).

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
# New container objects (net of those freed) between two passes over the youngest
# generation, once start-up is done (Python's default: 700). More than the objects of the
# requests in flight in a busy server, which would otherwise be promoted while they wait.
YOUNG_GENERATION_THRESHOLD = 20_000


def settle_after_start() -> None:
    """Collect once, then exempt every object alive (the libraries, the app, the
    tokenizers) from later collections (``gc.freeze``), and collect the youngest
    generation less often. For the process that serves, once it is ready."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *gc.get_threshold()[1:])
    log.debug("garbage collector settled: %d objects exempt", gc.get_freeze_count())


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

    def observe(self, waiting: int) -> None:
        """Feed the work waiting now: items queued, and batches in the engine process."""
        if waiting:
            self._peak = max(self._peak, waiting)
            return
        if self._peak >= TRIM_AFTER_ITEMS:
            log.info("the queue of %d items has drained; giving its memory back", self._peak)
            give_back()
        self._peak = 0
