"""The load generator's HTTP client: as cheap per request as Python allows.

At a thousand requests a second on a 2-core machine the client shares the cores
with the server, so every microsecond it spends is one the server does not get.
This client keeps one HTTP/1.1 keep-alive connection per simulated user, sends
requests that were encoded to bytes before the clock started, reads the reply
by its ``content-length`` (chunked replies are read too) and leaves the body
undecoded: the scenarios decode and check bodies after the timer stops. It runs
on uvloop when that is installed (the report names the loop).

Only the standard library: it runs wherever the server runs (the GPU machine
has no package registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop where installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


class HTTPError(RuntimeError):
    pass


def encode_request(
    base_url: str,
    method: str,
    path: str,
    body: bytes = b"",
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> bytes:
    """One HTTP/1.1 request as bytes, ready to be written as many times as wanted."""
    host = urlsplit(base_url).netloc
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
    if body or method in ("POST", "PUT"):
        lines += [f"content-type: {content_type}", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Connection:
    """One keep-alive connection; one request at a time on it."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.reconnects = 0

    async def connect(self) -> None:
        await self._open()

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port, limit=1 << 20
            )
        return self._reader, self._writer

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send ``raw`` (from :func:`encode_request`); the status and the undecoded body."""
        reader, writer = await self._open()
        writer.write(raw)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            # The server closed the idle connection: one retry on a fresh one.
            await self.close()
            self.reconnects += 1
            reader, writer = await self._open()
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = -1
        chunked = close = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        if chunked:
            body = await self._chunked(reader)
        elif length >= 0:
            body = await reader.readexactly(length)
        else:  # no length: the body runs to the end of the connection
            body = await reader.read()
            close = True
        if close:
            await self.close()
        return status, body

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers from uvicorn
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None


async def open_connections(base_url: str, n: int) -> list[Connection]:
    """``n`` connections, opened before a measurement starts."""
    connections = [Connection(base_url) for _ in range(n)]
    await asyncio.gather(*(c.connect() for c in connections))
    return connections


async def close_all(connections: list[Connection]) -> None:
    await asyncio.gather(*(c.close() for c in connections))


async def run_users(
    connections: list[Connection], requests: list[bytes]
) -> tuple[list[bytes], list[float]]:
    """``requests`` spread over the connections, each user sending its next when answered.

    Returns the bodies and latencies (seconds) in the order of ``requests``; raises
    on any status other than 200 (after every user has stopped).
    """
    bodies: list[bytes] = [b""] * len(requests)
    latencies = [0.0] * len(requests)
    next_index = 0
    failures: list[str] = []

    async def user(connection: Connection) -> None:
        nonlocal next_index
        while next_index < len(requests) and not failures:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            status, body = await connection.request(requests[index])
            latencies[index] = time.perf_counter() - started
            if status != 200:
                failures.append(f"{status} {body[:300]!r}")
            bodies[index] = body

    await asyncio.gather(*(user(c) for c in connections[: max(1, len(requests))]))
    if failures:
        raise HTTPError(f"{len(failures)} request(s) failed, first: {failures[0]}")
    return bodies, latencies
