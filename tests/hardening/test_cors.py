"""CORS (CORS_ALLOW_ORIGINS): what a browser page on another origin sends and reads.

A page's ``fetch`` with an ``Authorization`` header first sends a preflight (OPTIONS, no
key) and goes on only if the reply allows its origin, method and headers; then it reads
a reply, errors included, only if that reply names its origin too. Raw HTTP, as the
browser writes it.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from fake_openai_server.api.app import build_app
from fake_openai_server.cli import load_settings
from fake_openai_server.settings import Settings
from tests.support.fakes import fake_plugin
from tests.support.live import LiveServer, serve_app

PAGE = "https://app.example.com"
KEY = "sk-cors"
BODY = json.dumps({"input": "ブラウザーから", "model": "cl-nagoya/ruri-large"}).encode()


def _send(
    server: LiveServer, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    host, port = server.address
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.request(method, path, body=body or None, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def _preflight(server: LiveServer, origin: str, **more: str) -> tuple[int, dict[str, str]]:
    status, headers, _ = _send(
        server,
        "OPTIONS",
        "/v1/embeddings",
        {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
            **more,
        },
    )
    return status, headers


def _post(server: LiveServer, origin: str, key: str | None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Origin": origin, "Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return _send(server, "POST", "/v1/embeddings", headers, BODY)


@pytest.fixture(scope="module")
def cors_server() -> Iterator[LiveServer]:
    settings = Settings(
        service_type="embeddings",
        warmup=False,
        api_keys=[KEY],
        cors_allow_origins=f"{PAGE}, http://localhost:3000",
    )
    with serve_app(build_app(settings, fake_plugin())) as server:
        yield server


def test_a_listed_page_passes_the_preflight_without_a_key(cors_server: LiveServer) -> None:
    status, headers = _preflight(
        cors_server, PAGE, **{"Access-Control-Request-Private-Network": "true"}
    )
    assert status == 200
    assert headers["access-control-allow-origin"] == PAGE
    assert "POST" in headers["access-control-allow-methods"]
    # The SDKs' own headers too (the openai SDK in a browser sends x-stainless-*).
    allowed = {h.strip() for h in headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "x-stainless-os"} <= allowed
    # Chrome: a public page reaching a server on a private address asks for this.
    assert headers["access-control-allow-private-network"] == "true"


def test_a_listed_page_reads_its_vectors_and_its_errors(cors_server: LiveServer) -> None:
    status, headers, body = _post(cors_server, PAGE, KEY)
    assert status == 200, body[:300]
    assert headers["access-control-allow-origin"] == PAGE
    assert "Origin" in headers["vary"]
    exposed = headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed and "retry-after" in exposed
    assert len(json.loads(body)["data"][0]["embedding"]) > 0
    # Without its key: the 401 carries the headers, so the page can show why.
    status, headers, body = _post(cors_server, "http://localhost:3000", None)
    assert status == 401
    assert headers["access-control-allow-origin"] == "http://localhost:3000"
    assert json.loads(body)["error"]["code"] == "invalid_api_key"


def test_a_page_not_listed_is_refused(cors_server: LiveServer) -> None:
    status, _ = _preflight(cors_server, "https://evil.example.net")
    assert status == 400
    status, headers, _ = _post(cors_server, "https://evil.example.net", KEY)
    # Served (a server cannot tell a page from a script that sets Origin), but a browser
    # keeps the reply from the page: no Access-Control-Allow-Origin.
    assert status == 200
    assert "access-control-allow-origin" not in headers


def test_any_origin_with_a_star() -> None:
    settings = Settings(service_type="embeddings", warmup=False, cors_allow_origins="*")
    with serve_app(build_app(settings, fake_plugin())) as server:
        status, headers = _preflight(server, "http://10.0.0.5:8080")
        assert (status, headers["access-control-allow-origin"]) == (200, "*")
        status, headers, _ = _post(server, "http://10.0.0.5:8080", None)
        assert (status, headers["access-control-allow-origin"]) == (200, "*")


def test_without_the_setting_no_cors_headers() -> None:
    """The default: a preflight gets OPTIONS' plain 204, which a browser takes as a no."""
    settings = Settings(service_type="embeddings", warmup=False)
    with serve_app(build_app(settings, fake_plugin())) as server:
        status, headers = _preflight(server, PAGE)
        assert status == 204
        assert not any(name.startswith("access-control-") for name in headers)
        status, headers, _ = _post(server, PAGE, None)
        assert status == 200 and "access-control-allow-origin" not in headers


@pytest.mark.parametrize(
    "origin",
    ["https://app.example.com/", "app.example.com", "https://app.example.com/path", "ftp://x.y"],
)
def test_an_origin_no_browser_sends_is_refused(
    origin: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Browsers send scheme://host[:port] and nothing more: a trailing slash (as a URL
    is often pasted) would never match, and CORS would fail with no word why."""
    monkeypatch.setenv("CORS_ALLOW_ORIGINS", f"http://localhost:3000,{origin}")
    with pytest.raises(SystemExit) as stopped:
        load_settings([])
    assert stopped.value.code == 2
    assert f"CORS_ALLOW_ORIGINS: {origin!r} is not an origin" in capsys.readouterr().err


def test_origins_are_compared_as_browsers_write_them() -> None:
    settings = Settings(cors_allow_origins="HTTPS://App.Example.com, http://localhost:3000")
    assert settings.cors_allow_origins == ["https://app.example.com", "http://localhost:3000"]
