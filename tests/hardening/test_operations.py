"""The real CLI in a subprocess, as operators run it: logs and SIGTERM.

One server run (LOG_LEVEL=debug, LOG_JSON=true, both APIs over the tiny stand-ins)
serves requests carrying a distinctive text, then gets SIGTERM with requests in
flight. The tests below check what that run did.

SIGTERM, as it behaves (and as docs/operations.ja.md describes it):
- requests in flight finish with their normal reply, within SHUTDOWN_GRACE_SECONDS;
- the listening socket closes at once: a *new* connection is refused (a connection
  error, not a 503; reset if the kernel had just queued it), and keep-alive
  connections close after their reply;
- then the process exits 0.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.live import fake_cli, run_cli

SECRET = "秘密の合言葉はコバルトブルー42号"  # must never reach the log
REQUEST_ID = "hardening-log-check-1"
KEY = "sk-operations-cobalt-0042"  # must never reach the log either
WRONG_KEY = "sk-wrong-key-0043"
AUTH = {"Authorization": f"Bearer {KEY}"}
IN_FLIGHT = 4
INPUTS = 48


@dataclass
class Run:
    log: str
    secret_replies: list[httpx.Response]
    pending_at_signal: int
    refused_during_drain: bool
    pending_when_refused: int
    replies: list[httpx.Response]
    exit_code: int


def _in_progress(base_url: str, route: str) -> float:
    text = httpx.get(f"{base_url}/metrics", headers=AUTH, timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fos_requests_in_progress" and sample.labels["route"] == route:
                return sample.value
    return 0.0


def _secret_requests(client: httpx.Client) -> list[httpx.Response]:
    return [
        client.post(
            "/v1/embeddings",
            json={"input": [SECRET, f"前置き {SECRET}"]},
            headers={"X-Request-Id": REQUEST_ID},
        ),
        client.post("/v1/rerank", json={"query": SECRET, "documents": [SECRET, "別の文書"]}),
        # errors that name the input in the reply must still keep it out of the log
        client.post("/v1/embeddings", json={"input": SECRET, "model": SECRET}),
        client.post("/v1/embeddings", json={"input": [SECRET, ""]}),
        client.post("/v1/rerank", json={"query": SECRET, "documents": [{"title": SECRET}]}),
        client.post(
            "/v1/embeddings",
            json={"input": SECRET},
            headers={"Authorization": f"Bearer {WRONG_KEY}"},
        ),
    ]


@pytest.fixture(scope="module")
def run(hf_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    env = {
        "SERVICE_TYPE": "all",
        "DTYPE": "float32",
        "WARMUP": "false",
        "LOG_LEVEL": "debug",
        "LOG_JSON": "true",
        "SHUTDOWN_GRACE_SECONDS": "60",
        "MAX_BATCH_SIZE": "1",  # one input per forward pass: the in-flight requests take a while
        "API_KEYS": KEY,
    }
    text = "東京は日本の首都です。瑠璃色は深い青色のことです。" * 20  # ~500 tokens
    with run_cli(env, tmp_path_factory.mktemp("cli")) as server:
        process = server.process
        assert process is not None
        with server.client(headers=AUTH) as client:
            secret_replies = _secret_requests(client)

        url = f"{server.base_url}/v1/embeddings"
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            futures: list[Future[httpx.Response]] = [
                pool.submit(
                    httpx.post,
                    url,
                    json={"input": [f"{i}-{j} {text}" for j in range(INPUTS)]},
                    headers=AUTH,
                    timeout=120,
                )
                for i in range(IN_FLIGHT)
            ]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # until the server holds every request
                if _in_progress(server.base_url, "/v1/embeddings") == IN_FLIGHT:
                    break
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            pending_at_signal = sum(not f.done() for f in futures)

            refused = False
            while not all(f.done() for f in futures):
                try:
                    httpx.get(f"{server.base_url}/health", timeout=2)
                except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                    # refused, or reset when the kernel had queued it as the socket closed
                    refused = True
                    break
                time.sleep(0.05)
            pending_when_refused = sum(not f.done() for f in futures)
            replies = [f.result() for f in futures]
        exit_code = process.wait(timeout=60)
        yield Run(
            log=server.log(),
            secret_replies=secret_replies,
            pending_at_signal=pending_at_signal,
            refused_during_drain=refused,
            pending_when_refused=pending_when_refused,
            replies=replies,
            exit_code=exit_code,
        )


def test_sigterm_lets_in_flight_requests_finish(run: Run) -> None:
    assert run.pending_at_signal == IN_FLIGHT, "requests finished before SIGTERM: make them slower"
    assert [r.status_code for r in run.replies] == [200] * IN_FLIGHT, [
        r.text[:200] for r in run.replies
    ]
    assert all(len(r.json()["data"]) == INPUTS for r in run.replies)
    assert "Waiting for connections to close" in run.log


def test_sigterm_refuses_new_connections_while_draining(run: Run) -> None:
    assert run.refused_during_drain, "a new connection was accepted during the drain"
    assert run.pending_when_refused > 0


def test_sigterm_exits_0(run: Run) -> None:
    assert run.exit_code == 0, run.log[-3000:]


def test_request_text_and_keys_never_logged_even_at_debug(run: Run) -> None:
    statuses = [r.status_code for r in run.secret_replies]
    assert statuses == [200, 200, 404, 400, 400, 401], [r.text[:200] for r in run.secret_replies]
    access = [line for line in run.log.splitlines() if REQUEST_ID in line]
    assert access, "no debug access-log line: was LOG_LEVEL=debug applied?"
    assert json.loads(access[0])["level"] == "debug"
    assert "/v1/embeddings 200" in access[0]
    for fragment in (SECRET, SECRET[:6], SECRET[-8:], json.dumps(SECRET)[1:12]):
        assert fragment not in run.log
    for key in (KEY, WRONG_KEY, json.dumps(KEY)[1:-1]):
        assert key not in run.log


def test_json_logs_one_object_per_line(run: Run) -> None:
    lines = [line for line in run.log.splitlines() if line.strip()]
    assert len(lines) >= 5
    for line in lines:
        entry = json.loads(line)  # fails on any non-JSON line (tracebacks, progress bars)
        assert isinstance(entry, dict)
        assert {"time", "level", "logger", "message"} <= entry.keys()


def test_plain_logs_keep_an_errors_type_and_frames_but_not_its_message(tmp_path: Path) -> None:
    """LOG_JSON=false (the default format): an unforeseen error in the server process (a
    tokenizer that raises, TOKENIZER_WORKERS=0) and one in the model process (a batch that
    raises) are logged with their type and traceback, never their message, which can
    quote a request's text (the fakes' messages name a secret path instead). A path with
    a newline cannot start a forged log line."""
    settings = {"service_type": "embeddings", "warmup": False, "log_level": "debug"}
    options = {"tokenizer_raise": "爆", "triggers": {"壊": "raise"}}
    with fake_cli(settings, options, tmp_path) as server, server.client() as client:
        assert client.post("/v1/embeddings", json={"input": "爆発"}).status_code == 500
        assert client.post("/v1/embeddings", json={"input": "壊れる"}).status_code == 500
        assert client.get("/x%0A2026-01-01 00:00:00,000 ERROR forged: line").status_code == 404
        deadline = time.monotonic() + 10
        while "forged: line 404" not in server.log():  # the last request's log line
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        log = server.log()
    assert "secret-model" not in log, log  # the messages' own words (the source lines show)
    assert log.count("RuntimeError (its message is not logged)") == 2, log
    assert "Traceback (most recent call last):" in log
    assert not any(line.startswith("2026-01-01") for line in log.splitlines()), log
    assert "/x\\x0a2026-01-01" in log


@pytest.mark.parametrize(
    ("stuck", "options"),
    [
        pytest.param({}, {"delay": 20}, id="model"),
        # Waiting for a tokenizer process (a hung one, or a long queue of bulk texts):
        # such requests had been left to uvicorn's cancellation (found by a run audit).
        pytest.param({"tokenizer_workers": 1}, {"tokenizer_delay": 20}, id="tokenizer"),
    ],
)
def test_requests_the_grace_cannot_wait_for_get_a_503_before_it_ends(
    tmp_path: Path, stuck: dict[str, Any], options: dict[str, Any]
) -> None:
    """A pass (or a tokenizer call) longer than SHUTDOWN_GRACE_SECONDS: uvicorn cancels
    what is left when the grace is up, and a cancelled request got a bare text 500 and a
    traceback in the log. Now the requests still waiting are answered 503 "shutting down"
    (the envelope) just before, and the work nobody waits for any more is not waited for."""
    settings = {
        "service_type": "embeddings",
        "warmup": False,
        "shutdown_grace_seconds": 2,
        **stuck,
    }
    with fake_cli(settings, options, tmp_path) as server:
        process = server.process
        assert process is not None
        with ThreadPoolExecutor(3) as pool:
            futures = [
                pool.submit(
                    httpx.post,
                    f"{server.base_url}/v1/embeddings",
                    json={"input": f"{i}"},
                    timeout=60,
                )
                for i in range(3)
            ]
            deadline = time.monotonic() + 30
            while _in_progress(server.base_url, "/v1/embeddings") < 3:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            replies = [future.result() for future in futures]
        answered = time.monotonic() - signalled
        exit_code = process.wait(timeout=60)
        stopped = time.monotonic() - signalled
        log = server.log()
    for reply in replies:
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["message"] == "The server is shutting down.", reply.text
        assert "retry-after" in reply.headers
    assert 1.0 < answered < 2.5, answered  # within the grace, near its end
    assert stopped < 8, stopped  # not the 20 s pass, nor the 10 s STOP_TIMEOUT
    assert exit_code == 0
    assert "Exception in ASGI application" not in log, log


def _head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/v1/embeddings", b'{"input": "a"}', id="fast-route"),  # api/hot.py
        # FastAPI reads this body itself (no @hot), in TEI's envelope
        pytest.param("/tokenize", b'{"inputs": "a"}', id="fastapi-route"),
    ],
)
def test_a_request_whose_body_is_still_coming_when_the_grace_ends_gets_a_503(
    tmp_path: Path, path: str, body: bytes
) -> None:
    """A client that had sent its headers and part of its body when SIGTERM came, and
    stalled (a slow upload, well within READ_TIMEOUT_SECONDS): its request was cancelled
    by uvicorn at the end of the grace, a bare text 500 "Internal Server Error" and
    "Exception in ASGI application" with a traceback in the log (found by a fault review).
    Now it is answered as every other request the grace cannot wait for: 503 "shutting
    down" in the route's envelope, just before the grace ends, and the server exits 0."""
    settings = {"service_type": "all", "warmup": False, "shutdown_grace_seconds": 2}
    with fake_cli(settings, {}, tmp_path) as server:
        process = server.process
        assert process is not None
        with server.connect(timeout=30) as sock:
            sock.sendall(_head(path, len(body)) + body[:5])
            deadline = time.monotonic() + 30
            while _in_progress(server.base_url, path) < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            answered = time.monotonic() - signalled
        exit_code = process.wait(timeout=60)
        log = server.log()
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), reply
    assert b"retry-after" in head.lower(), reply
    assert b"The server is shutting down." in payload, reply
    assert 1.0 < answered < 2.5, answered  # within the grace, near its end
    assert exit_code == 0
    assert "Exception in ASGI application" not in log, log
    assert "Traceback" not in log, log


def test_a_drain_that_cancels_nothing_logs_no_error(tmp_path: Path) -> None:
    """With SHUTDOWN_GRACE_SECONDS=0 uvicorn's wait of 0 s ends before it has looked, and
    it logged "ERROR Cancel 0 running task(s), timeout graceful shutdown exceeded" on every
    shutdown, an idle one included (found by a fault review): an alert for nothing. A
    drain that cancels no request logs no error; the server exits 0."""
    settings = {"service_type": "embeddings", "warmup": False, "shutdown_grace_seconds": 0}
    with fake_cli(settings, {}, tmp_path) as server:
        process = server.process
        assert process is not None
        assert (
            httpx.post(f"{server.base_url}/v1/embeddings", json={"input": "a"}).status_code == 200
        )
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=60)
        log = server.log()
    assert exit_code == 0
    assert "Finished server process" in log, log
    assert " ERROR " not in log, log


def test_a_reply_not_taken_by_the_end_of_the_grace_is_a_warning_not_an_error(
    tmp_path: Path,
) -> None:
    """A client that had not taken all of its reply (~11 MB: more than the kernel's
    buffers hold) when the grace ended: uvicorn closed its connection and logged "ERROR
    Cancel 0 running task(s)", though it cancelled nothing. Now a warning says what was cut."""
    settings = {"service_type": "embeddings", "warmup": False, "shutdown_grace_seconds": 2}
    body = json.dumps({"input": ["東京"] * 512, "encoding_format": "base64"}).encode()
    with fake_cli(settings, {"dimension": 4096}, tmp_path) as server:
        process = server.process
        assert process is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with sock:
            sock.connect(server.address)
            sock.sendall(_head("/v1/embeddings", len(body)) + body)
            sock.recv(1)  # the reply has begun
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            exit_code = process.wait(timeout=60)
        log = server.log()
    assert exit_code == 0
    assert " ERROR " not in log, log
    assert "closing 1 connection(s) whose client had not taken all of its reply" in log, log
