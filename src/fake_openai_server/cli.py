"""Entry point: settings → the app for SERVICE_TYPE → uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Generator
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError

from fake_openai_server import logs, memory
from fake_openai_server.backends.base import Plugin
from fake_openai_server.settings import (
    Settings,
    SettingsError,
    hub_variable_errors,
    near_misses,
)

log = logging.getLogger("fake_openai_server")


def settings_error_lines(error: ValidationError) -> list[str]:
    """One line per bad setting, naming it as its environment variable."""
    lines = []
    for item in error.errors():
        name = "_".join(str(part) for part in item["loc"]).upper()
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "literal_error":
            message = f"{message} (got {item.get('input')!r})"
        lines.append(f"{name}: {message}" if name else message)
    return lines


def load_settings(argv: list[str] | None) -> Settings:
    try:
        settings = Settings(_cli_parse_args=argv if argv is not None else sys.argv[1:])
    except ValidationError as error:
        lines = settings_error_lines(error)
    else:
        lines = []
    lines += hub_variable_errors(os.environ)
    for line in lines:
        print(f"fake-openai-server: invalid setting: {line}", file=sys.stderr)
    if lines:
        raise SystemExit(2)
    return settings


# What uvicorn logs, at ERROR, when SHUTDOWN_GRACE_SECONDS are up: with the number of
# requests it then cancels.
CANCEL_MESSAGE = "Cancel %s running task(s), timeout graceful shutdown exceeded"


class _NothingCancelled(logging.Filter):
    """uvicorn's "Cancel 0 running task(s)" is no error: no request was cancelled. It came
    on every shutdown with SHUTDOWN_GRACE_SECONDS=0 (uvicorn's wait of 0 s ends before it
    has looked), an idle one included, and when all that was left were replies their
    clients had not taken. The first is dropped; the second says so, as a warning."""

    def __init__(self, server: uvicorn.Server) -> None:
        super().__init__()
        self.server = server

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != CANCEL_MESSAGE or record.args != (0,):
            return True
        left = len(self.server.server_state.connections)
        if not left:
            return False
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        record.msg = (
            "SHUTDOWN_GRACE_SECONDS are up: closing %d connection(s) whose client had not "
            "taken all of its reply"
        )
        record.args = (left,)
        return True


class Server(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM which ended in a clean drain exits 0.

    On SIGTERM uvicorn stops accepting connections, lets in-flight requests finish
    (up to SHUTDOWN_GRACE_SECONDS), then raises the signal again so that the process
    dies of it (exit status 143): orchestrators count that as a failure. Here the
    signal is not raised again; a SIGINT (Ctrl-C) still is.

    Shortly before SHUTDOWN_GRACE_SECONDS are up, ``on_grace_over`` answers the requests
    still waiting (503, "shutting down"): uvicorn cancels what is left at the end, and a
    cancelled request gets its bare text 500 and a traceback in the log. A drain that
    cancels nothing logs no error (``_NothingCancelled``).
    """

    on_grace_over: Callable[[], None] | None = None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        grace = self.config.timeout_graceful_shutdown
        timer = None
        if grace is not None and self.on_grace_over is not None:
            # 1 s before the end (a tenth of a short grace): time enough to reply.
            timer = asyncio.get_running_loop().call_later(
                max(grace - 1.0, grace * 0.9), self.on_grace_over
            )
        uvicorn_log = logging.getLogger("uvicorn.error")
        nothing_cancelled = _NothingCancelled(self)
        uvicorn_log.addFilter(nothing_cancelled)
        try:
            await super().shutdown(sockets)
        finally:
            uvicorn_log.removeFilter(nothing_cancelled)
            if timer is not None:
                timer.cancel()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        received: list[int] = []

        def handle(sig: int, frame: FrameType | None) -> None:
            received.append(sig)
            self.handle_exit(sig, frame)

        signals = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, handle) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
        if signal.SIGINT in received:
            signal.raise_signal(signal.SIGINT)


def main(argv: list[str] | None = None) -> None:
    settings = load_settings(argv)
    try:
        keys = settings.all_api_keys()
    except SettingsError as error:
        print(f"fake-openai-server: invalid setting: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    logs.configure(settings.log_level, settings.log_json)
    for variable, setting in near_misses(os.environ):
        log.warning("%s is not a setting and is ignored: did you mean %s?", variable, setting)
    if keys:
        log.info(
            "API keys: %d; every route but /health, /ready, /ping and OPTIONS needs one", len(keys)
        )
    elif settings.api_keys_file is not None:
        # Allowed (Kubernetes' base ships the file empty), but a file not filled yet looks
        # just like one meant empty.
        log.warning(
            "API keys: none in API_KEYS_FILE=%s (blank lines and comments only); every "
            "route is open to whoever reaches the port",
            settings.api_keys_file,
        )
    else:
        log.info("API keys: none; every route is open to whoever reaches the port")
    for alias, model in settings.aliases_for_nothing().items():
        log.warning(
            "MODEL_ALIASES: %s=%s names no model served here (%s); the alias is ignored",
            alias,
            model,
            ", ".join(settings.served_models()),
        )
    if origins := settings.cors_allow_origins:
        named = "any origin" if "*" in origins else ", ".join(origins)
        log.info("CORS: browser pages from %s may call the API", named)
    serve(settings)


def serve(settings: Settings, plugin: Plugin | None = None) -> None:
    """Serve until SIGTERM/SIGINT; exit non-zero if the models could not be (re)started."""
    from fake_openai_server.api.app import build_app
    from fake_openai_server.runtime import Runtime

    runtime = Runtime(settings, plugin)
    # This process serves and nothing else: tune its garbage collector once it is ready
    # (an app built in someone else's process, e.g. tests', leaves theirs alone).
    runtime.on_ready = memory.settle_after_start
    server: Server | None = None

    def stop_on_failure() -> None:
        if server is not None:
            server.should_exit = True

    app = build_app(settings, runtime=runtime, on_failure=stop_on_failure)
    config = uvicorn_config(app, settings)
    server = Server(config)
    server.on_grace_over = runtime.refuse_waiting
    log.info(
        "starting %s service on %s:%d",
        settings.service_type,
        settings.host,
        settings.effective_port,
    )
    try:
        server.run()
    except SystemExit:
        if not server.started and not server.lifespan.should_exit:
            # The app started and the socket could not be opened: uvicorn's line above
            # says why ("address already in use", "Name or service not known").
            print(
                f"fake-openai-server: could not listen on {settings.host}:"
                f"{settings.effective_port} (the error above): another program may hold "
                "the port (PORT), or HOST is no address of this machine",
                file=sys.stderr,
            )
        raise
    # Not runtime.state: the lifespan's shutdown has moved it on to "stopping" by now.
    failure = runtime.failure
    if failure is not None and runtime.misconfigured:
        print(f"fake-openai-server: invalid setting: {failure}", file=sys.stderr)
        raise SystemExit(2)
    if failure is not None:
        reason = failure.splitlines()[0] if failure.strip() else failure
        what = "serve" if runtime.engine.restarts else "load"
        print(
            f"fake-openai-server: could not {what} {configured_models(settings)}: {reason}",
            file=sys.stderr,
        )
        raise SystemExit(1)


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """How uvicorn serves the ASGI ``app`` for ``settings`` (the tests' in-process servers
    too, with their own host, port and log level as ``overrides``)."""
    from fake_openai_server.api.connections import http_protocol

    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.effective_port,
        "log_config": None,
        "access_log": False,
        # 0 means no grace (int(0.5) or None used to mean "wait forever").
        "timeout_graceful_shutdown": math.ceil(settings.shutdown_grace_seconds),
        # uvicorn's 5 s equals httpx's own idle limit (the openai SDK, Dify): a request
        # sent on a connection just as the server closed it failed with a reset.
        "timeout_keep_alive": math.ceil(settings.keep_alive_seconds),
        "http": http_protocol(settings.read_timeout_seconds),
        # No route speaks WebSocket: a handshake is answered as any other request (a JSON
        # 404 or 405), not with uvicorn's empty 403 and two log lines quoting its URL.
        "ws": "none",
        "server_header": False,
    }
    return uvicorn.Config(app, **{**options, **overrides})


def configured_models(settings: Settings) -> str:
    """The model settings in force, as the user wrote them (for error messages)."""
    parts = []
    if settings.serves_embeddings:
        parts.append(f"EMBEDDINGS_MODEL={','.join(settings.embeddings_model)}")
    if settings.serves_rerank:
        parts.append(f"RERANKER_MODEL={settings.reranker_model}")
    return " and ".join(parts)
