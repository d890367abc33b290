"""API keys: every route without, with a wrong and with a right key."""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from fake_openai_server.api import connections
from fake_openai_server.api.app import build_app, routers_for
from fake_openai_server.api.connections import DISCARD_BYTES, LINGER
from fake_openai_server.api.errors import TEI_PATHS
from fake_openai_server.settings import Settings, near_misses
from tests.support.fakes import fake_plugin
from tests.support.live import LiveServer, free_port, serve_app

PUBLIC = {"/health", "/ready", "/ping"}
ENV_KEYS = ("sk-env-one", "sk-env-two")
FILE_KEYS = ("sk-file-three", "sk-file-four")
EMBED = {"input": "鍵のテスト"}
RANK = {"query": "鍵", "documents": ["鍵のテスト", "別"]}
# Azure OpenAI's path, its deployment a model served.
AZURE = "/openai/deployments/ruri-large/embeddings"
# A valid body for each route of the other APIs (the rest take EMBED or RANK).
BODIES: dict[str, dict[str, Any]] = {
    "/v1/embeddings": EMBED,
    "/embeddings": EMBED,
    "/": {"inputs": "鍵のテスト"},
    "/invocations": {"inputs": "鍵のテスト"},
    "/embed": {"inputs": "鍵のテスト"},
    "/similarity": {"inputs": {"source_sentence": "鍵", "sentences": ["鍵のテスト"]}},
    "/tokenize": {"inputs": "鍵のテスト"},
    "/decode": {"ids": [1, 2]},
    "/api/embed": {"input": "鍵のテスト"},
    "/api/embeddings": {"prompt": "鍵のテスト"},
    "/api/show": {"model": "ruri-large"},
    "/api/pull": {"model": "ruri-large"},
    "/v1/embed": {"texts": ["鍵のテスト"]},
    "/v2/embed": {"texts": ["鍵のテスト"], "input_type": "search_query"},
    AZURE: EMBED,
}


def _routes() -> list[tuple[str, str]]:
    """Every method and path the app serves, hidden aliases and the docs included."""
    app = build_app(Settings(service_type="all", warmup=False), fake_plugin())
    found = {("GET", getattr(r, "path", "")) for r in app.routes if getattr(r, "path", "")}
    routers = routers_for(Settings(service_type="all"))
    for router in routers:
        for route in router.routes:
            for method in getattr(route, "methods", ()):
                if method != "HEAD":
                    found.add((method, getattr(route, "path", "")))
    # A parameter in a path (Azure's deployment) filled in, as a client fills it.
    return sorted((method, re.sub(r"\{[^}]+\}", "ruri-large", path)) for method, path in found)


ROUTES = _routes()


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    text: str

    def json(self) -> dict[str, Any]:
        return cast(dict[str, Any], json.loads(self.text))


def _call(
    server: LiveServer,
    method: str,
    path: str,
    authorization: str | None,
    api_key: str | None = None,
) -> Reply:
    """http.client, not httpx: it sends header values as given ('Bearer ' with its space).
    ``api_key``: Azure OpenAI's header, sent as well if given."""
    host, port = server.address
    headers = {} if authorization is None else {"Authorization": authorization}
    if api_key is not None:
        headers["api-key"] = api_key
    body = None
    if method == "POST":
        body = json.dumps(BODIES.get(path, RANK)).encode()
        headers["Content-Type"] = "application/json"
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.putrequest(method, path)
        for name, value in headers.items():
            connection.putheader(name, value.encode("utf-8"))
        connection.putheader("Content-Length", str(len(body or b"")))
        connection.endheaders(body)
        response = connection.getresponse()
        text = response.read().decode("utf-8", "replace")
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, text)
    finally:
        connection.close()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """API_KEYS from the environment, plus API_KEYS_FILE (comments and blank lines skipped)."""
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# team keys\n\n{FILE_KEYS[0]}\n  {FILE_KEYS[1]}  \n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("API_KEYS", f"{ENV_KEYS[0]}, {ENV_KEYS[1]}")
        env.setenv("API_KEYS_FILE", str(keys_file))
        settings = Settings(service_type="all", warmup=False)
    assert sorted(settings.all_api_keys()) == sorted(ENV_KEYS + FILE_KEYS)
    with serve_app(build_app(settings, fake_plugin())) as server:
        yield server


def test_the_route_list_is_complete() -> None:
    paths = {path for _, path in ROUTES}
    assert {"/v1/embeddings", "/embeddings", "/v1/rerank", "/rerank", "/v1/v1/rerank"} <= paths
    assert {"/v2/rerank", "/v1/models", "/models", "/info", "/metrics", "/openapi.json"} <= paths
    assert {"/", "/invocations", "/embed", "/similarity", "/tokenize", "/decode"} <= paths
    assert "/info/quantization" in paths
    assert {"/api/embed", "/api/embeddings", "/api/tags", "/api/ps", "/api/version"} <= paths
    assert {"/api/show", "/api/pull"} <= paths
    assert {"/api/rerank", "/v1/embed", "/v2/embed", AZURE} <= paths
    assert paths >= PUBLIC


WRONG = [
    None,
    "",
    "Bearer ",
    "Bearer wrong",
    f"Bearer {ENV_KEYS[0][:-1]}",  # a prefix of a right key
    f"Bearer {ENV_KEYS[0]}x",
    f"Bearer {ENV_KEYS[0]} {ENV_KEYS[1]}",
    f"Basic {ENV_KEYS[0]}",
    f"Token {FILE_KEYS[0]}",
    "Bearer # team keys",  # a comment line of the file is not a key
    "Bearer \u00e9\u00e8",
]


def assert_unauthorized(path: str, body: dict[str, Any]) -> None:
    """The 401 in the error envelope of the route's own API."""
    if path.startswith("/api/"):  # Ollama
        assert set(body) == {"error"} and "API key" in body["error"], body
    elif path in TEI_PATHS:  # text-embeddings-inference
        assert body == {"error": body["error"], "error_type": "Unauthorized"}, body
        assert "API key" in body["error"]
    elif path in ("/v1/embed", "/v2/embed"):  # Cohere
        assert set(body) == {"id", "message"} and "API key" in body["message"], body
    else:
        error = body["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=lambda x: str(x))
def test_every_route_needs_a_right_key(keyed: LiveServer, method: str, path: str) -> None:
    for authorization in WRONG:
        reply = _call(keyed, method, path, authorization)
        if path in PUBLIC:
            assert reply.status_code == 200, (authorization, reply.text)
            continue
        assert reply.status_code == 401, (authorization, reply.status_code)
        assert_unauthorized(path, reply.json())
        assert reply.headers["x-request-id"]
        for key in ENV_KEYS + FILE_KEYS:
            assert key not in reply.text
    for key in ENV_KEYS + FILE_KEYS:
        # The key alone, without "Bearer ", counts too (as the README says).
        for authorization in (f"Bearer {key}", f"bearer {key}", f"BEARER  {key} ", key):
            reply = _call(keyed, method, path, authorization)
            assert reply.status_code == 200, (authorization, reply.text[:300])


@pytest.mark.parametrize("path", ["/v1/embeddings", AZURE, "/v1/rerank", "/info"])
def test_azure_openai_clients_send_their_key_as_api_key(keyed: LiveServer, path: str) -> None:
    """The openai SDK's AzureOpenAI and LangChain's AzureOpenAIEmbeddings send
    ``api-key: <key>`` and no Authorization: the key counts there too, on every route."""
    method = "GET" if path == "/info" else "POST"
    for key in ENV_KEYS + FILE_KEYS:
        assert _call(keyed, method, path, None, api_key=key).status_code == 200, key
        assert _call(keyed, method, path, "", api_key=f" {key} ").status_code == 200, key
    for wrong in ("", "wrong", f"Bearer {ENV_KEYS[0]}", ENV_KEYS[0][:-1], "# team keys"):
        reply = _call(keyed, method, path, None, api_key=wrong)
        assert reply.status_code == 401, wrong
        assert "'api-key: <key>'" in reply.json()["error"]["message"]
    # A wrong key in Authorization is not mended by a right one in api-key.
    assert _call(keyed, method, path, "Bearer wrong", api_key=ENV_KEYS[0]).status_code == 401


def test_head_needs_the_key_as_get_does_and_options_needs_none(keyed: LiveServer) -> None:
    """HEAD is GET without the body, key and all. OPTIONS says only which methods a path
    has: HAProxy's plain ``option httpchk`` and browsers' CORS preflights send no key."""
    for method, path in ROUTES:
        options = _call(keyed, "OPTIONS", path, None)
        assert options.status_code == 204, (path, options.text)
        assert method in options.headers["allow"].split(", "), (path, options.headers)
        if method != "GET":
            continue
        head = _call(keyed, "HEAD", path, None)
        assert head.status_code == (200 if path in PUBLIC else 401), path
        assert _call(keyed, "HEAD", path, f"Bearer {FILE_KEYS[0]}").status_code == 200, path
    # Nothing about unknown paths is told without a key.
    assert _call(keyed, "OPTIONS", "/v1/secret-admin", None).status_code == 401


def test_unknown_routes_need_a_key_too(keyed: LiveServer) -> None:
    """Without a key nothing about the routes is told: 401, not 404."""
    assert _call(keyed, "GET", "/v1/secret-admin", None).status_code == 401
    assert _call(keyed, "GET", "/v1/secret-admin", f"Bearer {ENV_KEYS[1]}").status_code == 404


def test_a_refused_body_is_not_read_on(keyed: LiveServer) -> None:
    """A request without a key is answered 401 from its headers; the body it goes on
    sending is not read to its end. uvicorn had kept the connection and read on to drop
    it (7 GB of a chunked body in 8 s from a client without a key, a core busy). Now it
    drops at most DISCARD_BYTES of it, then ends its side and closes, lingering."""
    piece = b" " * 65536
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    with keyed.connect() as sock:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        reply, ended, closed_after = b"", False, None
        started = time.monotonic()
        while time.monotonic() - started < LINGER + 8:
            try:
                sock.sendall(chunk)
            except OSError:  # reset or broken pipe: the server has closed
                closed_after = time.monotonic() - started
                break
            while not ended and select.select([sock], [], [], 0)[0]:
                data = sock.recv(65536)
                reply += data
                ended = not data
    assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]
    assert b"API key" in reply
    assert ended, "the server kept reading the body it had refused"
    assert closed_after is not None and closed_after < LINGER + 4, closed_after


def test_a_refused_request_whose_body_is_in_keeps_its_connection(keyed: LiveServer) -> None:
    """A 401 for a request sent whole leaves the connection open for the next one."""
    connection = http.client.HTTPConnection(*keyed.address, timeout=30)
    sockets = []
    try:
        for authorization in ("Bearer wrong", f"Bearer {ENV_KEYS[0]}"):
            connection.request(
                "POST",
                "/v1/embeddings",
                json.dumps(EMBED).encode(),
                {"Authorization": authorization, "Content-Type": "application/json"},
            )
            reply = connection.getresponse()
            reply.read()
            assert reply.status == (401 if authorization == "Bearer wrong" else 200)
            assert reply.getheader("connection") != "close"
            sockets.append(connection.sock)
    finally:
        connection.close()
    assert sockets[0] is sockets[1] is not None  # one connection served both


def _keyless_head(length: int) -> bytes:
    return (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )


def _read_reply(sock: Any) -> int:
    return _read_reply_and_connection(sock)[0]


def _read_reply_and_connection(sock: Any) -> tuple[int, str | None]:
    reply = http.client.HTTPResponse(sock)
    reply.begin()
    reply.read()
    return reply.status, reply.getheader("connection")


def test_a_connection_drops_at_most_so_much_of_refused_bodies(keyed: LiveServer) -> None:
    """DISCARD_BYTES bounds a connection, not a request: body after refused body, each
    under the bound, had kept one connection reading (an audit: 900 MiB in 1.7 s). The
    reply whose body takes the connection over the bound says so (connection: close):
    without a word, a client had sent its next request on it, and lost it unanswered."""
    size = DISCARD_BYTES // 3 + 1  # the third body takes the connection over the bound
    with keyed.connect(timeout=30) as sock:
        for expected in (None, None, "close"):
            sock.sendall(_keyless_head(size))
            # From the headers, before the body.
            assert _read_reply_and_connection(sock) == (401, expected)
            sock.sendall(b" " * size)
        sock.sendall(_keyless_head(2))  # dropped: the server has ended its side
        sock.settimeout(LINGER + 5)
        assert sock.recv(65536) == b"", "still open after three bodies"


def test_a_pooled_client_loses_no_request_after_oversized_bodies(keyed: LiveServer) -> None:
    """httpx on one pooled connection, a body over MAX_REQUEST_BYTES (413), then a valid
    request, again and again: every request is answered. The valid request after the
    second oversized body had often gone into the drop of a connection the server was
    closing, unanswered (RemoteProtocolError: 1, 5 and 10 times in 30 rounds)."""
    big = b'{"input": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    headers = {"Authorization": f"Bearer {ENV_KEYS[0]}", "Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=1)
    with keyed.client(limits=limits) as client:
        for _ in range(12):
            assert client.post("/v1/embeddings", content=big, headers=headers).status_code == 413
            reply = client.post("/v1/embeddings", json=EMBED, headers=headers)
            assert reply.status_code == 200, reply.text[:300]


def test_a_refused_body_just_under_the_bound_keeps_the_connection(keyed: LiveServer) -> None:
    """The next request's bytes are not the last one's body: they had been counted as
    such (uvicorn leaves ``more_body`` set once the reply is out), and a request after a
    body just under DISCARD_BYTES was lost with the connection, without a reply."""
    size = DISCARD_BYTES - 10
    body = json.dumps(EMBED).encode()
    with keyed.connect(timeout=30) as sock:
        sock.sendall(_keyless_head(size))
        assert _read_reply(sock) == 401
        sock.sendall(b" " * size)
        time.sleep(0.5)  # the body read and dropped: the next request comes on its own
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
            % (ENV_KEYS[0].encode(), len(body), body)
        )
        assert _read_reply(sock) == 200


def test_a_lingering_close_waits_while_bytes_come_and_no_longer_than_its_bound(
    keyed: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past DISCARD_BYTES the server ends its side and reads on while the client keeps
    sending, so that a client on a slow link reads its 401 rather than a reset; but not
    for ever: LINGER_MOST (here 3 s, LINGER 1 s) after it began, the connection closes
    however the client trickles."""
    monkeypatch.setattr(connections, "LINGER", 1.0)
    monkeypatch.setattr(connections, "LINGER_MOST", 3.0)
    size = DISCARD_BYTES + 64 * 1024 * 1024
    with keyed.connect(timeout=30) as sock:
        sock.sendall(_keyless_head(size))
        assert _read_reply(sock) == 401
        sock.sendall(b" " * (DISCARD_BYTES + 1024 * 1024))  # the lingering begins
        began, closed_after = time.monotonic(), None
        while time.monotonic() - began < 10:
            time.sleep(0.4)  # never LINGER without a byte
            try:
                sock.sendall(b" " * 1024)
            except OSError:  # reset or broken pipe: closed
                closed_after = time.monotonic() - began
                break
    assert closed_after is not None, "the trickle kept the connection open"
    assert 2.4 < closed_after < 5, closed_after  # after LINGER_MOST, not after LINGER


@pytest.fixture(scope="module")
def open_server() -> Iterator[LiveServer]:
    with serve_app(build_app(Settings(service_type="all", warmup=False), fake_plugin())) as server:
        yield server


@pytest.mark.parametrize("authorization", [None, "", "Bearer ", "Bearer sk-anything", "junk"])
def test_without_keys_any_authorization_is_accepted(
    open_server: LiveServer, authorization: str | None
) -> None:
    """Dify sends an empty header and Open WebUI 'Bearer ' when the user set no key."""
    for method, path in ROUTES:
        reply = _call(open_server, method, path, authorization)
        assert reply.status_code == 200, (method, path, reply.text[:300])


def test_an_unreadable_keys_file_is_refused_at_start_up(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-keys.txt"
    done = subprocess.run(
        [sys.executable, "-m", "fake_openai_server"],
        env={**os.environ, "API_KEYS_FILE": str(missing)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "API_KEYS_FILE" in done.stderr and str(missing) in done.stderr


def test_the_keys_file_is_read_as_editors_write_it(tmp_path: Path) -> None:
    """A byte-order mark (Windows Notepad, PowerShell's UTF8) is not part of the first
    key, and an indented comment is a comment: it had been a key that let its own text in."""
    keys_file = tmp_path / "keys.txt"
    keys_file.write_bytes(
        "sk-first\r\n  # old: sk-retired\r\n\r\n sk-second \r\n".encode("utf-8-sig")
    )
    settings = Settings(api_keys_file=keys_file)
    assert settings.all_api_keys() == ["sk-first", "sk-second"]


def test_a_keys_file_without_keys_is_a_warning(tmp_path: Path) -> None:
    """A keys file of comments only leaves every route open (Kubernetes' base ships it
    so); a file not filled yet looks the same, and had been said only at INFO. (No model
    to load here: the start-up log, up to the warning, is all this reads.)"""
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# keys are added by the deploy job\n\n", encoding="utf-8")
    env = {"API_KEYS_FILE": str(keys_file), "LOG_LEVEL": "warning", "HF_HUB_OFFLINE": "1"}
    env |= {"HF_HOME": str(tmp_path / "hf"), "PORT": str(free_port()), "HOST": "127.0.0.1"}
    warning = re.compile(r"WARNING .*API keys: none in API_KEYS_FILE=.*every route is open")
    seen = []
    with subprocess.Popen(
        [sys.executable, "-m", "fake_openai_server"],
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stderr is not None
            for line in process.stderr:  # the start-up log, up to the warning
                seen.append(line)
                if warning.search(line) or "ready" in line:
                    break
        finally:
            process.kill()
    assert warning.search(seen[-1] if seen else ""), "".join(seen)[-2000:]


@pytest.mark.parametrize(
    ("env", "file"), [({"API_KEYS": "sk-ok,ключ"}, ""), ({}, "sk-ok\nsk-tab\there\n")]
)
def test_a_key_no_client_could_send_is_refused_at_start_up(
    tmp_path: Path, env: dict[str, str], file: str
) -> None:
    """HTTP headers carry ASCII: a key with other characters had been accepted and had
    locked every client out with 401."""
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(file, encoding="utf-8")
    more = {"API_KEYS_FILE": str(keys_file)} if file else {}
    done = subprocess.run(
        [sys.executable, "-m", "fake_openai_server"],
        env={**os.environ, **env, **more},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "printable ASCII" in done.stderr and "API key 2 of 2" in done.stderr, done.stderr
    assert "ключ" not in done.stderr and "sk-ok" not in done.stderr  # keys are not echoed


def test_near_misses_of_settings_are_named() -> None:
    """A misspelt API_KEYS is ignored like any unknown variable, and left every route open
    without a word; the CLI now warns of variables that nearly spell a setting."""
    environ = {"API_KEY": "x", "EMBEDDING_MODEL": "x", "API_KEYS_FILE": "x", "HOSTNAME": "x"}
    environ |= {"PATH": "x", "HF_HOME": "x", "NVIDIA_VISIBLE_DEVICES": "x", "api_keys": "x"}
    environ |= {"CORS_ALLOW_ORIGIN": "x"}  # TEI's flag is --cors-allow-origin
    assert near_misses(environ) == [
        ("API_KEY", "API_KEYS"),
        ("EMBEDDING_MODEL", "EMBEDDINGS_MODEL"),
        ("CORS_ALLOW_ORIGIN", "CORS_ALLOW_ORIGINS"),
    ]


def test_keys_may_be_a_json_list_as_help_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--help`` writes the type ``list[str]``: split at its commas, ``["a","b"]`` had
    given the keys ``["a"`` and ``"b"]``, and neither key the user meant worked."""
    monkeypatch.setenv("API_KEYS", '["sk-one", " sk-two "]')
    assert Settings().all_api_keys() == ["sk-one", "sk-two"]
    monkeypatch.setenv("API_KEYS", "sk-one, sk-two,")
    assert Settings().all_api_keys() == ["sk-one", "sk-two"]


def test_an_empty_keys_file_setting_is_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """``API_KEYS_FILE=`` (a compose file's ``${API_KEYS_FILE:-}``) is its default, no
    file; it had been read as the directory ``.`` and refused."""
    monkeypatch.setenv("API_KEYS_FILE", "")
    assert Settings().api_keys_file is None
