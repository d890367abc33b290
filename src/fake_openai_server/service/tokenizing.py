"""Where a request's texts become token ids.

In tokenizer processes (``service/tokenize_worker.py``) when the machine has cores to
spare, so that tokenizing never competes with HTTP for this process's GIL; otherwise on
two threads of this process. ``TOKENIZER_WORKERS`` sets the number of processes; by
default, on a GPU host, half the cores up to 8, and none on a CPU host, where the cores
belong to the model.

A tokenizer process that dies costs only the calls it held (each answered 503); the pool
starts a new one at once and ``/ready`` says so meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, ClassVar

from fake_openai_server import wire
from fake_openai_server.backends.base import Encoded, ModelInfo, Plugin, Tokenizer
from fake_openai_server.cpus import usable_cores
from fake_openai_server.errors import ErrorKind, ServiceError
from fake_openai_server.service.common import FIRST_CHUNK, TOKENIZE_CHUNK, chunk_sizes
from fake_openai_server.service.tokenize_worker import ENCODE, PAIRS, tokenize
from fake_openai_server.settings import Settings
from fake_openai_server.workers import CallFailed, WorkerGone, WorkerProcess, describe_exit

log = logging.getLogger(__name__)

THREADS = 2  # tokenizer threads in this process, when there are no tokenizer processes
# Without tokenizer processes, a few short texts (Dify's one text) are tokenized right
# here, on the event loop: a hop to a thread costs more than the tokenizing (a fraction
# of a ms). Chunks of a bulk request go to the threads, or a flood of them would hold
# the loop (100,000 queued one-word texts: /health waited 1.8 s when they ran here).
INLINE_TEXTS = 8
INLINE_CHARS = 1_000
MAX_AUTO_WORKERS = 8
WATCH_INTERVAL = 1.0  # seconds between the watchdog's looks at the tokenizer processes
RESPAWN_DELAY = 0.5  # seconds before a tokenizer process that died is replaced
RESPAWN_MAX_DELAY = 30.0  # the longest wait between tries, when a new one cannot start
# A tokenizer process is sent at most this many texts it has not answered yet (a larger
# call only when it has none); further calls wait here, in order, where a request that
# goes away takes its texts with it. Two chunks keep a process busy while its answers
# travel back. Sent all at once, the texts of 300 clients that had left were tokenized
# all the same before the next request's (3.7 s for its 10 texts, from an audit).
PROCESS_TEXTS = 2 * TOKENIZE_CHUNK


def default_workers(device: str) -> int:
    """Tokenizer processes when TOKENIZER_WORKERS is not set: only where cores are spare
    (those this process may use: a container's CPU limit counts)."""
    if not device.startswith("cuda"):
        return 0
    return min(MAX_AUTO_WORKERS, usable_cores() // 2)


class TokenizerProcess(WorkerProcess):
    module = "fake_openai_server.service.tokenize_worker"
    # One process is one core's worth of tokenizing: no thread pool of its own in Rust.
    environment: ClassVar[dict[str, str]] = {"TOKENIZERS_PARALLELISM": "false"}
    texts = 0  # texts sent to it and not yet answered

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.waiting: dict[asyncio.Future[Any], float] = {}  # calls not yet answered: sent at
        self.answered = 0.0  # when it last answered a call

    def stalled_for(self, now: float) -> float:
        """Seconds it has had calls waiting and answered none (0: none waiting)."""
        if not self.waiting:
            return 0.0
        return now - max(self.answered, min(self.waiting.values()))

    def decode(self, kind: int, body: bytes) -> tuple[int, Any]:
        call_id, rows, original, truncated, char_limits = wire.unpack_tokens(body)
        encoded = [
            Encoded(ids, cut, length, chars)
            for ids, length, cut, chars in zip(rows, original, truncated, char_limits, strict=True)
        ]
        return call_id, encoded


Held = tuple[int, "asyncio.Future[TokenizerProcess | None]"]


class TokenizerPool:
    def __init__(self, settings: Settings, plugin: Plugin) -> None:
        self._settings = settings
        self._plugin = plugin
        self._threads = ThreadPoolExecutor(THREADS, thread_name_prefix="tokenizer")
        self._tokenizers: list[Tokenizer] = []
        self._index: dict[str, int] = {}
        self.workers: list[TokenizerProcess] = []
        self._config: dict[str, Any] = {}
        self._stopping = False
        self.wanted = 0
        self._on_gpu = False
        self.restarts = 0
        self._respawning: set[asyncio.Task[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        # Calls waiting for room in a process (their texts, and who gets the process):
        # a few texts (a one-text request, a big one's first chunk) before chunks.
        self._held_small: deque[Held] = deque()
        self._held: deque[Held] = deque()

    async def start(self, models: list[ModelInfo], tokenizers: dict[str, Tokenizer]) -> None:
        self._tokenizers = [tokenizers[info.name] for info in models]
        self._index = {info.name: i for i, info in enumerate(models)}
        s = self._settings
        device = models[0].device if models else "cpu"
        self._on_gpu = device.startswith("cuda")
        wanted = s.tokenizer_workers if s.tokenizer_workers is not None else default_workers(device)
        self.wanted = wanted
        self._config = {
            "plugin": self._plugin.module,
            "options": self._plugin.options or {},
            "models": [info.as_dict() for info in models],
            "log_level": s.log_level,
            "log_json": s.log_json,
        }
        started = await asyncio.gather(
            *(self._spawn() for _ in range(wanted)), return_exceptions=True
        )
        failures = [r for r in started if isinstance(r, BaseException)]
        if failures:
            log.error(
                "%d of %d tokenizer processes could not start (%s); tokenizing here instead",
                len(failures),
                wanted,
                type(failures[0]).__name__,
            )
        if self.workers:
            self._watchdog = asyncio.get_running_loop().create_task(
                self._watch(), name="tokenizer-watchdog"
            )
        log.info(
            "tokenizing in %s",
            f"{len(self.workers)} tokenizer processes"
            if self.workers
            else f"{THREADS} threads of the server process",
        )

    async def _spawn(self) -> None:
        worker = TokenizerProcess(self._config)
        await worker.start()
        worker.on_exit = self._exited
        self.workers.append(worker)
        self._hand_out()

    def _exited(self, worker: WorkerProcess) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        self._hand_out()  # to the others, or to the threads when none is left
        if self._stopping:
            return
        self.restarts += 1
        log.error(
            "tokenizer process %s ended (%s); starting a new one",
            worker.pid,
            describe_exit(worker.exit_code),
        )
        task = asyncio.get_running_loop().create_task(self._respawn())
        self._respawning.add(task)
        task.add_done_callback(self._respawning.discard)

    async def _respawn(self) -> None:
        """Start a process in a dead one's place, trying again (at growing intervals) for
        as long as it cannot start: memory short enough to kill one can refuse the next."""
        delay = RESPAWN_DELAY
        while True:
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._spawn()
            except Exception as exc:
                delay = min(2 * delay, RESPAWN_MAX_DELAY)
                log.error(
                    "a new tokenizer process could not start (%s); trying again in %g s",
                    exc,
                    delay,
                )
                continue
            log.info("tokenizer processes whole again (%d)", len(self.workers))
            return

    async def _watch(self) -> None:
        """End a tokenizer process that has had calls waiting and answered none for
        STALL_TIMEOUT (hung: stopped, deadlocked); its calls fail (503, retry) and a new
        process takes its place. A chunk of TOKENIZE_CHUNK texts takes well under a
        second, and a busy process answers one after another however long its queue."""
        limit = self._settings.stall_timeout
        while True:
            await asyncio.sleep(min(WATCH_INTERVAL, limit / 2))
            now = time.monotonic()
            for worker in list(self.workers):
                stalled = worker.stalled_for(now)
                if worker.alive and stalled > limit:
                    log.error(
                        "tokenizer process %s has answered nothing for %.0fs (STALL_TIMEOUT); "
                        "ending it",
                        worker.pid,
                        stalled,
                    )
                    worker.kill()

    def health(self) -> str | None:
        """Why the pool is not whole, for /ready (which still says 200: requests are served)."""
        missing = self.wanted - len(self.workers)
        if missing > 0:
            return f"{missing} of {self.wanted} tokenizer processes are being replaced"
        return None

    # --- tokenizing ----------------------------------------------------------------------
    def chunk_sizes(self, count: int) -> list[int]:
        """How a request of ``count`` texts is cut for tokenizing (``common.chunk_sizes``).

        With the model on a GPU, the first round is one chunk of FIRST_CHUNK texts per
        tokenizer, so the GPU starts after a few texts' tokenizing. On a CPU the model
        shares the cores with the tokenizers: an early start gains nothing there, only
        smaller passes (requests of 512 texts, null shape, 2 cores: 0.91x and 0.97x in
        two A/Bs), so every chunk is TOKENIZE_CHUNK texts.
        """
        if count <= TOKENIZE_CHUNK or not self._on_gpu:
            return chunk_sizes(count)
        return chunk_sizes(count, self.parallel(), FIRST_CHUNK)

    def parallel(self) -> int:
        """How many chunks are tokenized at once: one per live tokenizer process, or per
        thread where there are none (a request's further chunks wait their turn)."""
        return sum(worker.alive for worker in self.workers) or THREADS

    async def encode(self, model: str, texts: Sequence[str]) -> list[Encoded]:
        return await self._run(model, ENCODE, 0, list(texts))

    async def encode_pairs(
        self,
        model: str,
        query: str,
        documents: Sequence[str],
        document_tokens: int | None = None,
    ) -> list[Encoded]:
        return await self._run(model, PAIRS, document_tokens or 0, [query, *documents])

    async def _run(
        self, model: str, operation: int, document_tokens: int, texts: list[str]
    ) -> list[Encoded]:
        target = self._index[model]
        tokenizer = self._tokenizers[target]
        worker = await self._process_for(len(texts)) if self.workers else None
        if worker is None:  # no tokenizer processes: here
            if len(texts) <= INLINE_TEXTS and sum(map(len, texts)) <= INLINE_CHARS:
                return tokenize(tokenizer, operation, document_tokens, texts)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._threads, tokenize, tokenizer, operation, document_tokens, texts
            )
        try:
            answer = worker.call(
                lambda call_id: wire.pack_texts(call_id, target, operation, document_tokens, texts)
            )
        except BaseException:
            self._release(worker, len(texts))
            raise
        worker.waiting[answer] = time.monotonic()
        # The texts count against the process until it answers, even when their request
        # gives up first (shield): it tokenizes them all the same, and a short request
        # sent there would wait behind them.
        answer.add_done_callback(partial(self._answered, worker, len(texts)))
        try:
            result: list[Encoded] = await asyncio.shield(answer)
        except WorkerGone:
            raise ServiceError(
                ErrorKind.NOT_READY,
                "A tokenizer process ended while holding this request; retry it.",
            ) from None
        except CallFailed as exc:
            # The tokenizer raised: a server error, without the exception's text.
            raise RuntimeError(f"the tokenizer raised {exc.error_type}") from None
        return result

    async def _process_for(self, count: int) -> TokenizerProcess | None:
        """The process to send ``count`` texts to, their texts counted against it (None:
        there are no tokenizer processes). The one with the fewest texts to go, so a
        short request goes where the work ahead of it is smallest; when none has room
        (PROCESS_TEXTS), the call waits its turn here."""
        if not self._has_processes():
            return None
        small = count <= FIRST_CHUNK
        line = self._held_small if small else self._held
        if not line and (small or not self._held_small):
            worker = self._room_for(count)
            if worker is not None:
                return worker
        turn: asyncio.Future[TokenizerProcess | None] = asyncio.get_running_loop().create_future()
        line.append((count, turn))
        try:
            return await turn
        except asyncio.CancelledError:
            # Gone while waiting: its texts never leave. Gone just as it was handed a
            # process: that room goes back.
            if turn.done() and not turn.cancelled() and (handed := turn.result()) is not None:
                self._release(handed, count)
            raise

    def _has_processes(self) -> bool:
        return any(worker.alive for worker in self.workers)

    def _room_for(self, count: int) -> TokenizerProcess | None:
        """The live process with the fewest texts to go, if it has room for ``count``
        more (then counted against it)."""
        live = [worker for worker in self.workers if worker.alive]
        if not live:
            return None
        worker = min(live, key=lambda w: w.texts)
        if worker.texts and worker.texts + count > PROCESS_TEXTS:
            return None
        worker.texts += count
        return worker

    def _answered(self, worker: TokenizerProcess, count: int, answer: asyncio.Future[Any]) -> None:
        worker.waiting.pop(answer, None)
        worker.answered = time.monotonic()
        if not answer.cancelled():
            answer.exception()  # seen, also when its request had gone: no "never retrieved"
        self._release(worker, count)

    def _release(self, worker: TokenizerProcess, count: int) -> None:
        worker.texts -= count
        self._hand_out()

    def _hand_out(self) -> None:
        """Give the calls waiting their turn a process, in order, while one has room (or
        send them to the threads, when no process is left)."""
        for held in (self._held_small, self._held):
            while held:
                count, turn = held[0]
                if not turn.done():  # else its request went away
                    worker = self._room_for(count)
                    if worker is None and self._has_processes():
                        return
                    turn.set_result(worker)
                held.popleft()

    async def stop(self) -> None:
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        for task in list(self._respawning):
            task.cancel()
        for worker in self.workers:
            if worker.waiting:  # the drain is over: nobody waits for these answers now
                worker.kill()
        await asyncio.gather(*(worker.stop() for worker in self.workers), return_exceptions=True)
        self.workers.clear()
        self._threads.shutdown(wait=False, cancel_futures=True)
