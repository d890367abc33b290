"""Batching across requests.

Requests put their items (token-id sequences) on one queue and await a future.
A single worker forms batches from everything waiting — items of similar length
together, bounded by a batch size and a padded-token budget — and runs them one
at a time on an inference thread, off the event loop. A lone request runs at
once: batches grow only from what arrives while the model is busy.

The engine knows items, their cost in tokens and futures; nothing of texts,
models or HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fake_openai_server.backends.base import FloatArray, TokenIds
from fake_openai_server.errors import ErrorKind, ServiceError

log = logging.getLogger(__name__)

# A batch may hold at most this many padded tokens per real token. Padding costs
# compute in proportion; a smaller batch hardly does (bench/: 1.25 -> 1.1 gave
# +12% texts/s with 32 one-text clients and +7% on a bulk request, small shape, CPU).
MAX_PADDING = 1.1

RunBatch = Callable[[Sequence[TokenIds]], FloatArray]
BatchObserver = Callable[["BatchReport"], None]


@dataclass(frozen=True)
class BatchReport:
    items: int
    tokens: int
    padded_tokens: int
    seconds: float
    failed: bool = False
    queue_seconds: tuple[float, ...] = ()  # per item: from submit() to its forward pass


@dataclass
class EngineStats:
    batches: int = 0
    items: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    busy_seconds: float = 0.0
    failed_batches: int = 0

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "batches": self.batches,
            "items": self.items,
            "tokens": self.tokens,
            "padded_tokens": self.padded_tokens,
            "busy_seconds": round(self.busy_seconds, 3),
            "mean_batch_size": round(self.mean_batch_size, 2),
            "failed_batches": self.failed_batches,
        }


@dataclass(eq=False)
class _Job:
    """One request's items and the future its caller awaits."""

    future: asyncio.Future[FloatArray]
    remaining: int
    out: FloatArray | None = None
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def done(self) -> bool:
        return self.future.done()

    def put(self, position: int, row: FloatArray, total: int) -> None:
        if self.done:
            return
        if self.out is None:
            self.out = np.empty((total, *row.shape), dtype=np.float32)
        self.out[position] = row
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(self.out)


@dataclass(eq=False)
class _Item:
    job: _Job
    position: int
    total: int
    ids: TokenIds
    cost: int = field(init=False)

    def __post_init__(self) -> None:
        self.cost = len(self.ids)


class Batcher:
    def __init__(
        self,
        run: RunBatch,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_queue_tokens: int,
        executor: ThreadPoolExecutor | None = None,
        observer: BatchObserver | None = None,
        name: str = "model",
    ) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_tokens = max_queue_tokens
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"infer-{name}")
        self._observer = observer
        self.name = name
        self.stats = EngineStats()
        # Failed batches since the last one that ran: /ready reports a model that keeps failing.
        self.consecutive_failures = 0
        self._pending: list[_Item] = []
        self._queued_tokens = 0
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(
                self._loop(), name=f"batcher-{self.name}"
            )

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for item in self._pending:
            if not item.job.done:
                item.job.future.set_exception(
                    ServiceError(ErrorKind.NOT_READY, "The server is shutting down.")
                )
        self._pending.clear()
        self._queued_tokens = 0
        if self._own_executor:
            self._executor.shutdown(wait=True)

    # --- queue -----------------------------------------------------------------
    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def queued_items(self) -> int:
        return len(self._pending)

    async def submit(self, items: Sequence[TokenIds]) -> FloatArray:
        """Queue ``items`` and return their outputs stacked in the same order."""
        if not items:
            raise ValueError("submit() needs at least one item")
        cost = sum(len(ids) for ids in items)
        if self._queued_tokens and self._queued_tokens + cost > self.max_queue_tokens:
            raise ServiceError(
                ErrorKind.OVERLOADED,
                f"The server is busy ({self._queued_tokens} tokens queued, limit "
                f"MAX_QUEUE_TOKENS={self.max_queue_tokens}). Retry shortly.",
            )
        if self._worker is None:
            raise ServiceError(ErrorKind.NOT_READY, "The model is not running.")
        future: asyncio.Future[FloatArray] = asyncio.get_running_loop().create_future()
        job = _Job(future=future, remaining=len(items))
        self._pending.extend(_Item(job, i, len(items), ids) for i, ids in enumerate(items))
        self._queued_tokens += cost
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away (client disconnected): drop its queued items.
            future.cancel()
            self._drop_finished()
            raise

    def _drop_finished(self) -> None:
        kept = [item for item in self._pending if not item.job.done]
        self._queued_tokens -= sum(item.cost for item in self._pending) - sum(
            item.cost for item in kept
        )
        self._pending = kept

    def _take_batch(self) -> list[_Item]:
        """The oldest item plus the waiting items closest to it in length.

        Within the batch size and the padded-token budget, and only while padding
        stays under ``MAX_PADDING`` of the real tokens: short texts are not padded
        to the length of long ones, they form their own batch next.
        """
        self._drop_finished()
        if not self._pending:
            return []
        anchor = self._pending[0].cost
        by_closeness = sorted(self._pending, key=lambda item: abs(item.cost - anchor))
        batch: list[_Item] = []
        longest = real = 0
        for item in by_closeness:
            if len(batch) >= self.max_batch_size:
                break
            widest = max(longest, item.cost)
            padded = widest * (len(batch) + 1)
            if batch and (
                padded > self.max_batch_tokens or padded > MAX_PADDING * (real + item.cost)
            ):
                continue
            batch.append(item)
            longest, real = widest, real + item.cost
        chosen = set(map(id, batch))
        self._pending = [item for item in self._pending if id(item) not in chosen]
        self._queued_tokens -= sum(item.cost for item in batch)
        # Longest first inside the batch: the same order sentence-transformers uses.
        batch.sort(key=lambda item: item.cost, reverse=True)
        return batch

    # --- worker ------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            batch = self._take_batch()
            if not batch:
                self._wake.clear()
                continue
            ids = [item.ids for item in batch]
            started = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._executor, self._run, ids)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("%s: a batch of %d items failed", self.name, len(batch))
                self._record_failure(batch, time.perf_counter() - started)
                error = ServiceError(
                    ErrorKind.MODEL_FAILURE,
                    f"The model failed on a batch ({type(exc).__name__}); retry the request.",
                )
                for job in {item.job for item in batch}:
                    if not job.done:
                        job.future.set_exception(error)
                continue
            self._record(batch, time.perf_counter() - started)
            for item, row in zip(batch, out, strict=True):
                item.job.put(item.position, row, item.total)

    def _record_failure(self, batch: list[_Item], seconds: float) -> None:
        self.consecutive_failures += 1
        self.stats.failed_batches += 1
        if self._observer is not None:
            tokens = sum(item.cost for item in batch)
            self._observer(BatchReport(len(batch), tokens, 0, seconds, failed=True))

    def _record(self, batch: list[_Item], seconds: float) -> None:
        self.consecutive_failures = 0
        tokens = sum(item.cost for item in batch)
        began = time.perf_counter() - seconds  # when this forward pass started
        waits = tuple(began - item.job.queued_at for item in batch)
        report = BatchReport(len(batch), tokens, len(batch) * batch[0].cost, seconds, False, waits)
        self.stats.batches += 1
        self.stats.items += report.items
        self.stats.tokens += report.tokens
        self.stats.padded_tokens += report.padded_tokens
        self.stats.busy_seconds += seconds
        if self._observer is not None:
            self._observer(report)
