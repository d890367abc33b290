"""The server's side of one engine process (``engine/worker.py``): start it, send it
batches, collect their rows, and learn when it has gone.

Every batch sent gets a future; the process answering DONE or FAILED resolves it, and
the process ending (crash, SIGKILL, a broken thread) fails every future still open with
:class:`EngineGone` and calls ``on_exit``. Nothing here blocks the event loop.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fake_openai_server.backends.base import FloatArray, IdArray, ModelInfo
from fake_openai_server.engine import wire
from fake_openai_server.engine.worker import PassCost
from fake_openai_server.settings import Settings

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0  # after STOP, seconds before the process is killed


class EngineGone(Exception):
    """The engine process ended before answering."""


class LoadFailed(Exception):
    """The engine process could not load the models (the message says why)."""


class BatchFailed(Exception):
    """The model raised on a batch; ``error_type`` is the exception's type name."""

    def __init__(self, error_type: str, oom: bool) -> None:
        super().__init__(error_type)
        self.error_type = error_type
        self.oom = oom


@dataclass(frozen=True)
class Loaded:
    models: list[ModelInfo]
    costs: list[PassCost]
    pid: int


@dataclass(frozen=True)
class Plugin:
    """The backend plugin the engine loads (``backends/base.py``) and its options."""

    module: str = "fake_openai_server.backends.loader"
    options: dict[str, Any] | None = None


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _child_env() -> dict[str, str]:
    """This environment, with this process's import path, so the engine imports the same code."""
    env = dict(os.environ)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class EngineProcess:
    def __init__(self, settings: Settings, plugin: Plugin, workdir: str) -> None:
        self._settings = settings
        self._plugin = plugin
        self._workdir = workdir
        self._process: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._calls: dict[int, asyncio.Future[tuple[FloatArray, float]]] = {}
        self._ids = itertools.count()
        self.exit_code: int | None = None
        self.on_exit: Callable[[EngineProcess], None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        return self._writer is not None and self.exit_code is None

    async def start(self) -> Loaded:
        """Start the process and wait until its models are loaded and warm."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # fork + exec off the event loop: a large process takes a while to fork.
            self._process = await asyncio.to_thread(
                subprocess.Popen,
                [sys.executable, "-m", "fake_openai_server.engine.worker", str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env=_child_env(),
            )
        finally:
            child.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=parent)
        config = {
            # The keys stay in this process: the engine has no use for them.
            "settings": self._settings.model_dump(
                mode="json", exclude={"api_keys", "api_keys_file"}
            ),
            "plugin": self._plugin.module,
            "options": self._plugin.options or {},
            "workdir": self._workdir,
        }
        self._writer.write(wire.json_frame(wire.Kind.CONFIG, config))
        try:
            kind, body = await wire.read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            code = await self._reap()
            raise EngineGone(
                f"the engine process ended while loading ({describe_exit(code)})"
            ) from None
        if kind == wire.Kind.FAILED:
            await self._reap()
            raise LoadFailed(str(json.loads(body).get("error", "unknown error")))
        ready = json.loads(body)
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read(reader), name="engine-reader"
        )
        return Loaded(
            models=[ModelInfo(**info) for info in ready["models"]],
            costs=[PassCost(**cost) for cost in ready["costs"]],
            pid=int(ready["pid"]),
        )

    def run(self, target: int, rows: Sequence[IdArray]) -> asyncio.Future[tuple[FloatArray, float]]:
        """Send one batch for model ``target``; the future gets (rows, seconds of device time)."""
        future: asyncio.Future[tuple[FloatArray, float]] = (
            asyncio.get_running_loop().create_future()
        )
        if not self.alive or self._writer is None:
            future.set_exception(EngineGone("the engine process is not running"))
            return future
        call_id = next(self._ids)
        self._calls[call_id] = future
        self._writer.write(wire.pack_sequences(call_id, target, rows))
        return future

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                kind, body = await wire.read_frame(reader)
                if kind == wire.Kind.DONE:
                    call_id, out, seconds = wire.unpack_done(body)
                    self._resolve(call_id, result=(out, seconds))
                elif kind == wire.Kind.FAILED:
                    call_id, error = wire.unpack_failed(body)
                    failure = BatchFailed(str(error.get("type")), bool(error.get("oom")))
                    self._resolve(call_id, error=failure)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            return
        await self._gone()

    def _resolve(
        self,
        call_id: int,
        result: tuple[FloatArray, float] | None = None,
        error: BaseException | None = None,
    ) -> None:
        future = self._calls.pop(call_id, None)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    async def _gone(self) -> None:
        code = await self._reap()
        error = EngineGone(f"the engine process ended ({describe_exit(code)})")
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
        process = self._process
        code = await asyncio.to_thread(process.wait)
        self.exit_code = code
        return code

    def kill(self) -> None:
        """End the process at once (a hung device); the reader then reports it gone."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    async def stop(self) -> None:
        """Let the process finish what it was sent, then end it; kill it after STOP_TIMEOUT."""
        if self._process is None:
            return
        self.on_exit = None
        if self.alive and self._writer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.write(wire.frame(wire.Kind.STOP))
        try:
            await asyncio.wait_for(asyncio.to_thread(self._process.wait), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("the engine process did not stop in %.0fs; killing it", STOP_TIMEOUT)
            self._process.kill()
            await asyncio.to_thread(self._process.wait)
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        else:
            await self._gone()
