"""What uvicorn does for each connection, made this server's: a deadline for receiving a
request and for the client to take its reply (READ_TIMEOUT_SECONDS), and the error
envelope for bytes that are not HTTP.

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

The other way round, a client that stops reading its reply (a frozen process, a paused
container) left the reply in the server's memory and the connection open for as long as
its TCP stack acknowledged the window probes: for good. A connection whose reply has not
moved for ``read_timeout`` seconds is now aborted: what is left of it, in asyncio's buffer
and (on Linux) in the kernel's send queue, has not shrunk by a byte. A client that reads
slowly, however slowly, is not cut.

Checking costs a timestamp per request: one timer per connection looks at it, every
``read_timeout`` seconds at most.

Bytes uvicorn's parser refuses (an unknown method, a bad header, a Content-Length that
contradicts itself) were answered ``400 Invalid HTTP request received.`` in plain text,
before any route, with a WARNING line each (a scanner speaking TLS to the plain port wrote
one per connection); the reply is now the error envelope every other 400 has, and the log
gives the first at once and then a count at most once a minute. A request whose line and
headers pass HEAD_LIMIT is answered 431 the same way (uvicorn had no bound).

A request that offers to switch to another protocol (``Connection: Upgrade`` with
``Upgrade: h2c``: Java's HttpClient and Spring's RestClient, JetBrains' Ktor and
``curl --http2`` send it on plain http) lost its body: httptools stops at the end of
the headers and treats what follows as the new protocol's, and uvicorn, declining the
switch, served the request with an empty body (a 400 "must be a JSON object"), or read
a body sent later as a request of its own (uvicorn's issue #2722). HTTP lets a server
ignore the offer and answer in HTTP/1.1; here the rest of the request is read as
HTTP/1.1, without the offer, into the request already begun.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
from collections.abc import Callable

import httptools
import orjson
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from fake_openai_server.api.errors import error_body
from fake_openai_server.errors import ErrorKind, ServiceError

log = logging.getLogger(__name__)

try:
    import fcntl
    import termios

    _TIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # not POSIX
    _TIOCOUTQ = None


# The scope key under which each request's cycle is found (``RequestLog`` takes it out,
# and reads whether its client went away before the reply was out: uvicorn drops such a
# reply silently).
CYCLE = "fake_openai_server.cycle"

NOT_HTTP = ServiceError(
    ErrorKind.INVALID_REQUEST,
    "The request is not valid HTTP/1.1: its request line, a header or its length could not "
    "be parsed.",
)


# The most a request's line and headers may take. uvicorn sets no bound: one connection
# could make the server hold as much as it sent within READ_TIMEOUT_SECONDS (an audit
# sent 1 GiB of headers in 4 s). nginx allows 32 KiB by default, h11 16 KiB.
HEAD_LIMIT = 64 * 1024

# A request answered before its body was in (a 401 or a 413 from the headers, a 405) has
# the rest of its body read and dropped, as uvicorn does, keeping the connection for the
# next request; but a connection drops at most DISCARD_BYTES of such bodies in all (twice
# MAX_REQUEST_BYTES's default, so that a client that sent a body just over the limit
# keeps its connection): uvicorn read on to the end of the body, however long (7 GB of a
# chunked one in 8 s from a client without a key, a core busy), and one body after
# another (an audit: 60 bodies of 15 MiB, 900 MiB in 1.7 s, on one connection). Beyond,
# and for bytes that are not HTTP, the connection is closed, lingering: what the client
# still sends is read and dropped, so that the client, still sending, reads its reply
# (closing on bytes still coming makes the kernel answer them with a reset, which can
# take the reply with it), until it has sent nothing for LINGER seconds, or for
# LINGER_MOST seconds, or LINGER_BYTES more. A request whose body would take its
# connection past DISCARD_BYTES (or whose length is not told: chunked), were it answered
# before it is in, has such a reply say ``connection: close``: the client then sends its
# next request on a new connection. Told nothing, it had sent it on this one, into the
# drop, and got no reply at all.
DISCARD_BYTES = 16 * 1024 * 1024
LINGER = 2.0
LINGER_MOST = 30.0
LINGER_BYTES = 64 * 1024 * 1024

HEAD_TOO_LARGE = ServiceError(
    ErrorKind.INVALID_REQUEST,
    f"The request's line and headers are over {HEAD_LIMIT // 1024} KiB.",
)


def http_protocol(read_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools, what it picks itself), closing a connection whose
    request has not arrived ``read_timeout`` seconds after it began or whose reply has not
    moved for as long, and answering bytes that are not HTTP, or a head over HEAD_LIMIT,
    in the error envelope."""
    within = f"within READ_TIMEOUT_SECONDS={read_timeout:g}"
    return type(
        "Connection",
        (Connection,),
        {
            "read_timeout": read_timeout,
            "slow": Closures(f"whose request had not arrived in full {within}"),
            "stuck": Closures(f"that had taken none of their reply {within}"),
            "garbled": Closures("whose bytes were not HTTP/1.1 (answered 400)"),
            "bloated": Closures(
                f"whose request's line and headers were over {HEAD_LIMIT // 1024} KiB "
                "(answered 431)"
            ),
        },
    )


class Closures:
    """Logs the connections closed for one reason: the first at once, then at most one line
    a minute with the count since the last (a Slowloris scan, or a scanner speaking TLS to
    the plain port, opens thousands)."""

    EVERY = 60.0

    def __init__(self, what: str) -> None:
        self.what = what
        self.unreported = 0
        self.reported_at = -math.inf

    def count(self, now: float) -> None:
        self.unreported += 1
        if now - self.reported_at < self.EVERY:
            return
        log.warning("closed %d connection(s) %s", self.unreported, self.what)
        self.unreported, self.reported_at = 0, now


class _LingeringClose:
    """A connection's transport as a request's cycle sees it where the connection ends
    after the reply while the client may still be sending: ``close`` is a lingering one
    (``Connection._linger``)."""

    def __init__(self, transport: asyncio.Transport, linger: Callable[[], None]) -> None:
        self._transport = transport
        self.close = linger

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


class Connection(HttpToolsProtocol):
    """One connection: when the request now arriving began (None between requests, which
    are keep-alive's), how much reply was unsent at the last look and since when none of
    it has been taken, and the timer that looks at them."""

    read_timeout: float
    slow: Closures
    stuck: Closures
    garbled: Closures
    bloated: Closures

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        now = self.loop.time()
        self._receiving_since: float | None = now
        self._unsent, self._taking_since = 0, now
        sock = transport.get_extra_info("socket")
        self._fd: int = sock.fileno() if sock is not None else -1
        self._deadline = self.loop.call_later(self.read_timeout, self._check_deadline)
        self._reread = False
        self._head: int | None = 0  # bytes of the request head so far; None once it is in
        self._feeding = 0  # bytes in the data being parsed
        self._head_too_large = False
        self._discarding = False  # answered: what comes is dropped (``_linger``)
        self._heard, self._lingered, self._linger_until = False, 0, 0.0
        self._dropped = 0  # bytes of answered requests' bodies dropped, on this connection
        self._message_in = False  # the request now being read has arrived whole
        # Its cycle's keep-alive, held back while its body is coming (``_hold_keep_alive``).
        self._held_keep_alive: bool | None = None
        # The request being answered (pipelined ones wait behind it).
        self._running: RequestResponseCycle | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        # uvicorn tells only the newest request that its client is gone: with requests
        # pipelined, the one running is an older one, which then wrote its reply to the
        # closed transport (an ERROR traceback for every such connection).
        for cycle in (self._running, *(waiting for waiting, _ in self.pipeline)):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self._running = cycle
        cycle.scope[CYCLE] = cycle  # type: ignore[literal-required]  # ASGI allows own keys
        super()._start_asgi_task(cycle, app)

    def on_message_begin(self) -> None:
        if self._receiving_since is None:
            self._receiving_since = self.loop.time()
        self._head = 0
        self._message_in = False
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self._receiving_since = None
        self._message_in = True
        held, self._held_keep_alive = self._held_keep_alive, None
        cycle = self.cycle
        if held is not None and not cycle.response_started:  # in whole, before any reply
            cycle.keep_alive, cycle.transport = held, self.transport
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        """As uvicorn's, with the envelope and a count for bytes that are not HTTP, a bound
        on the head, and an upgrade offer declined by serving the HTTP/1.1 it also is (no
        route speaks another protocol: the CLI runs uvicorn with ``ws="none"``)."""
        if self._discarding:  # answered: read only to be dropped (``_linger``)
            self._heard = True
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self.transport.close()
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and not self._message_in:
            # The body of a request already answered: uvicorn drops it (see DISCARD_BYTES).
            # (Not ``cycle.more_body``: uvicorn leaves it set once the reply is out, and the
            # next request's bytes counted as the last one's body.)
            self._dropped += len(data)
            if self._dropped > DISCARD_BYTES:
                self._linger()
                return
        self._unset_keepalive_if_required()
        self._feeding = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._head_too_large:  # raised by on_headers_complete
                self._refuse_head()
                return
            self.garbled.count(self.loop.time())  # uvicorn logged each one
            self._refuse(400, "Bad Request", NOT_HTTP)
            return
        except httptools.HttpParserUpgrade as upgrade:
            self._decline_upgrade(data[upgrade.args[0] :])
            return
        if self._head is not None:  # the head is still coming: all of ``data`` was head
            self._head += len(data)
            if self._head > HEAD_LIMIT:
                self._refuse_head()

    def _refuse_head(self) -> None:
        self.bloated.count(self.loop.time())
        self._refuse(431, "Request Header Fields Too Large", HEAD_TOO_LARGE)

    def _decline_upgrade(self, rest: bytes) -> None:
        """Read the request again without its upgrade offer: its head, rebuilt, then
        ``rest`` (its body, and whatever follows) through a fresh parser, into the request
        cycle its head has begun. That cycle took the message as complete and bodiless;
        its body now comes as the parser reads it."""
        offer = {b"upgrade", b"http2-settings"}
        head = [self.scope["method"].encode("ascii"), b" ", self.url, b" HTTP/1.1\r\n"]
        for name, value in self.headers:
            if name in offer:
                continue
            if name == b"connection":
                tokens = [t.strip() for t in value.split(b",")]
                value = b", ".join(t for t in tokens if t.lower() not in offer)
                if not value:
                    continue
            head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        self.cycle.more_body = True
        self._reread = True  # its head begins no second cycle
        self.parser = httptools.HttpRequestParser(self)
        self.data_received(b"".join(head) + rest)

    def on_headers_complete(self) -> None:
        head, self._head = self._head, None
        # A head that came whole in the bytes being read is measured here (rarely: only
        # when those bytes could hold one over the limit).
        if head is not None and head + self._feeding > HEAD_LIMIT:
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > HEAD_LIMIT:
                self._head_too_large = True
                raise ValueError("request head over HEAD_LIMIT")  # stops the parser
        if self._reread:
            self._reread = False
            return
        super().on_headers_complete()
        self._hold_keep_alive()

    def _hold_keep_alive(self) -> None:
        """Until the body of the request just begun is in, a reply to it closes the
        connection (``connection: close``, then a lingering close) if dropping the body
        would pass DISCARD_BYTES (see there). Once the body is in, the request has the
        keep-alive it asked for."""
        length = 0
        for name, value in self.headers:
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                length = DISCARD_BYTES + 1  # chunked: its length is not told
        if self._dropped + length <= DISCARD_BYTES:
            return
        cycle = self.cycle
        self._held_keep_alive = cycle.keep_alive
        cycle.keep_alive = False  # uvicorn writes connection: close, then closes:
        cycle.transport = _LingeringClose(self.transport, self._linger)  # type: ignore[assignment]

    def _check_deadline(self) -> None:
        now = self.loop.time()
        unsent, before = self._unsent_bytes(), self._unsent
        self._unsent = unsent
        if not before or unsent < before:  # a reply just begun, or some of it taken
            self._taking_since = now
        elif now - self._taking_since >= self.read_timeout:
            self.stuck.count(now)
            self.transport.abort()  # close() would wait for the reply to be taken
            return
        if self.transport.is_closing():
            if self._unsent:  # closed after its reply: looked at until that is taken
                self._deadline = self.loop.call_at(now + self.read_timeout, self._check_deadline)
            return
        since = self._receiving_since
        if since is not None and self.flow.read_paused:
            since = self._receiving_since = now  # the server's wait, not the client's
        if since is not None and now - since >= self.read_timeout:
            self.slow.count(now)
            self.transport.close()
            return
        due = (now if since is None else since) + self.read_timeout
        self._deadline = self.loop.call_at(due, self._check_deadline)

    def _unsent_bytes(self) -> int:
        """The reply the client has not taken yet: in asyncio's buffer, and in the kernel's
        send queue where it says (Linux's SIOCOUTQ; elsewhere asyncio's alone)."""
        unsent = self.transport.get_write_buffer_size()
        if _TIOCOUTQ is not None and self._fd >= 0:
            with contextlib.suppress(OSError):
                queued = fcntl.ioctl(self._fd, _TIOCOUTQ, b"\0\0\0\0")
                unsent += struct.unpack("i", queued)[0]
        return unsent

    def _refuse(self, status: int, reason: str, error: ServiceError) -> None:
        """The reply to a request refused before it reached the app (bytes the parser
        refused, a head over HEAD_LIMIT): the error envelope, and the connection closed."""
        body = orjson.dumps(error_body(error))
        head = [b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("ascii"))]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        self._linger()

    def _linger(self) -> None:
        """A lingering close (see LINGER): our end of the stream after the reply, then
        what the client still sends read and dropped, within the bounds above."""
        if self._discarding or self.transport.is_closing():
            return
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._discarding = True
        self._heard, self._lingered = False, 0
        self._linger_until = self.loop.time() + LINGER_MOST
        self.loop.call_later(LINGER, self._linger_on)

    def _linger_on(self) -> None:
        if self.transport.is_closing():
            return
        if not self._heard or self.loop.time() >= self._linger_until:
            self.transport.close()
            return
        self._heard = False
        self.loop.call_later(LINGER, self._linger_on)
