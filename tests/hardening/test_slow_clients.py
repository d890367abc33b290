"""Clients too slow to send their request (READ_TIMEOUT_SECONDS, ``api/connections.py``).

A connection that sends nothing, half its headers or half its body is closed once the
deadline passes, and the server goes on serving; a request that arrives in time is never
cut, however long it then takes to answer, nor is a connection idle between requests.
Raw sockets against a real uvicorn, served as the CLI serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client.parser import text_string_to_metric_families

from fake_openai_server.api.app import build_app
from fake_openai_server.settings import Settings
from tests.hardening.test_bad_requests import assert_still_serving
from tests.support.fakes import fake_plugin
from tests.support.live import LiveServer, serve_app

READ_TIMEOUT = 1.0
MODEL_SECONDS = 1.5  # every forward pass: longer than the read deadline
EMBED = b'{"input": "\xe6\x9d\xb1\xe4\xba\xac"}'  # "東京"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    settings = Settings(service_type="all", warmup=False, read_timeout_seconds=READ_TIMEOUT)
    with serve_app(build_app(settings, fake_plugin(delay=MODEL_SECONDS))) as live:
        yield live


def _head(path: str, length: int, *, close: bool = False) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{connection}\r\n"
    ).encode()


def _read_all(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    started, data = time.monotonic(), b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def _statuses(data: bytes) -> list[int]:
    """The status of every reply in ``data`` (one reply's body runs into the next's head)."""
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /v1/embeddings HTTP/1.1\r\nHost: te", _head("/v1/embeddings", 100) + b'{"in'],
    ids=["nothing", "half-the-headers", "half-the-body"],
)
def test_a_request_not_in_by_the_deadline_loses_its_connection(
    server: LiveServer, sent: bytes
) -> None:
    with server.connect() as sock:
        sock.sendall(sent)
        data, waited = _read_all(sock)
    assert data == b""  # closed, unanswered: a client that slow reads nothing
    assert READ_TIMEOUT * 0.9 <= waited < READ_TIMEOUT + 3
    with server.client() as client:
        assert_still_serving(client)


def test_a_body_cut_off_is_a_client_gone_and_logs_one_warning(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The route meets a client that left (499, no error logged); the log says why once
    (a Slowloris scan closes thousands: one line a minute at most, with the count)."""

    def answered(status: str) -> float:
        return server.metric("fos_requests_total", route="/v1/embeddings", status=status)

    gone = answered("499")
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            with server.connect() as sock:
                sock.sendall(_head("/v1/embeddings", 100) + b'{"input": ')
                assert _read_all(sock)[0] == b""
        deadline = time.monotonic() + 10
        while answered("499") < gone + 2:
            assert time.monotonic() < deadline, "the cut-off requests were not counted"
            time.sleep(0.05)
    assert answered("500") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.name.endswith("connections")]
    assert len(warnings) <= 1, warnings  # the module's earlier tests may have logged it
    assert all(f"READ_TIMEOUT_SECONDS={READ_TIMEOUT:g}" in w for w in warnings)


def test_a_request_sent_slowly_but_in_time_is_answered(server: LiveServer) -> None:
    with server.connect() as sock:
        sock.sendall(_head("/v1/embeddings", len(EMBED), close=True) + EMBED[:5])
        time.sleep(READ_TIMEOUT * 0.3)
        sock.sendall(EMBED[5:])
        data, _ = _read_all(sock)
    assert _statuses(data) == [200]


def test_a_request_in_time_is_answered_however_long_it_takes_and_its_connection_kept(
    server: LiveServer,
) -> None:
    """The deadline is for receiving: the model's time (longer than the deadline here) and the
    idle time between requests on a kept-alive connection are not counted."""
    with server.client() as client:
        started = time.monotonic()
        first = client.post("/v1/embeddings", content=EMBED)
        assert first.status_code == 200, first.text
        assert time.monotonic() - started >= MODEL_SECONDS
        time.sleep(READ_TIMEOUT * 2)
        again = client.post("/v1/embeddings", content=EMBED)
        assert again.status_code == 200, again.text
        assert again.extensions["network_stream"] is first.extensions["network_stream"]


def test_the_servers_own_wait_is_not_the_clients() -> None:
    """A pipelined request is not read while the one before it is answered (uvicorn stops
    reading): the rest of its body, sent long before, arrives late through no fault of
    the client's, and both are answered. (A bare app, whose slow route never reads: this
    server's routes read at once, so reading resumes sooner; the rule is uvicorn's.)"""
    app = FastAPI()
    app.state.settings = Settings.model_construct(read_timeout_seconds=READ_TIMEOUT)

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await asyncio.sleep(READ_TIMEOUT * 3)
        return {"ok": True}

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(await request.body())

    with serve_app(app, wait=False) as server, server.connect() as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n" + _head("/echo", 10, close=True))
        sock.sendall(b"01234")
        time.sleep(0.2)  # the server has stopped reading by now
        sock.sendall(b"56789")
        data, _ = _read_all(sock)
    assert _statuses(data) == [200, 200]
    assert data.endswith(b"0123456789")


def test_a_client_that_leaves_with_requests_pipelined_is_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """uvicorn told only the newest request that its client had gone: the older one, being
    answered, wrote to the closed connection, and each such client cost an ERROR traceback
    ("Exception in ASGI application"; found by a run audit)."""
    app = FastAPI()
    answered = []

    @app.post("/slow")
    async def slow(request: Request) -> dict[str, bool]:
        await request.body()
        await asyncio.sleep(0.3)
        answered.append(True)
        return {"ok": True}

    with caplog.at_level(logging.ERROR), serve_app(app, wait=False) as server:
        for _ in range(3):
            with server.connect() as sock:
                sock.sendall(_head("/slow", 2) + b"{}" + _head("/slow", 2) + b"{}")
                time.sleep(0.1)  # the first is being answered; the second waits behind it
            time.sleep(0.5)
        with server.client() as client:
            assert client.post("/slow", content=b"{}").status_code == 200
    assert len(answered) >= 4  # the three first requests ran, and the last one
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# --- the other way: a client that does not take its reply ---------------------------------
@pytest.fixture(scope="module")
def big_replies() -> Iterator[LiveServer]:
    """Replies of ~11 MB (512 vectors of 4,096 floats, base64): more than the kernel's
    send buffer (4 MiB at most) and the client's receive buffer together hold."""
    settings = Settings(service_type="embeddings", warmup=False, read_timeout_seconds=READ_TIMEOUT)
    with serve_app(build_app(settings, fake_plugin(dimension=4096))) as live:
        yield live


def _ask_for_a_big_reply(server: LiveServer, window: int) -> tuple[socket.socket, int]:
    """A connection with a receive buffer of ``window`` bytes that asked for a big reply,
    and the reply's size."""
    body = json.dumps({"input": ["東京"] * 512, "encoding_format": "base64"}).encode()
    with server.client() as client:
        size = len(client.post("/v1/embeddings", content=body).content)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
    sock.settimeout(10)
    sock.connect(server.address)
    sock.sendall(_head("/v1/embeddings", len(body)) + body)
    return sock, size


def _take(sock: socket.socket, pause: float = 0, slow_for: float = 0) -> int:
    """Read until the server closes or resets, for the first ``slow_for`` seconds with
    ``pause`` seconds between reads; the bytes read."""
    taken, started = 0, time.monotonic()
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            taken += len(chunk)
            if time.monotonic() - started < slow_for:
                time.sleep(pause)
    return taken


def test_a_reply_the_client_does_not_take_is_dropped_with_its_connection(
    big_replies: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A frozen client's reply had stayed in memory, its connection open, for good."""
    sock, size = _ask_for_a_big_reply(big_replies, 4096)
    with sock, caplog.at_level(logging.WARNING):
        deadline = time.monotonic() + 30  # two looks at the unsent reply, a deadline apart
        while not any("taken none of their reply" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "a client that took nothing kept its connection"
            time.sleep(0.1)
        taken = _take(sock)
    assert taken < size, "the whole reply was kept for a client that took none of it"
    with big_replies.client() as client:
        assert client.post("/v1/embeddings", content=EMBED).status_code == 200


def test_a_reply_taken_slowly_is_sent_whole(big_replies: LiveServer) -> None:
    """A client that takes its reply slowly (~200 KB/s here, for three deadlines) is not
    cut: the kernel's send queue shrinks while asyncio's buffer, refilled from it only now
    and then, can stay as it was for longer than the deadline."""
    sock, size = _ask_for_a_big_reply(big_replies, 4096)
    with sock:
        taken = _take(sock, pause=0.02, slow_for=READ_TIMEOUT * 3)
    assert taken > size, (taken, size)  # the reply, with its head


# --- a reply nobody is there to take --------------------------------------------------------


def test_a_reply_ready_after_its_client_left_is_counted_as_499() -> None:
    """A client that leaves before WATCH_AFTER (a short client timeout): nothing watches
    for it, its reply is made and uvicorn drops it unsent; the metrics had counted a 200."""
    settings = Settings(service_type="embeddings", warmup=False)
    with serve_app(build_app(settings, fake_plugin(delay=0.3))) as live:
        with live.connect() as sock:
            sock.sendall(_head("/v1/embeddings", len(EMBED)) + EMBED)
            time.sleep(0.1)  # gone while its batch runs
        with live.client() as client:
            assert client.post("/v1/embeddings", content=EMBED).status_code == 200
            deadline = time.monotonic() + 10
            while True:  # until both are counted (the first ends when its batch has run)
                counted = _requests_counted(client.get("/metrics").text, "/v1/embeddings")
                if sum(counted.values()) >= 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
    assert counted == {"499": 1.0, "200": 1.0}


def _requests_counted(metrics: str, route: str) -> dict[str, float]:
    """fos_requests_total of ``route``, by status."""
    return {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "fos_requests_total" and sample.labels["route"] == route
    }
