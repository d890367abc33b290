"""The items waiting for one model, grouped by length so that batches form cheaply.

Every item is *due* at a time, and a batch starts from the item due first (no request
starves) and takes the items closest to it in length, within the batch size, the
padded-token budget and the padding the device can afford. An item is due when it
arrives, except a large request's beyond its first ``quantum`` tokens (one batch's
worth): those are due as if the request had the model at ``1/PACE`` of its speed, so a
request of a few texts that arrives while a bulk request of thousands is queued waits
for about one batch of it, not for all of it, and the bulk request still keeps about
that share of the model while others keep it busy. Here an item counts at least
``least_cost`` tokens, its share of a full batch: a batch of short texts fills up on
items long before it reaches ``quantum`` tokens (64 texts of 16 tokens are a full
batch; counted by their tokens, a quantum of 16,384 was 16 such batches).

Items sit in buckets of lengths within ``BUCKET_RATIO`` of each other, each a heap by
due time, so forming a batch looks at the buckets around the first item due and costs
O(batch x log(queue) + buckets looked at), however long the queue. Items of a request
that has gone (cancelled, timed out) are left where they are and skipped when reached;
the queue is compacted once the entries of items no longer waiting outnumber the live
ones (a bucket a batch never visits again would keep its entries for good).
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from fake_openai_server.backends.base import IdArray, Padding

# Lengths in one bucket differ by at most 3%, well inside any padding rule, so a batch
# never has to skip an item in the middle of a bucket.
BUCKET_RATIO = 1.03
_LOG_RATIO = math.log(BUCKET_RATIO)
# A batch looks at most this many buckets on either side of its first item (lengths
# 100 times shorter or longer): beyond that the padding rules refuse anyway.
MAX_BUCKET_DISTANCE = 160
# A large request's items beyond its first batch are due at the pace of the model at
# 1/PACE of its speed (its measured seconds per token, times PACE): the share of the
# model a bulk request keeps while short requests keep arriving.
PACE = 2.0


def bucket_of(length: int) -> int:
    return int(math.log(max(length, 1)) / _LOG_RATIO)


@dataclass(eq=False, slots=True)
class Item:
    job: Any  # the request's job (engine/core.py); the queue reads only ``job.gone``
    position: int
    ids: IdArray
    enqueued: float = 0.0
    due: float = 0.0  # when it should start, by the pacing above (set by push)
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


@dataclass(eq=False, slots=True)
class Flow:
    """One request's place in its model's queue, across the chunks it is queued in."""

    start: float = -1.0  # when its first item arrived (-1: none yet)
    tokens: int = 0  # its tokens queued so far (each item's at least the least cost)


# A heap entry: (due, arrival number, item); the arrival number breaks ties in order.
Entry = tuple[float, int, Item]


class BucketQueue:
    def __init__(
        self, quantum: int = 0, seconds_per_token: float = 0.0, least_cost: int = 0
    ) -> None:
        """``quantum``: the tokens of a request due on arrival; ``seconds_per_token``:
        the pace of the rest (0: every item is due on arrival, first come first served);
        ``least_cost``: the tokens an item counts for, at least, in both."""
        self.quantum = quantum
        self.seconds_per_token = seconds_per_token
        self.least_cost = least_cost
        self._buckets: dict[int, list[Entry]] = {}
        self._due: list[Entry] = []  # every item not yet reached at the top, by due time
        self._arrivals = itertools.count()
        self.tokens = 0  # live tokens waiting
        self.items = 0  # live items waiting
        self._entries = 0  # in the buckets: the live items' and those not yet skipped

    def __len__(self) -> int:
        return self.items

    @property
    def held(self) -> int:
        """Entries in the heaps: two per live item, and those not yet dropped."""
        return self._entries + len(self._due)

    def push(self, items: list[Item], flow: Flow | None = None, now: float = 0.0) -> None:
        """Queue ``items``, arrived at ``now``: the next of ``flow``'s (their request's)
        when given, else a request of their own."""
        flow = flow or Flow()
        if flow.start < 0:
            flow.start = now
        for item in items:
            item.due = now
            beyond = flow.tokens - self.quantum
            if beyond > 0:
                item.due = max(now, flow.start + beyond * self.seconds_per_token)
            flow.tokens += max(item.cost, self.least_cost)
            entry = (item.due, next(self._arrivals), item)
            heapq.heappush(self._buckets.setdefault(bucket_of(item.cost), []), entry)
            heapq.heappush(self._due, entry)
            self.tokens += item.cost
        self.items += len(items)
        self._entries += len(items)

    def forget(self, items: int, tokens: int) -> None:
        """A request has gone: ``items`` of its items, ``tokens`` tokens, will be skipped."""
        self.items -= items
        self.tokens -= tokens
        self._compact_if_stale()

    def take(self, limits: BatchLimits) -> list[Item]:
        """The next batch: the item due first and those closest to it in length."""
        self._compact_if_stale()
        first = self._first()
        if first is None:
            return []
        home = bucket_of(first.cost)
        batch: list[Item] = []
        longest = real = 0
        # Buckets in order of distance from the first item's: home, home-1, home+1, ...
        # (its own bucket gives it first: it is due before any other there).
        sides = {-1: True, 1: True}
        for distance in range(MAX_BUCKET_DISTANCE + 1):
            for side in (1,) if distance == 0 else (-1, 1):
                if not sides[side]:
                    continue
                bucket = self._buckets.get(home + side * distance)
                while bucket:
                    item = bucket[0][2]
                    if not item.live:
                        heapq.heappop(bucket)
                        self._entries -= 1
                        continue
                    widest = max(longest, item.cost)
                    if batch and not limits.fits(len(batch) + 1, widest, real + item.cost):
                        # Further out on this side the padding only grows.
                        if distance:
                            sides[side] = False
                        break
                    heapq.heappop(bucket)
                    self._entries -= 1
                    item.taken = True
                    batch.append(item)
                    longest, real = widest, real + item.cost
                    if len(batch) >= limits.max_items:
                        return self._taken(batch, real)
            if not (sides[-1] or sides[1]):
                break
        return self._taken(batch, real)

    def drain(self) -> list[Item]:
        """Every item not taken, first due first, gone requests' too (their jobs must learn
        that nothing of theirs is queued any more); the queue is left empty."""
        left = [entry[2] for entry in sorted(self._due) if not entry[2].taken]
        self._buckets.clear()
        self._due.clear()
        self.tokens = self.items = self._entries = 0
        return left

    # --- internals ----------------------------------------------------------------
    def _first(self) -> Item | None:
        """The live item due first (items taken or gone are dropped from the top)."""
        due = self._due
        while due and not due[0][2].live:
            heapq.heappop(due)
        return due[0][2] if due else None

    def _compact_if_stale(self) -> None:
        """Compact once the heaps hold more entries of items no longer waiting (taken,
        or their request gone) than live ones: whether or not a batch ever reaches them."""
        stale = max(self._entries, len(self._due)) - self.items
        if stale > max(1024, self.items):
            self._compact()

    def _taken(self, batch: list[Item], real: int) -> list[Item]:
        self.items -= len(batch)
        self.tokens -= real
        # Longest first inside the batch: the order sentence-transformers uses.
        batch.sort(key=lambda item: item.cost, reverse=True)
        return batch

    def _compact(self) -> None:
        for key in list(self._buckets):
            kept = [entry for entry in self._buckets[key] if entry[2].live]
            if kept:
                heapq.heapify(kept)
                self._buckets[key] = kept
            else:
                del self._buckets[key]
        self._due = [entry for entry in self._due if entry[2].live]
        heapq.heapify(self._due)
        self._entries = sum(map(len, self._buckets.values()))
