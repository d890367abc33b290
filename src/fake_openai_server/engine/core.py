"""Batching across requests, and the engine process that runs the batches.

Requests put their items (token-id sequences) on their model's queue and await a
future. The scheduler, a task on the event loop, forms batches from what is waiting
(``engine/queue.py``) and sends them to the engine process (``engine/process.py``),
keeping ``PIPELINE_DEPTH`` batches there so that the device never waits for the
next one. A lone request runs at once: batches grow only from what arrives while the
model is busy.

The engine is supervised: a batch that fails fails its requests only; an engine
process that dies or hangs is replaced, the requests it held answered with an error
and ``/ready`` saying why meanwhile; if no replacement starts within the restart
bound (twice STALL_TIMEOUT or twice the first start-up, whichever is longer),
``on_fatal`` is called and the server exits non-zero so that its supervisor
replaces it. No request waits on a process that is gone.

The engine knows items, their cost in tokens and futures; nothing of texts or HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fake_openai_server.backends.base import FloatArray, IdArray, ModelInfo, Plugin
from fake_openai_server.engine.process import EngineProcess, Loaded, Ran
from fake_openai_server.engine.queue import PACE, BatchLimits, BucketQueue, Item
from fake_openai_server.engine.queue import Flow as Flow  # what a request hands submit()
from fake_openai_server.engine.worker import PassCost
from fake_openai_server.errors import ErrorKind, ServiceError
from fake_openai_server.settings import Settings
from fake_openai_server.workers import (
    CallFailed,
    StartFailed,
    WorkerGone,
    WorkerProcess,
    describe_exit,
)

log = logging.getLogger(__name__)

State = Literal["loading", "ready", "restarting", "failed", "stopping"]

# Batches sent to the engine process and not yet answered: one running, one ready to
# start the moment it ends.
PIPELINE_DEPTH = 2
# A batch may hold at most this many padded tokens per real token, beyond the padding
# that costs less than one more pass (measured per model at start-up: on a GPU a
# padded token is cheap and a pass is not; on a CPU padding costs compute in
# proportion). 1.1 on CPU: bench/ showed +12% texts/s over 1.25 with 32 one-text
# clients, small shape.
MAX_PADDING = 1.1
# After this many failed batches in a row (and none since that ran), /ready says 503
# "failing": the model is likely broken rather than unlucky once. Requests are still
# served, so the first batch that runs makes it ready again.
FAILING_AFTER = 3
# How often the stall watchdog looks at the running batch.
WATCH_INTERVAL = 0.5


@dataclass(frozen=True)
class BatchReport:
    items: int
    tokens: int
    padded_tokens: int
    seconds: float
    failed: bool = False
    queue_seconds: tuple[float, ...] = ()  # how long each item waited before the pass
    graph: bool = False  # the pass replayed a CUDA graph captured at start-up


BatchObserver = Callable[[BatchReport], None]


@dataclass
class EngineStats:
    batches: int = 0
    items: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    busy_seconds: float = 0.0
    failed_batches: int = 0
    graph_batches: int = 0  # that replayed a CUDA graph
    # Time with none of the model's batches in the engine process: the scheduler sends
    # one as soon as anything is queued, so the device had nothing of this model to run
    # (requests were still on their way: clients, HTTP, tokenization).
    starved_seconds: float = 0.0
    drained_batches: int = 0  # of ``batches``: those that took the last of the queued items
    queued_seconds: float = 0.0  # the items' waits in the queue, summed

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
            "graph_batches": self.graph_batches,
            "starved_seconds": round(self.starved_seconds, 3),
            "drained_batches": self.drained_batches,
            "queued_seconds": round(self.queued_seconds, 3),
        }


@dataclass(eq=False)
class _Job:
    """One request's items and the future its caller awaits."""

    future: asyncio.Future[FloatArray]
    total: int
    remaining: int
    queued_items: int = 0
    queued_tokens: int = 0
    out: FloatArray | None = None

    @property
    def gone(self) -> bool:
        return self.future.done()

    def put(self, position: int, row: FloatArray) -> None:
        if self.gone:
            return
        if self.out is None:
            self.out = np.empty((self.total, *row.shape), dtype=np.float32)
        self.out[position] = row
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(self.out)


@dataclass(eq=False)
class _Lane:
    """One model: its queue, its batch limits, its counters."""

    index: int
    info: ModelInfo
    limits: BatchLimits
    queue: BucketQueue = field(default_factory=BucketQueue)
    stats: EngineStats = field(default_factory=EngineStats)
    consecutive_failures: int = 0
    observer: BatchObserver | None = None
    starved_since: float | None = None  # None while a batch of it is in the engine process

    def starved_for(self, now: float) -> float:
        return now - self.starved_since if self.starved_since is not None else 0.0


@dataclass(eq=False)
class _Flight:
    lane: _Lane
    batch: list[Item]
    sent: float
    padded_tokens: int  # of the shape the batch runs as
    expected_seconds: float
    queue_seconds: tuple[float, ...]
    drained: bool  # it took the last of its model's queued items


def free_waste(cost: PassCost, max_batch_tokens: int) -> int:
    """Padding tokens that cost less than one more forward pass."""
    if cost.token_seconds <= 0:
        return max_batch_tokens if cost.pass_seconds > 0 else 0
    return int(min(cost.pass_seconds / cost.token_seconds, max_batch_tokens))


WORKDIR_PREFIX = "fos-engine-"
_LOCK = ".lock"  # held (flock) by the server using the directory, for as long as it runs


def make_workdir() -> tuple[str, int]:
    """A temporary directory for the engine's files (the tokenizer's, ~50 KB), and the
    open lock file that marks it in use. Only a clean stop removes its own, so those of
    servers that ended otherwise (SIGKILL, the OOM killer) are removed here first."""
    root = tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if name.startswith(WORKDIR_PREFIX) and _abandoned(path):
                shutil.rmtree(path, ignore_errors=True)
    path = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
    lock = os.open(os.path.join(path, _LOCK), os.O_WRONLY | os.O_CREAT, 0o600)
    with contextlib.suppress(OSError):  # a filesystem without locks: nothing is swept
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return path, lock


def _abandoned(path: str) -> bool:
    """Whether the server that made ``path`` has ended: its lock is free (the kernel drops
    a process's locks when it ends, however it ends, whatever its pid or namespace). One
    without a lock file (an older server's, or one being made) is left alone."""
    try:
        lock = os.open(os.path.join(path, _LOCK), os.O_WRONLY)
    except OSError:  # none, or another user's
        return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: its server runs
        return False
    finally:
        os.close(lock)
    return True


class Engine:
    def __init__(
        self,
        settings: Settings,
        plugin: Plugin,
        workdir: str | None = None,
        observers: Callable[[str], BatchObserver] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        """``workdir``: where the engine process leaves the tokenizer files; without one,
        a temporary directory made by ``start`` and removed by ``stop``."""
        self.settings = settings
        self._restart_settings = settings  # with the commits the start loaded (start)
        self._plugin = plugin
        self._workdir = workdir
        self._workdir_lock: int | None = None  # the lock of the one start() made
        self.observers = observers
        self.on_fatal = on_fatal
        self.state: State = "loading"
        self.detail: str | None = None  # why the state is not "ready"
        self.models: list[ModelInfo] = []
        self.costs: list[PassCost] = []
        self.restarts = 0
        self._lanes: dict[str, _Lane] = {}
        self._process: EngineProcess | None = None
        self._in_flight: deque[_Flight] = deque()
        self._head_since = 0.0  # when the oldest batch in flight started running
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._next_lane = 0
        self._start_seconds = 0.0
        self._restarting: asyncio.Task[None] | None = None
        self._on_gpu = False  # a model runs on CUDA (known once started)
        self._running_at_exit: _Flight | None = None  # the batch running when it died

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self) -> list[ModelInfo]:
        """Start the engine process; raises ``StartFailed`` / ``WorkerGone`` if it cannot."""
        started = time.perf_counter()
        if self._workdir is None:
            self._workdir, self._workdir_lock = make_workdir()
        loaded = await self._spawn(self.settings)
        self._start_seconds = time.perf_counter() - started
        self.models, self.costs = loaded.models, loaded.costs
        # A restart loads the files this start loaded, the commit each Hub model came
        # from, whatever its branch or tag says by then: the tokenizers serving are
        # these commits', and /info names them (nor is the Hub asked again).
        commits = {info.name: info.revision for info in self.models if info.revision}
        self._restart_settings = self.settings.pinned_to(commits)
        self._on_gpu = any(info.device.startswith("cuda") for info in self.models)
        s = self.settings
        for index, (info, cost) in enumerate(zip(loaded.models, loaded.costs, strict=True)):
            limits = BatchLimits(
                max_items=s.max_batch_size,
                max_tokens=s.max_batch_tokens,
                max_padding=MAX_PADDING,
                free_waste=free_waste(cost, s.max_batch_tokens),
                padding=info.padding,
            )
            observer = self.observers(info.name) if self.observers else None
            # A request's first batch's worth of tokens is due on arrival; the rest at the
            # pace of the model at 1/PACE of its measured speed (engine/queue.py). An item
            # counts at least its share of a full batch.
            queue = BucketQueue(
                s.max_batch_tokens,
                PACE * cost.token_seconds,
                least_cost=s.max_batch_tokens // s.max_batch_size,
            )
            self._lanes[info.name] = _Lane(
                index, info, limits, queue, observer=observer, starved_since=time.perf_counter()
            )
            log.info(
                "%s: a forward pass costs %.1f ms + %.1f µs per token: batches may carry "
                "%d padding tokens",
                info.name,
                cost.pass_seconds * 1e3,
                cost.token_seconds * 1e6,
                limits.free_waste,
            )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._supervised("scheduler", self._schedule)),
            loop.create_task(self._supervised("watchdog", self._watch)),
        ]
        self.state = "ready"
        return self.models

    async def _spawn(self, settings: Settings) -> Loaded:
        assert self._workdir is not None  # start() has made one
        process = EngineProcess(settings, self._plugin, self._workdir)
        self._process = process  # before it has started, so that stop() can end it
        loaded = await process.load()
        process.on_exit = self._engine_exited
        self._head_since = time.perf_counter()
        log.info("engine process %d ready", loaded.pid)
        return loaded

    def refuse_waiting(self) -> None:
        """The drain's time is nearly up: answer every request still waiting, and every
        one that comes to the engine from now on, with 503 "shutting down" while their
        clients still wait for a reply (what uvicorn cancels at the end gets a bare 500).
        The engine process goes on until ``stop``."""
        # Loading or restarting: new work is refused already, and stop() must still see
        # that state to kill a loading process at once.
        if self.state == "ready":
            self.state = "stopping"
        shutting_down = server_stopping()
        self._fail_queued(shutting_down)
        for flight in self._in_flight:
            self._fail_batch(flight.batch, shutting_down)

    async def stop(self) -> None:
        """Answer every request still waiting (503) and end the engine process, never blocking."""
        if self.state in ("loading", "restarting") and self._process is not None:
            self._process.kill()  # still loading: nothing of its work to wait for
        self.state = "stopping"
        for task in self._tasks:
            task.cancel()
        if self._restarting is not None:
            self._restarting.cancel()
        tasks = [*self._tasks, *([self._restarting] if self._restarting else [])]
        for ended in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(ended, Exception):  # what stopping must not stop at
                log.error("an engine task had failed", exc_info=ended)
        shutting_down = server_stopping()
        self._fail_queued(shutting_down)
        try:
            if self._process is not None:
                waited = (item.job for flight in self._in_flight for item in flight.batch)
                if self._in_flight and all(job.gone for job in waited):
                    self._process.kill()  # nobody waits for what it runs: no need to finish
                await self._process.stop()
        finally:
            for flight in list(self._in_flight):
                self._fail_batch(flight.batch, shutting_down)
            self._in_flight.clear()
            if self._workdir_lock is not None and self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                os.close(self._workdir_lock)
                self._workdir_lock = None

    # --- requests ------------------------------------------------------------------------
    def lane(self, model: str) -> _Lane:
        return self._lanes[model]

    @property
    def pid(self) -> int | None:
        """The engine process's, while there is one."""
        return self._process.pid if self._process is not None else None

    def queued_tokens(self, model: str) -> int:
        return self._lanes[model].queue.tokens

    @property
    def queued_items(self) -> int:
        return sum(len(lane.queue) for lane in self._lanes.values())

    def stats(self) -> dict[str, dict[str, float]]:
        now = time.perf_counter()
        stats = {}
        for name, lane in self._lanes.items():
            stats[name] = lane.stats.as_dict()
            stats[name]["starved_seconds"] = round(
                lane.stats.starved_seconds + lane.starved_for(now), 3
            )
        return stats

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def submit(
        self, model: str, items: Sequence[IdArray], flow: Flow | None = None
    ) -> FloatArray:
        """Queue ``items`` for ``model`` and return their rows, stacked in the same order.

        ``flow`` is their request's, when it queues its items in several chunks (one
        ``Flow()`` per request): its items beyond the first batch's worth are paced.
        """
        if not items:
            raise ValueError("submit() needs at least one item")
        lane = self._lanes[model]
        if self.state != "ready":
            raise ServiceError(ErrorKind.NOT_READY, self._not_ready_message())
        queue = lane.queue
        cost = sum(len(ids) for ids in items)
        if queue.tokens and queue.tokens + cost > self.settings.max_queue_tokens:
            raise ServiceError(
                ErrorKind.OVERLOADED,
                f"The server is busy ({queue.tokens} tokens queued, limit "
                f"MAX_QUEUE_TOKENS={self.settings.max_queue_tokens}). Retry shortly.",
            )
        future: asyncio.Future[FloatArray] = asyncio.get_running_loop().create_future()
        job = _Job(future, total=len(items), remaining=len(items))
        now = time.perf_counter()
        queue.push([Item(job, i, ids, enqueued=now) for i, ids in enumerate(items)], flow, now)
        job.queued_items, job.queued_tokens = len(items), cost
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away (client disconnected, deadline): drop its queued items.
            future.cancel()
            raise
        finally:
            if job.queued_items:
                queue.forget(job.queued_items, job.queued_tokens)
                job.queued_items = job.queued_tokens = 0

    def _not_ready_message(self) -> str:
        if self.state == "loading":
            return LOADING
        if self.state == "restarting":
            return "The model is restarting after a failure; retry shortly."
        if self.state == "stopping":
            return STOPPING
        return "The model is not running."

    # --- scheduling ----------------------------------------------------------------------
    async def _schedule(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            sent = False
            while len(self._in_flight) < PIPELINE_DEPTH and self._ready_process():
                if not self._dispatch_next():
                    break
                sent = True
            if sent and self._on_gpu and self._process is not None:
                # Out at once: when a batch has just finished, the requests it answered
                # are next in the event loop's turn, and a write left to the end of the
                # turn waited for all of them while the GPU ran down its last batch. Not
                # on a CPU, where the engine process wakes to compete for the cores that
                # those requests need (bench/results/ab-null-emulated-gpu-flush.md,
                # ab-null-cpu-flush-ungated.md, -gated.md). On the H200 it was neutral
                # (ab-full-cuda-s27-flush.md).
                self._process.flush()

    def _ready_process(self) -> EngineProcess | None:
        process = self._process
        if self.state != "ready" or process is None or not process.alive:
            return None
        return process

    def _dispatch_next(self) -> bool:
        """Send one batch of the next model (in turn) that has items waiting."""
        lanes = list(self._lanes.values())
        for offset in range(len(lanes)):
            lane = lanes[(self._next_lane + offset) % len(lanes)]
            batch = lane.queue.take(lane.limits)
            if not batch:
                continue
            self._next_lane = (lane.index + 1) % len(lanes)
            self._send(lane, batch)
            return True
        return False

    def _send(self, lane: _Lane, batch: list[Item]) -> None:
        process = self._process
        assert process is not None
        now = time.perf_counter()
        for item in batch:
            item.job.queued_items -= 1
            item.job.queued_tokens -= item.cost
        lane.stats.starved_seconds += lane.starved_for(now)
        lane.starved_since = None
        cost = self.costs[lane.index]
        rows, length = lane.info.padding.shape(len(batch), batch[0].cost)  # longest first
        flight = _Flight(
            lane,
            batch,
            sent=now,
            padded_tokens=rows * length,
            expected_seconds=cost.pass_seconds + cost.token_seconds * rows * length,
            queue_seconds=tuple(now - item.enqueued for item in batch),
            drained=not lane.queue,
        )
        if not self._in_flight:
            self._head_since = now
        self._in_flight.append(flight)
        future = process.run(lane.index, [item.ids for item in batch])
        future.add_done_callback(lambda done: self._finished(flight, done))

    def _finished(self, flight: _Flight, done: asyncio.Future[Ran]) -> None:
        try:
            self._complete(flight, done)
        except Exception:
            # A bug here must not leave the batch's requests waiting.
            log.exception("%s: handling a finished batch failed", flight.lane.info.name)
            self._fail_batch(flight.batch, ServiceError(ErrorKind.INTERNAL, "Internal error."))

    def _complete(self, flight: _Flight, done: asyncio.Future[Ran]) -> None:
        was_head = bool(self._in_flight) and self._in_flight[0] is flight
        with contextlib.suppress(ValueError):
            self._in_flight.remove(flight)
        now = time.perf_counter()
        if was_head:
            self._head_since = now
        lane = flight.lane
        if not any(other.lane is lane for other in self._in_flight):
            lane.starved_since = now
        self._wake.set()
        batch = flight.batch
        try:
            ran = done.result()
            out = ran.rows
            if out.shape[0] != len(batch):
                raise CallFailed(f"{out.shape[0]} rows for {len(batch)} items", oom=False)
        except CallFailed as exc:
            log.error(
                "%s: a batch of %d items failed (%s)", lane.info.name, len(batch), exc.error_type
            )
            self._failed(flight, model_failure(exc))
            return
        except WorkerGone:
            # The process ended with this batch in it. Shutting down: the grace period
            # is over (503). Otherwise it died: the batch that was running failed, those
            # behind it never ran (503, and no failure of the model's: counted, they had
            # kept /ready at "failing" after two crashes, with nothing failing since).
            if self.state == "stopping":
                self._fail_batch(batch, server_stopping())
            elif flight is self._running_at_exit:
                self._running_at_exit = None  # nothing of it kept
                self._failed(flight, model_failure())
            else:
                self._fail_batch(batch, not_ready_restarting())
            return
        lane.consecutive_failures = 0
        for item, row in zip(batch, out, strict=True):
            item.job.put(item.position, row)
        self._record(flight, ran)

    def _failed(self, flight: _Flight, error: ServiceError) -> None:
        lane = flight.lane
        lane.consecutive_failures += 1
        lane.stats.failed_batches += 1
        self._fail_batch(flight.batch, error)
        tokens = sum(item.cost for item in flight.batch)
        self._observe(lane, BatchReport(len(flight.batch), tokens, 0, 0.0, failed=True))

    def _fail_batch(self, batch: list[Item], error: ServiceError) -> None:
        for job in {item.job for item in batch}:
            if not job.gone:
                job.future.set_exception(error)

    def _fail_queued(self, error: ServiceError) -> None:
        for lane in self._lanes.values():
            left = lane.queue.drain()
            for job in {item.job for item in left}:
                # Nothing of theirs is queued now: their submit() must not count it out.
                job.queued_items = job.queued_tokens = 0
            self._fail_batch(left, error)

    def _record(self, flight: _Flight, ran: Ran) -> None:
        batch, stats = flight.batch, flight.lane.stats
        tokens = sum(item.cost for item in batch)
        report = BatchReport(
            len(batch),
            tokens,
            flight.padded_tokens,
            ran.seconds,
            queue_seconds=flight.queue_seconds,
            graph=ran.graph,
        )
        stats.batches += 1
        stats.graph_batches += ran.graph
        stats.items += report.items
        stats.tokens += report.tokens
        stats.padded_tokens += report.padded_tokens
        stats.busy_seconds += ran.seconds
        stats.queued_seconds += sum(flight.queue_seconds)
        stats.drained_batches += flight.drained
        self._observe(flight.lane, report)

    def _observe(self, lane: _Lane, report: BatchReport) -> None:
        if lane.observer is None:
            return
        try:
            lane.observer(report)
        except Exception:
            # Metrics must never stop the engine.
            log.exception("%s: the batch observer failed", lane.info.name)

    # --- supervision ---------------------------------------------------------------------
    async def _supervised(self, name: str, body: Callable[[], object]) -> None:
        """Run a loop of the engine; if it ever raises, log why and run it again."""
        while True:
            try:
                await body()  # type: ignore[misc]
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("engine %s failed; restarting it", name)
                self._fail_queued(
                    ServiceError(ErrorKind.INTERNAL, "The server's scheduler failed; retry.")
                )
                await asyncio.sleep(0.1)
                self._wake.set()

    async def _watch(self) -> None:
        """Kill an engine process whose running batch has taken far too long (a hung device)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if not self._in_flight or self._process is None or not self._process.alive:
                continue
            head = self._in_flight[0]
            running = time.perf_counter() - max(head.sent, self._head_since)
            limit = max(self.settings.stall_timeout, 10 * head.expected_seconds)
            if running > limit:
                log.error(
                    "%s: a batch of %d items has run for %.0fs (limit %.0fs): the device "
                    "seems hung; restarting the engine process",
                    head.lane.info.name,
                    len(head.batch),
                    running,
                    limit,
                )
                self.detail = f"a forward pass hung for {running:.0f}s; restarting the engine"
                self._process.kill()

    def _engine_exited(self, process: WorkerProcess) -> None:
        if self.state in ("stopping", "failed") or process is not self._process:
            return
        reason = describe_exit(process.exit_code)
        log.error("the engine process ended unexpectedly (%s); starting a new one", reason)
        # Its batches fail next (their answers were set first): only this one ran.
        self._running_at_exit = self._in_flight[0] if self._in_flight else None
        self.state = "restarting"
        self.detail = self.detail or f"the engine process ended ({reason}); restarting it"
        self.restarts += 1
        self._fail_queued(not_ready_restarting())
        self._restarting = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        bound = max(2 * self.settings.stall_timeout, 2 * self._start_seconds)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bound
        attempt = 0
        while (left := deadline - loop.time()) > 0:
            attempt += 1
            try:
                loaded = await asyncio.wait_for(self._spawn(self._restart_settings), left)
            except Exception as exc:
                # What was foreseen is said in a line; anything else (a thread that cannot
                # start) with its traceback, and tried again all the same.
                foreseen = isinstance(exc, (WorkerGone, StartFailed, TimeoutError, OSError))
                log.error(
                    "engine restart %d failed: %s",
                    attempt,
                    str(exc) or type(exc).__name__,  # a timeout's message is empty
                    exc_info=None if foreseen else exc,
                )
                await asyncio.sleep(min(2.0**attempt, 10.0, max(deadline - loop.time(), 0)))
                continue
            if [(m.name, m.revision) for m in loaded.models] != [
                (m.name, m.revision) for m in self.models
            ]:
                log.error("the restarted engine serves other models; giving up")
                break
            self.state, self.detail = "ready", None
            for lane in self._lanes.values():
                # A new process: the old one's failures say nothing of it (and a pod that
                # /ready keeps out of its Service would get no request to prove it well).
                lane.consecutive_failures = 0
            self._wake.set()
            log.info("engine restarted (%d restarts so far)", self.restarts)
            return
        self.state = "failed"
        self.detail = f"the engine could not be restarted within {bound:.0f}s"
        log.critical("%s; exiting so that the supervisor replaces this server", self.detail)
        if self.on_fatal is not None:
            self.on_fatal(self.detail)

    def failing(self) -> list[str]:
        """The models whose last FAILING_AFTER batches or more failed (/ready: 503 "failing"
        until one of theirs succeeds)."""
        return [n for n, lane in self._lanes.items() if lane.consecutive_failures >= FAILING_AFTER]

    def readiness(self) -> tuple[str, str | None]:
        if self.state != "ready":
            return self.state, self.detail
        failing = self.failing()
        if failing:
            names = ", ".join(failing)
            return "failing", f"the last {FAILING_AFTER} or more batches failed on {names}"
        return "ready", None


def model_failure(error: CallFailed | None = None) -> ServiceError:
    if error is not None and error.oom:
        message = (
            "The model ran out of device memory on a batch holding this request; retry it "
            "(if it keeps happening, the server's operator can lower MAX_BATCH_TOKENS)."
        )
    elif error is not None:
        message = f"The model failed on a batch ({error.error_type}); retry the request."
    else:
        message = "The model process failed on a batch holding this request; retry it."
    return ServiceError(ErrorKind.MODEL_FAILURE, message)


STOPPING = "The server is shutting down."
LOADING = "The model is still loading; retry shortly."


def server_stopping() -> ServiceError:
    return ServiceError(ErrorKind.NOT_READY, STOPPING)


def not_ready_restarting() -> ServiceError:
    return ServiceError(
        ErrorKind.NOT_READY,
        "The model is restarting after a failure and could not run this request; retry shortly.",
    )
