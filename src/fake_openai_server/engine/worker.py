"""The engine process: the models and the device, alone with a GIL of their own.

``python -m fake_openai_server.engine.worker FD`` is started by the server
(``engine/process.py``) with one end of a Unix socket pair as file descriptor FD.
The server sends the settings, this process loads the models, warms them up, measures
what a forward pass costs and answers READY; from then on it runs the batches it is
sent, in order, and answers each with its rows or with the type of its failure.

Three threads keep the device busy: the main thread reads batches, the *launcher* pads
each batch and queues its kernels, the *collector* waits for a launched batch and sends
its rows back. On a GPU the launcher queues batch N+1 while batch N still runs, so the
device never waits for Python. The server sends at most ``PIPELINE_DEPTH`` (2) batches
before one is answered, so at most two are launched and not yet collected; the launcher
itself would launch one more than ``IN_FLIGHT`` (the one the collector waits for,
``IN_FLIGHT - 1`` queued, and one whose queueing blocks). A broken thread ends the
process (the server sees the socket close and starts a new one); so does the server
going away.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fake_openai_server import logs, wire
from fake_openai_server.backends.base import IdArray, LoadError, Model, Pending
from fake_openai_server.settings import Settings, SettingsError

log = logging.getLogger(__name__)

IN_FLIGHT = 2  # batches launched and not collected before the launcher waits (see above)
EXIT_BROKEN = 70  # a thread of this process failed: the server restarts it


@dataclass(frozen=True)
class PassCost:
    """What a forward pass costs: a fixed part and a part per padded token (seconds).

    Measured at start-up; the server turns it into how much padding a batch may carry
    (``pass_seconds / token_seconds`` tokens cost as much as one more pass).
    """

    pass_seconds: float = 0.0
    token_seconds: float = 0.0


def _timed(model: Model, batch: Sequence[IdArray]) -> float:
    started = time.perf_counter()
    model.launch(batch).result()
    return time.perf_counter() - started


def calibrate(model: Model, max_batch_size: int, max_batch_tokens: int) -> PassCost:
    """Warm the model up with the shapes traffic brings, and measure the cost of a pass.

    After a first pass of each shape (the slow one: kernels get chosen and memory
    allocated) and, where the model does so, a CUDA graph of each captured, a pass of
    16 tokens is mostly fixed cost; then batches double until a pass takes three times
    as long (the per-token cost dominates) or the batch budget is reached. The best of
    a few runs is taken: other work only ever slows a pass.
    """
    fill = min(100, max(model.info.vocab_size - 1, 1))
    length = min(256, model.info.max_length)

    def batch(rows: int, tokens: int) -> list[IdArray]:
        return [np.full(tokens, fill, dtype=np.int32)] * rows

    small = min(16, length)
    # Every shape the model pads batches to, where it does (CUDA): largest first, so
    # that memory is reserved once for the biggest batch.
    warm_shapes = getattr(model, "warm_shapes", None)
    shapes = warm_shapes(max_batch_size, max_batch_tokens) if warm_shapes else []
    started = time.perf_counter()
    for shape in [*shapes, (1, small), (8, length), (1, model.info.max_length)]:
        _timed(model, batch(*shape))
    capture = getattr(model, "capture", None)
    graphs = capture(shapes) if capture else 0
    if shapes:
        log.info(
            "%s: warmed up %d batch shapes (%d captured as CUDA graphs) in %.1fs",
            model.info.name,
            len(shapes),
            graphs,
            time.perf_counter() - started,
        )
    t_small = min(_timed(model, batch(1, small)) for _ in range(3))
    tokens = 512
    while True:
        rows = max(1, tokens // length)
        t_big = min(_timed(model, batch(rows, length)) for _ in range(2))
        if t_big >= 3 * t_small or 2 * rows * length > max_batch_tokens:
            break
        tokens *= 2
    per_token = max(t_big - t_small, 0.0) / max(rows * length - small, 1)
    fixed = max(t_small - small * per_token, 0.0)
    return PassCost(pass_seconds=fixed, token_seconds=per_token)


def _failure(exc: BaseException) -> dict[str, Any]:
    """What the server learns of a failure: its type, never its message (it may quote input)."""
    return {"type": type(exc).__name__, "oom": "OutOfMemory" in type(exc).__name__}


class _BatchRunner:
    """Runs the batches the server sends, on the three threads described above, until
    the server says STOP (or goes away: then the process exits at once)."""

    def __init__(self, sock: socket.socket, models: list[Model]) -> None:
        self.sock = sock
        self.models = models
        self._send_lock = threading.Lock()
        self._inbox: queue.Queue[tuple[int, int, list[IdArray]] | None] = queue.Queue()
        self._launched: queue.Queue[tuple[int, Pending, float] | None] = queue.Queue(
            maxsize=IN_FLIGHT - 1
        )

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def serve(self) -> None:
        collector = _thread("collector", self._collect)
        _thread("launcher", self._launch)
        while True:
            message = wire.recv_frame(self.sock)
            if message is None:
                log.info("the server has gone; exiting")
                os._exit(0)
            kind, body = message
            if kind == wire.Kind.CALL:
                self._inbox.put(wire.unpack_sequences(body))
            elif kind == wire.Kind.STOP:
                self._inbox.put(None)
                break
        collector.join()

    def _launch(self) -> None:
        while (call := self._inbox.get()) is not None:
            call_id, target, rows = call
            started = time.perf_counter()
            try:
                pending = self.models[target].launch(rows)
            except Exception as exc:
                log.exception("a batch of %d items failed", len(rows))
                self.send(wire.pack_failed(call_id, _failure(exc)))
                continue
            self._launched.put((call_id, pending, started))
        self._launched.put(None)

    def _collect(self) -> None:
        last_finish = 0.0
        while (launched := self._launched.get()) is not None:
            call_id, pending, started = launched
            try:
                rows = pending.result()
            except Exception as exc:
                log.exception("a batch failed")
                self.send(wire.pack_failed(call_id, _failure(exc)))
                continue
            finish = time.perf_counter()
            # Device time of this batch alone: it may have been queued behind the last one.
            seconds = finish - max(started, last_finish)
            graph = bool(getattr(pending, "graph", False))  # a plugin's may not say
            self.send(wire.pack_done(call_id, rows, seconds, graph))
            last_finish = finish


def _thread(name: str, target: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        try:
            target()
        except BaseException:
            log.critical("engine thread %s failed; exiting", name, exc_info=True)
            os._exit(EXIT_BROKEN)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def start(sock: socket.socket) -> list[Model]:
    """Read the configuration, load and warm the models, answer READY (or FAILED)."""
    message = wire.recv_frame(sock)
    if message is None or message[0] != wire.Kind.CONFIG:
        raise SystemExit("engine: no configuration from the server")
    config = json.loads(message[1])
    settings = Settings(**config["settings"])
    logs.configure(settings.log_level, settings.log_json)
    plugin = importlib.import_module(config["plugin"])
    options: dict[str, Any] = config["options"]
    try:
        models: list[Model] = plugin.load_models(settings, options)
        costs = [
            calibrate(model, settings.max_batch_size, settings.max_batch_tokens)
            if settings.warmup
            else PassCost()
            for model in models
        ]
        for index, model in enumerate(models):
            folder = Path(config["workdir"]) / str(index)
            folder.mkdir(parents=True, exist_ok=True)
            model.export_tokenizer(str(folder))
            model.info = replace(model.info, tokenizer_dir=str(folder))
    except Exception as exc:
        setting = isinstance(exc, SettingsError)  # a setting the loaded model contradicts
        plain = setting or isinstance(exc, LoadError)
        error = str(exc) if plain else f"{type(exc).__name__}: {exc}"
        # The server logs it (and the command's last line says it again): not here too.
        sock.sendall(wire.json_frame(wire.Kind.FAILED, {"error": error, "setting": setting}))
        raise SystemExit(1) from None
    ready = {
        "models": [model.info.as_dict() for model in models],
        "costs": [asdict(cost) for cost in costs],
        "pid": os.getpid(),
    }
    sock.sendall(wire.json_frame(wire.Kind.READY, ready))
    return models


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    # The server decides when this process stops (after its own drain): a Ctrl-C or a
    # SIGTERM sent to the whole process group must not cut the batches short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(args[0]))
    models = start(sock)
    _BatchRunner(sock, models).serve()


if __name__ == "__main__":
    main()
