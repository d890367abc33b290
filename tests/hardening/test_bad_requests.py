"""A catalogue of hostile and malformed requests.

Each gets its 4xx in the OpenAI error envelope (all four keys, a short message),
and the server keeps serving: a normal request right after it succeeds.
"""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import select
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest

from fake_openai_server.api.app import build_app
from fake_openai_server.api.connections import LINGER
from fake_openai_server.api.errors import MESSAGE_LIMIT
from fake_openai_server.settings import Settings
from tests.support.fakes import fake_plugin, fake_text_vector
from tests.support.live import LiveServer, serve_app

LIMIT = 8 * 1024 * 1024  # MAX_REQUEST_BYTES (the default)
MILLION = 1_000_000


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    settings = Settings(
        service_type="all",
        warmup=False,
        allow_token_ids=True,  # so that token-id payloads reach the checks they aim at
        max_request_bytes=LIMIT,
        max_input_chars=10_000,
        max_request_tokens=5_000,
    )
    with serve_app(build_app(settings, fake_plugin())) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def assert_envelope(reply: httpx.Response | tuple[int, bytes], status: int) -> dict[str, object]:
    if isinstance(reply, httpx.Response):
        code, body, text = reply.status_code, reply.json(), reply.text
    else:
        code, raw = reply
        body, text = httpx.Response(200, content=raw).json(), raw.decode()
    assert code == status, text[:500]
    error: dict[str, object] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert 0 < len(error["message"]) <= MESSAGE_LIMIT + 40
    assert len(text) < 4 * MESSAGE_LIMIT  # never an echo of the request
    return error


def assert_still_serving(client: httpx.Client) -> None:
    reply = client.post("/v1/embeddings", json={"input": ["東京", "大阪"]})
    assert reply.status_code == 200, reply.text
    got = [item["embedding"] for item in reply.json()["data"]]
    np.testing.assert_allclose(got, [fake_text_vector("東京"), fake_text_vector("大阪")], rtol=1e-6)


@dataclass
class Bad:
    name: str
    body: bytes
    status: int = 400
    path: str = "/v1/embeddings"
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    says: str = ""  # a fragment the message must contain

    def __str__(self) -> str:
        return self.name


def _json_list(item: bytes, count: int) -> bytes:
    return b"[" + b",".join([item] * count) + b"]"


CATALOGUE = [
    # wrong types
    Bad("input-number", b'{"input": 5}', says="'input'"),
    Bad("input-object", b'{"input": {"text": "a"}}', says="'input'"),
    Bad("input-mixed-list", b'{"input": ["a", 1]}', says="'input'"),
    Bad("input-null", b'{"input": null}', says="'input'"),
    Bad("input-missing", b'{"model": "cl-nagoya/ruri-large"}', says="'input' is required"),
    Bad("model-number", b'{"input": "a", "model": 5}', says="'model'"),
    Bad("dimensions-string", b'{"input": "a", "dimensions": "8"}', says="'dimensions'"),
    Bad("dimensions-zero", b'{"input": "a", "dimensions": 0}', says="dimensions"),
    Bad("encoding-unknown", b'{"input": "a", "encoding_format": "hex"}', says="encoding_format"),
    Bad("input-type-unknown", b'{"input": "a", "input_type": "poem"}', says="input_type"),
    Bad("query-number", b'{"query": 1, "documents": ["a"]}', path="/v1/rerank", says="query"),
    Bad("documents-string", b'{"query": "q", "documents": "a"}', path="/v1/rerank"),
    Bad("top-n-string", b'{"query": "q", "documents": ["a"], "top_n": "2"}', path="/v2/rerank"),
    Bad("top-n-negative", b'{"query": "q", "documents": ["a"], "top_n": -1}', path="/v1/rerank"),
    Bad(
        "return-documents-string",
        b'{"query": "q", "documents": ["a"], "return_documents": "yes"}',
        path="/v1/rerank",
    ),
    Bad(
        "top-k-negative",
        b'{"query": "q", "documents": ["a"], "top_k": -1}',
        path="/v1/rerank",
        says="top_k must be 0 or more",
    ),
    # object documents are echoed whole: a field no JSON reply can carry is refused
    Bad(
        "document-field-over-64-bits",
        b'{"query": "q", "documents": [{"text": "a", "n": 18446744073709551616}]}',
        path="/v1/rerank",
        says="documents[0] has a field that cannot be sent back",
    ),
    Bad(
        "document-field-under-64-bits",
        b'{"query": "q", "documents": ["a", {"text": "b", "n": -9223372036854775809}], '
        b'"return_documents": true}',
        path="/v2/rerank",
        says="documents[1] has a field that cannot be sent back",
    ),
    Bad(
        "document-field-251-deep",
        b'{"query": "q", "documents": [{"text": "a", "x": ' + b"[" * 251 + b"]" * 251 + b"}]}",
        path="/v1/rerank",
        says="documents[0] has a field that cannot be sent back",
    ),
    # empty things
    Bad("empty-string", b'{"input": ""}', says="empty"),
    Bad("blank-string", b'{"input": ["a", " \\t\\n"]}', says="input[1]"),
    Bad("empty-list", b'{"input": []}', says="empty"),
    Bad("empty-query", b'{"query": "", "documents": ["a"]}', path="/v1/rerank"),
    Bad("no-documents", b'{"query": "q", "documents": []}', path="/v1/rerank"),
    Bad("empty-body", b"", says="JSON object"),
    Bad("null-body", b"null", says="JSON object"),
    Bad("array-body", b'["a"]', says="JSON object"),
    Bad("string-body", b'"a"', says="JSON object"),
    # not JSON, not UTF-8, not Unicode
    Bad("truncated-json", b'{"input": ["a", "b"', says="JSON"),
    Bad("trailing-garbage", b'{"input": "a"} xyz', says="JSON"),
    Bad("invalid-utf8", b'{"input": "\xff\xfe\xfa"}', says="UTF-8"),
    Bad("overlong-utf8", b'{"input": "\xc0\xaf"}', says="UTF-8"),
    Bad("shift-jis", '{"input": "社内文書"}'.encode("cp932"), says="not UTF-8"),
    Bad(
        "gzip",
        gzip.compress(b'{"input": "a"}'),
        headers={"Content-Encoding": "gzip"},
        says="Content-Encoding: gzip",
    ),
    Bad("lone-surrogate", b'{"input": "a\\ud800b"}', says="surrogate"),
    Bad("lone-surrogate-model", b'{"input": "a", "model": "\\udfff"}', says="surrogate"),
    Bad(
        "lone-surrogate-rerank",
        b'{"query": "q", "documents": [{"text": "a", "meta": "\\ud83d"}]}',
        path="/v1/rerank",
        says="surrogate",
    ),
    Bad("nul-and-controls", b'{"input": "\\u0000\\u0001\\u001f", "model": "\\u0000"}', status=404),
    # NaN and friends where token ids go
    Bad("nan-token", b'{"input": [1, NaN, 2]}', says="'input'"),
    Bad("infinity-token", b'{"input": [1, Infinity]}', says="'input'"),
    Bad("minus-infinity-token", b'{"input": [[1, -Infinity]]}', says="'input'"),
    Bad("float-token", b'{"input": [1.5, 2]}', says="'input'"),
    Bad("negative-token", b'{"input": [-1, 2]}', says="vocabulary"),
    Bad("huge-token", b'{"input": [1' + b"0" * 4000 + b"]}", says="vocabulary"),
    Bad("too-many-digits", b'{"input": [1' + b"0" * 5000 + b"]}", says="too many digits"),
    Bad("bool-token", b'{"input": [true, false]}', says="'input'"),
    # deep nesting
    Bad("deep-array", b"[" * 100_000 + b"]" * 100_000),
    Bad("deep-object", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
    Bad("deep-input", b'{"input": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    Bad(
        "deep-unknown-field",
        b'{"input": "a", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        says="nested too deeply",
    ),
    # many and large
    Bad(
        "million-empty-strings",
        b'{"input": ' + _json_list(b'""', MILLION) + b"}",
        says="MAX_INPUTS",
    ),
    Bad("million-lists", b'{"input": ' + _json_list(b"[7]", MILLION) + b"}", says="MAX_INPUTS"),
    Bad(
        "million-documents",
        b'{"query": "q", "documents": ' + _json_list(b'"a"', MILLION) + b"}",
        path="/v1/rerank",
        says="MAX_DOCUMENTS",
    ),
    Bad("long-text", b'{"input": "' + b"a" * 20_000 + b'"}', says="MAX_INPUT_CHARS=10000"),
    Bad(
        "long-query",
        b'{"query": "' + b"q" * 10_001 + b'", "documents": ["a"]}',
        path="/v1/rerank",
        says="query has 10001 characters",
    ),
    Bad(
        "too-many-tokens",
        b'{"input": ' + _json_list(b'"' + b"a" * 30 + b'"', 200) + b"}",
        says="MAX_REQUEST_TOKENS=5000",
    ),
    Bad("long-model-name", b'{"input": "a", "model": "' + b"m" * 100_000 + b'"}', status=404),
    Bad(
        "long-rank-fields",
        b'{"query": "q", "documents": [{"t": "a"}], "rank_fields": ["' + b"f" * 100_000 + b'"]}',
        path="/v1/rerank",
    ),
    # routes, methods, content types
    Bad("unknown-route", b"", method="GET", path="/v1/chat/completions", status=404),
    Bad("unknown-post", b"{}", path="/v1/completions", status=404),
    Bad("traversal", b"", method="GET", path="/../../etc/passwd", status=404),
    Bad("long-path", b"", method="GET", path="/" + "x" * 8000, status=404),
    Bad("get-embeddings", b"", method="GET", status=405),
    Bad("put-rerank", b"{}", method="PUT", path="/v1/rerank", status=405),
    Bad("delete-health", b"", method="DELETE", path="/health", status=405),
    Bad("post-models", b"{}", path="/v1/models", status=405),
    Bad(
        "form-body",
        b"input=hello",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        says="JSON",
    ),
    Bad("xml-body", b"<input>a</input>", headers={"Content-Type": "application/xml"}, says="JSON"),
    Bad(
        "multipart-body",
        b'--b\r\nContent-Disposition: form-data; name="input"\r\n\r\na\r\n--b--\r\n',
        headers={"Content-Type": "multipart/form-data; boundary=b"},
        says="JSON",
    ),
]


@pytest.mark.parametrize("bad", CATALOGUE, ids=str)
def test_bad_request_gets_its_4xx_and_the_server_goes_on(bad: Bad, client: httpx.Client) -> None:
    reply = client.request(bad.method, bad.path, content=bad.body, headers=bad.headers)
    error = assert_envelope(reply, bad.status)
    assert bad.says in str(error["message"])
    assert reply.headers["x-request-id"]
    assert_still_serving(client)


def test_document_fields_come_back_when_the_reply_can_carry_them(client: httpx.Client) -> None:
    """The refusals above are for fields the reply would echo: not echoed, any field is
    fine; echoed, nesting up to what JSON writers take comes back as sent."""
    huge = b'{"query": "q", "documents": [{"text": "a", "n": 18446744073709551616}]'
    reply = client.post("/v1/rerank", content=huge + b', "return_documents": false}')
    assert reply.status_code == 200, reply.text[:300]
    assert "document" not in reply.json()["results"][0]
    deep = b'{"query": "q", "documents": [{"text": "a", "x": ' + b"[" * 250 + b"]" * 250 + b"}]}"
    reply = client.post("/v1/rerank", content=deep)
    assert reply.status_code == 200, reply.text[:300]
    assert reply.json()["results"][0]["document"]["x"] == json.loads(b"[" * 250 + b"]" * 250)


def test_million_token_ids_are_cut_like_text(client: httpx.Client) -> None:
    """Not an error: with TRUNCATE=true (the default) a long input is cut to the model's
    maximum length, token ids too; MAX_REQUEST_TOKENS counts what is left."""
    reply = client.post("/v1/embeddings", content=b'{"input": ' + _json_list(b"7", MILLION) + b"}")
    assert reply.status_code == 200, reply.text[:300]
    assert reply.json()["usage"]["prompt_tokens"] == 32  # the fake model's maximum length


def test_json_under_a_wrong_content_type_is_still_json(client: httpx.Client) -> None:
    """curl -d and some clients send JSON as text/plain or form data: it is accepted."""
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        reply = client.post("/v1/embeddings", content=b'{"input": "a"}', headers=headers)
        assert reply.status_code == 200, (content_type, reply.text)


def test_utf16_json_is_decoded(client: httpx.Client) -> None:
    """JSON may come in UTF-16 or UTF-32 (RFC 8259 readers detect it)."""
    reply = client.post("/v1/embeddings", content='{"input": "東京"}'.encode("utf-16"))
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(reply.json()["data"][0]["embedding"], fake_text_vector("東京"))


def test_request_id_is_honoured_only_when_sane(client: httpx.Client) -> None:
    sane = client.get("/health", headers={"X-Request-Id": "abc-123.DEF:9_x"})
    assert sane.headers["x-request-id"] == "abc-123.DEF:9_x"
    for insane in ("a" * 129, "a b", "<script>", "é"):
        reply = client.get("/health", headers={"X-Request-Id": insane.encode("utf-8")})
        assert reply.headers["x-request-id"] != insane
        assert len(reply.headers["x-request-id"]) == 32


# --- bodies over MAX_REQUEST_BYTES, over a raw socket ---------------------------------


def _raw(server: LiveServer, head: bytes, chunks: Iterable[bytes] = ()) -> tuple[int, bytes, int]:
    """Send ``head`` then ``chunks`` until the server answers; the reply and the bytes sent."""
    with server.connect() as sock:
        sock.sendall(head)
        sent = 0
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered: stop sending
            sock.sendall(chunk)
            sent += len(chunk)
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        return reply.status, reply.read(), sent


def test_declared_length_over_the_limit_is_413_before_any_body(server: LiveServer) -> None:
    head = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (LIMIT + 1)
    )
    status, body, _ = _raw(server, head)  # no body at all: the answer must not wait for it
    error = assert_envelope((status, body), 413)
    assert f"MAX_REQUEST_BYTES={LIMIT}" in str(error["message"])
    assert error["code"] == "request_too_large"


def test_chunked_body_over_the_limit_is_cut_off_with_413(server: LiveServer) -> None:
    piece = b" " * 65536
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    total = 3 * LIMIT // len(piece)
    head = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    status, body, sent = _raw(server, head, [chunk] * total + [b"0\r\n\r\n"])
    assert_envelope((status, body), 413)
    assert sent < total * len(chunk), "the server read the whole body before answering"


def test_a_slow_client_sending_a_body_over_the_limit_reads_its_413(server: LiveServer) -> None:
    """The 413 goes out from the headers; the body still coming is read and dropped, so
    that a client on a slow link, which reads only once it has sent everything, finds
    its 413 rather than a reset (closing after a fixed 2 s had reset a body that took
    longer to send)."""
    size = LIMIT + 1024 * 1024
    pieces = 8
    with server.connect(timeout=30) as sock:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        )
        started = time.monotonic()
        for _ in range(pieces):  # over about 2.5 x LINGER, never LINGER without a byte
            sock.sendall(b" " * (size // pieces))
            time.sleep(LINGER * 0.3)
        sock.sendall(b" " * (size - pieces * (size // pieces)))
        assert time.monotonic() - started > 2 * LINGER
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        assert_envelope((reply.status, reply.read()), 413)


def test_body_over_the_limit_sent_whole_is_413(client: httpx.Client) -> None:
    reply = client.post("/v1/embeddings", content=b'{"input": "' + b"a" * LIMIT + b'"}')
    assert_envelope(reply, 413)
    assert_still_serving(client)


@pytest.mark.parametrize("path", ["/v1/embeddings", "/tokenize"], ids=["fast", "fastapi"])
def test_a_client_gone_before_its_body_is_in_is_no_server_error(
    server: LiveServer, client: httpx.Client, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """A client that hangs up half-way through its body is counted as gone (499), as one
    that leaves while its texts are queued, on a fast route (``api/hot.py``) as on one of
    FastAPI's: no 500 or 400, no error logged."""

    def answered(status: int) -> float:
        return server.metric("fos_requests_total", route=path, status=str(status))

    gone, refused, crashed = answered(499), answered(400), answered(500)
    with caplog.at_level(logging.ERROR), server.connect() as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n".encode()
            + b'Content-Length: 100\r\n\r\n{"input": '
        )
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while answered(499) == gone and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answered(499) == gone + 1
    assert (answered(400), answered(500)) == (refused, crashed)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert_still_serving(client)


@pytest.mark.parametrize(
    "raw",
    [
        b"BREW /v1/embeddings HTTP/1.1\r\nHost: test\r\n\r\n",
        b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nBad\x01Name: 1\r\n\r\n",
        b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n"
        b"Content-Length: 6\r\n\r\n{}",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS to a plain-HTTP port
    ],
    ids=["unknown-method", "bad-header-name", "two-lengths", "tls-hello"],
)
def test_bytes_that_are_not_http_get_the_envelope(
    server: LiveServer, client: httpx.Client, raw: bytes
) -> None:
    """uvicorn's parser answers these before any route; the reply is the envelope of every
    other 400 (it was ``Invalid HTTP request received.`` in plain text)."""
    status, body, _ = _raw(server, raw)
    error = assert_envelope((status, body), 400)
    assert "not valid HTTP/1.1" in str(error["message"])
    assert_still_serving(client)


def test_body_at_the_limit_is_parsed(client: httpx.Client) -> None:
    """Just under MAX_REQUEST_BYTES is a normal request (here: over MAX_INPUT_CHARS)."""
    padding = LIMIT - len(b'{"input": ""}')
    reply = client.post("/v1/embeddings", content=b'{"input": "' + b"a" * padding + b'"}')
    assert_envelope(reply, 400)


def test_bytes_that_are_not_http_are_logged_once_then_counted(
    server: LiveServer, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    """A scanner speaking TLS to the plain port opens connection after connection: uvicorn
    logged a WARNING for each. Now the first is logged, then a count at most once a
    minute."""
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            assert_envelope(_raw(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")[:2], 400)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "Invalid HTTP request received." not in lines
    assert len([line for line in lines if "not HTTP/1.1" in line]) <= 1, lines
    assert_still_serving(client)


@pytest.mark.parametrize("pieces", [1, 40], ids=["one-write", "trickled"])
def test_a_request_head_over_64_kib_is_431(
    server: LiveServer, client: httpx.Client, pieces: int
) -> None:
    """uvicorn reads a request's headers without bound (an audit sent 1 GiB in 4 s, all of
    it held in memory). Over HEAD_LIMIT the reply is 431 in the envelope; just under, the
    request is served."""
    body = b'{"input": "a"}'

    def request(header_bytes: int) -> bytes:
        return (
            b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + b"X-Padding: "
            + b"p" * header_bytes
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        )

    served = _raw(server, request(60 * 1024) + body)
    assert served[0] == 200, served
    head = request(80 * 1024)
    size = -(-len(head) // pieces)
    status, reply, _ = _raw(server, b"", [head[i : i + size] for i in range(0, len(head), size)])
    error = assert_envelope((status, reply), 431)
    assert "64 KiB" in str(error["message"])
    assert_still_serving(client)


def test_a_websocket_handshake_is_answered_as_http(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """No route speaks WebSocket: a handshake gets the reply its path and method get (here
    the JSON 404), not uvicorn's empty 403 and two log lines quoting its URL."""
    handshake = (
        b"GET /chat?token=SECRET-MARKER HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    with caplog.at_level(logging.INFO):
        status, body, _ = _raw(server, handshake)
    error = assert_envelope((status, body), 404)
    assert "No route GET /chat" in str(error["message"])
    assert "SECRET-MARKER" not in caplog.text


def test_a_trailing_slash_gets_a_404_that_says_so(client: httpx.Client) -> None:
    """Starlette answered a path with a trailing slash with an empty 307 to a URL built
    from the client's Host header (``http://`` even behind a TLS proxy)."""
    reply = client.post("/v1/embeddings/", json={"input": "a"}, headers={"Host": "evil.example"})
    error = assert_envelope(reply, 404)
    assert "Leave out the trailing slash: /v1/embeddings" in str(error["message"])
    assert "location" not in reply.headers
