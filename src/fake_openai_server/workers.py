"""Worker processes seen from the server: start one, call it, learn when it has gone.

The server runs its models in an engine process and, where cores allow, tokenizes in
tokenizer processes. Both are started the same way: ``python -m MODULE FD``, where FD
is this process's end of a Unix socket pair; the server sends a CONFIG frame, the
worker answers READY (or FAILED if it cannot start), then answers each CALL frame with
a result or FAILED (``wire.py``).

Every call gets a future; the worker ending (crash, SIGKILL, a broken thread) fails
every future still open with :class:`WorkerGone` and calls ``on_exit``. Nothing here
blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, cast

from fake_openai_server import wire

log = logging.getLogger(__name__)

T = TypeVar("T")

STOP_TIMEOUT = 10.0  # after STOP, seconds before a worker is killed


class WorkerGone(Exception):
    """The worker process ended before answering."""


class StartFailed(Exception):
    """The worker process could not start (the message says why); ``setting``: because of
    a setting (exit status 2, as for the settings the server checks itself)."""

    def __init__(self, message: str, setting: bool = False) -> None:
        super().__init__(message)
        self.setting = setting


class CallFailed(Exception):
    """The worker raised on a call; ``error_type`` is the exception's type name (never its
    message, which may quote the input)."""

    def __init__(self, error_type: str, oom: bool = False) -> None:
        super().__init__(error_type)
        self.error_type = error_type
        self.oom = oom


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _own_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
    """``function(*args, **kwargs)`` on a thread of its own, not asyncio's shared pool.

    Starting, reaping and stopping workers must not queue behind slow work in that pool
    (TEI's /tokenize, token ids): a crashed engine would go unnoticed, and its requests
    unanswered, until the pool had a thread free.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(cast(T, outcome))

    def run() -> None:
        try:
            outcome, error = function(*args, **kwargs), None
        except BaseException as exc:  # handed to the awaiting task
            outcome, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle, outcome, error)

    threading.Thread(target=run, name=f"worker-{function.__name__}", daemon=True).start()
    return future


def _child_env() -> dict[str, str]:
    """This environment, with this process's import path, so the worker runs the same code."""
    env = dict(os.environ)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class WorkerProcess:
    """One worker process. Subclasses name the module and decode its answers."""

    module = ""
    # Defaults for this kind of worker's environment (the server's own environment wins).
    environment: ClassVar[dict[str, str]] = {}

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config
        self._process: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._outbox: list[tuple[int, bytes]] = []  # frames to send at the end of this turn
        self._ids = itertools.count()
        self.exit_code: int | None = None
        self._ended = False  # its socket has closed: it is gone, if not yet reaped
        self.on_exit: Callable[[WorkerProcess], None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._writer is not None and not self._writer.is_closing() and not self._ended

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    async def start(self) -> dict[str, Any]:
        """Start the process; return its READY answer once it is ready."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-m", self.module, str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env={**self.environment, **_child_env()},
            )

        # fork + exec off the event loop: a large process takes a while to fork.
        spawning = _own_thread(spawn)
        try:
            self._process = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            # Stopped while forking (shutdown during a restart): the fork goes on in its
            # thread. Wait for it (the child's socket must stay open until then) and end
            # what it started, or it would outlive the server.
            with contextlib.suppress(Exception):
                orphan = await spawning
                orphan.kill()
                await _own_thread(orphan.wait)
            parent.close()
            raise
        finally:
            child.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=parent)
        self._writer.write(wire.json_frame(wire.Kind.CONFIG, self._config))
        try:
            kind, body = await wire.read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            code = await self._reap()
            raise WorkerGone(
                f"{self.module} ended while starting ({describe_exit(code)})"
            ) from None
        except asyncio.CancelledError:
            # Given up while it loads (shutdown during start-up, a restart past its
            # time): end it now, not when this process exits (which an app hosted in a
            # process that goes on never does).
            self.kill()
            with contextlib.suppress(Exception):
                await self._reap()
            raise
        if kind == wire.Kind.FAILED:
            await self._reap()
            failure = json.loads(body)
            raise StartFailed(
                str(failure.get("error", "unknown error")), bool(failure.get("setting"))
            )
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read(reader), name=f"read-{self.module}"
        )
        ready: dict[str, Any] = json.loads(body)
        return ready

    def call(self, pack: Callable[[int], bytes]) -> asyncio.Future[Any]:
        """Send the frame ``pack(call_id)``; the future gets the worker's answer.

        The frames of one turn of the event loop go out in one write (one system call
        for the calls of many requests that arrived together), or sooner by ``flush``.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self.alive or self._writer is None:
            future.set_exception(WorkerGone(f"{self.module} is not running"))
            return future
        call_id = next(self._ids)
        self._calls[call_id] = future
        self._outbox.append((call_id, pack(call_id)))
        if len(self._outbox) == 1:
            future.get_loop().call_soon(self.flush)
        return future

    def flush(self) -> None:
        """Write the calls made so far now, not at the end of this turn (``call``)."""
        sent, self._outbox = self._outbox, []
        if not sent:
            return  # stop() sent them already
        if self._writer is not None:
            try:
                self._writer.writelines([frame for _, frame in sent])
                return
            except (OSError, RuntimeError):
                pass  # the socket closed under us (the reader will know)
        for call_id, _ in sent:
            self._resolve(call_id, error=WorkerGone(f"{self.module} is not running"))

    def decode(self, kind: int, body: bytes) -> tuple[int, Any]:
        """(call id, result) of one answer frame."""
        raise NotImplementedError

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                kind, body = await wire.read_frame(reader)
                if kind == wire.Kind.FAILED:
                    call_id, error = wire.unpack_failed(body)
                    failure = CallFailed(str(error.get("type")), bool(error.get("oom")))
                    self._resolve(call_id, error=failure)
                else:
                    call_id, result = self.decode(kind, body)
                    self._resolve(call_id, result=result)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            return
        except Exception:
            # An answer it cannot read: end the process, or its callers would wait forever.
            log.exception("%s sent an answer that could not be read; ending it", self.module)
            self.kill()
        await self._gone()

    def _resolve(
        self, call_id: int, result: Any = None, error: BaseException | None = None
    ) -> None:
        future = self._calls.pop(call_id, None)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    async def _gone(self) -> None:
        self._ended = True
        code = await self._reap()
        error = WorkerGone(f"{self.module} ended ({describe_exit(code)})")
        calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(error)
        if self.on_exit is not None:
            self.on_exit(self)

    async def _reap(self) -> int | None:
        if self._writer is not None:
            self._writer.close()
        if self._process is None:
            return None
        code = await _own_thread(self._process.wait)
        self.exit_code = code
        return code

    def kill(self) -> None:
        """End the process at once; the reader then reports it gone."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    async def stop(self) -> None:
        """Let the process finish what it was sent, then end it; kill it after STOP_TIMEOUT."""
        if self._process is None:
            return
        self.on_exit = None
        if self._outbox:
            self.flush()  # what it was sent goes before STOP
        if self.alive and self._writer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.write(wire.frame(wire.Kind.STOP))
        try:
            await asyncio.wait_for(_own_thread(self._process.wait), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("%s did not stop in %.0fs; killing it", self.module, STOP_TIMEOUT)
            self._process.kill()
            await _own_thread(self._process.wait)
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        else:
            await self._gone()
