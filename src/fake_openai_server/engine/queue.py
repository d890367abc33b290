"""The items waiting for one model, grouped by length so that batches form cheaply.

A batch starts from the oldest waiting item (no request starves) and takes the items
closest to it in length, within the batch size, the padded-token budget and the
padding the device can afford. Items sit in buckets of lengths within ``BUCKET_RATIO``
of each other, each in arrival order, so forming a batch looks at the buckets around
the oldest item and costs O(batch + buckets looked at), whatever the length of the
queue. Items of a
request that has gone (cancelled, timed out) are left where they are and skipped when
reached; the queue is compacted once they outnumber the live ones.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fake_openai_server.backends.base import IdArray, Padding

# Lengths in one bucket differ by at most 3%, well inside any padding rule, so a batch
# never has to skip an item in the middle of a bucket.
BUCKET_RATIO = 1.03
_LOG_RATIO = math.log(BUCKET_RATIO)
# A batch looks at most this many buckets on either side of its oldest item (lengths
# 100 times shorter or longer): beyond that the padding rules refuse anyway.
MAX_BUCKET_DISTANCE = 160


def bucket_of(length: int) -> int:
    return int(math.log(max(length, 1)) / _LOG_RATIO)


@dataclass(eq=False, slots=True)
class Item:
    job: Any  # the request's job (engine/core.py); the queue reads only ``job.gone``
    position: int
    ids: IdArray
    enqueued: float = 0.0
    cost: int = field(init=False)
    taken: bool = False

    def __post_init__(self) -> None:
        self.cost = len(self.ids)

    @property
    def live(self) -> bool:
        return not self.taken and not self.job.gone


@dataclass(frozen=True)
class BatchLimits:
    max_items: int
    max_tokens: int  # tokens of the shape the batch runs as (its padding's shape)
    max_padding: float  # padded tokens per real token, beyond the free waste below
    free_waste: int  # padding tokens that cost less than one more pass (measured)
    padding: Padding = field(default_factory=Padding)  # the model's: its warmed shapes on a GPU

    def fits(self, items: int, longest: int, real: int) -> bool:
        rows, length = self.padding.shape(items, longest)
        if items > self.max_items or rows * length > self.max_tokens:
            return False
        # The padding rule weighs what the batch's own lengths bring (items x longest):
        # the rows and length its shape rounds up to cost the same whichever items fill
        # them (counting them would stop a batch at 17 items where 20 fill a shape of 20).
        padded = items * longest
        waste = padded - real
        return waste <= self.free_waste or padded <= self.max_padding * real


class BucketQueue:
    def __init__(self) -> None:
        self._buckets: dict[int, deque[Item]] = {}
        self._arrivals: deque[Item] = deque()
        self.tokens = 0  # live tokens waiting
        self.items = 0  # live items waiting
        self._dead = 0  # items of gone requests still in the deques

    def __len__(self) -> int:
        return self.items

    def push(self, items: list[Item]) -> None:
        for item in items:
            self._buckets.setdefault(bucket_of(item.cost), deque()).append(item)
            self._arrivals.append(item)
            self.tokens += item.cost
        self.items += len(items)

    def forget(self, items: int, tokens: int) -> None:
        """A request has gone: ``items`` of its items, ``tokens`` tokens, will be skipped."""
        self.items -= items
        self.tokens -= tokens
        self._dead += items
        if self._dead > max(1024, self.items):
            self._compact()

    def take(self, limits: BatchLimits) -> list[Item]:
        """The next batch: the oldest item and those closest to it in length."""
        anchor = self._oldest()
        if anchor is None:
            return []
        home = bucket_of(anchor.cost)
        batch: list[Item] = []
        longest = real = 0
        # Buckets in order of distance from the anchor's: home, home-1, home+1, ...
        sides = {-1: True, 1: True}
        for distance in range(MAX_BUCKET_DISTANCE + 1):
            for side in (1,) if distance == 0 else (-1, 1):
                if not sides[side]:
                    continue
                bucket = self._buckets.get(home + side * distance)
                while bucket:
                    item = bucket[0]
                    if not item.live:
                        bucket.popleft()
                        self._skip(item)
                        continue
                    widest = max(longest, item.cost)
                    if batch and not limits.fits(len(batch) + 1, widest, real + item.cost):
                        # Further out on this side the padding only grows.
                        if distance:
                            sides[side] = False
                        break
                    bucket.popleft()
                    item.taken = True
                    batch.append(item)
                    longest, real = widest, real + item.cost
                    if len(batch) >= limits.max_items:
                        return self._taken(batch, real)
            if not (sides[-1] or sides[1]):
                break
        return self._taken(batch, real)

    def drain(self) -> list[Item]:
        """Every live item, oldest first; the queue is left empty."""
        live = [item for item in self._arrivals if item.live]
        self._buckets.clear()
        self._arrivals.clear()
        self.tokens = self.items = self._dead = 0
        return live

    # --- internals ----------------------------------------------------------------
    def _oldest(self) -> Item | None:
        while self._arrivals and not self._arrivals[0].live:
            item = self._arrivals.popleft()
            if not item.taken:
                # Gone, and reached here first: the bucket no longer needs to skip it.
                item.taken = True
                self._dead -= 1
        return self._arrivals[0] if self._arrivals else None

    def _skip(self, item: Item) -> None:
        """A gone item reached the head of its bucket: count it out once."""
        if not item.taken:
            item.taken = True
            self._dead -= 1

    def _taken(self, batch: list[Item], real: int) -> list[Item]:
        self.items -= len(batch)
        self.tokens -= real
        # Longest first inside the batch: the order sentence-transformers uses.
        batch.sort(key=lambda item: item.cost, reverse=True)
        return batch

    def _compact(self) -> None:
        for key in list(self._buckets):
            kept = deque(item for item in self._buckets[key] if item.live)
            if kept:
                self._buckets[key] = kept
            else:
                del self._buckets[key]
        self._arrivals = deque(item for item in self._arrivals if item.live)
        self._dead = 0
