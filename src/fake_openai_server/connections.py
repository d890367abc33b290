"""The one deadline uvicorn does not keep: a request must arrive within READ_TIMEOUT_SECONDS.

uvicorn closes a keep-alive connection left idle between requests (KEEP_ALIVE_SECONDS)
and nothing else (its issue #157). A connection that opens and sends nothing, stops
half-way through its headers, or sends less body than its Content-Length stays open for
good: a client that died behind a NAT without closing, or a Slowloris scan, holds a
socket (and its half-read body) until the process runs out of them.

Here a request, headers and body, must be in within ``read_timeout`` seconds of its first
byte (for a new connection: of its opening), or the connection is closed. Nothing is
answered: a client that slow would not read it. A request cut off inside its body reaches
its route as a client that left (499). Time in which the server itself had stopped reading
(a pipelined request waiting for the one before it, or a body read faster than the app
takes it) is not the client's: a check that finds reading paused starts the clock again.

Checking costs a timestamp per request: one timer per connection looks at it, every
``read_timeout`` seconds at most.
"""

from __future__ import annotations

import asyncio
import logging
import math

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


def with_read_deadline(read_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools, what it picks itself), closing a connection whose
    request has not arrived ``read_timeout`` seconds after it began."""
    return type(
        "ReadDeadlineProtocol",
        (ReadDeadline,),
        {"read_timeout": read_timeout, "closed": SlowClosures(read_timeout)},
    )


class SlowClosures:
    """Logs the connections closed for being slow: the first at once, then at most one line
    a minute with the count since the last (a Slowloris scan opens thousands)."""

    EVERY = 60.0

    def __init__(self, read_timeout: float) -> None:
        self.read_timeout = read_timeout
        self.unreported = 0
        self.reported_at = -math.inf

    def count(self, now: float) -> None:
        self.unreported += 1
        if now - self.reported_at < self.EVERY:
            return
        log.warning(
            "closed %d connection(s) whose request had not arrived in full within "
            "READ_TIMEOUT_SECONDS=%g",
            self.unreported,
            self.read_timeout,
        )
        self.unreported, self.reported_at = 0, now


class ReadDeadline(HttpToolsProtocol):
    read_timeout: float
    closed: SlowClosures

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # When the request now arriving began; None between requests (keep-alive's time).
        self.receiving_since: float | None = self.loop.time()
        self.check = self.loop.call_later(self.read_timeout, self.check_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self.check.cancel()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        if self.receiving_since is None:
            self.receiving_since = self.loop.time()
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self.receiving_since = None
        super().on_message_complete()

    def check_deadline(self) -> None:
        if self.transport.is_closing():
            return
        now = self.loop.time()
        since = self.receiving_since
        if since is not None and self.flow.read_paused:
            since = self.receiving_since = now  # the server's wait, not the client's
        if since is not None and now - since >= self.read_timeout:
            self.closed.count(now)
            self.transport.close()
            return
        due = (now if since is None else since) + self.read_timeout
        self.check = self.loop.call_at(due, self.check_deadline)
