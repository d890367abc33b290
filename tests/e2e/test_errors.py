"""The other routes (/v1/models, /health, /ready, /info, /metrics) and the error
envelope on every kind of failure: validation, unknown route, wrong method,
invalid JSON, not ready, and 500s that never carry an exception's text."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fake_openai_server.api.app import build_app
from fake_openai_server.backends.base import Plugin
from fake_openai_server.settings import Settings
from tests.support.contract import EMBEDDINGS_MODEL, RERANKER_MODEL, assert_error
from tests.support.fakes import SECRET, fake_plugin
from tests.support.live import LiveServer, serve_app, wait_ready

# --- /v1/models -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/models", "/models"])
def test_models_list_in_openai_format(fake_server: LiveServer, path: str) -> None:
    with fake_server.client() as client:
        reply = client.get(path)
    assert reply.status_code == 200
    body = reply.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [EMBEDDINGS_MODEL, RERANKER_MODEL]
    for card in body["data"]:
        assert set(card) == {"id", "object", "created", "owned_by"}
        assert card["object"] == "model"
        assert isinstance(card["created"], int) and card["created"] > 1_600_000_000
        assert isinstance(card["owned_by"], str) and card["owned_by"]


def test_models_list_names_only_what_the_service_serves(
    embeddings_server: LiveServer, rerank_server: LiveServer
) -> None:
    with embeddings_server.client() as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [EMBEDDINGS_MODEL]
    with rerank_server.client() as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [RERANKER_MODEL]


def test_embeddings_service_has_no_rerank_route_and_vice_versa(
    embeddings_server: LiveServer, rerank_server: LiveServer
) -> None:
    with embeddings_server.client() as client:
        reply = client.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
        assert_error(reply, 404, code="not_found")
    with rerank_server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": "a"})
        assert_error(reply, 404, code="not_found")


# The README's two-port setup (8081 embeddings, 8082 rerank): the URL of one service in
# the other's field is the commonest mistake, and the 404 says so (it had said only "No
# route", and for n8n's /v1/v1/rerank, wrongly, that the base URL had /v1 twice).
RERANK_ELSEWHERE = ("SERVICE_TYPE=embeddings", "SERVICE_TYPE=reranker", "8082", "SERVICE_TYPE=all")
EMBED_ELSEWHERE = ("SERVICE_TYPE=reranker", "SERVICE_TYPE=embeddings", "8081", "SERVICE_TYPE=all")


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank", "/v1/v1/rerank"])
def test_rerank_sent_to_the_embeddings_service_says_where_rerank_is(
    embeddings_server: LiveServer, path: str
) -> None:
    with embeddings_server.client() as client:
        reply = client.post(path, json={"query": "q", "documents": ["d"]})
    error = assert_error(reply, 404, code="not_found", contains=RERANK_ELSEWHERE)
    assert "/v1 twice" not in error["message"]


@pytest.mark.parametrize(
    "path", ["/v1/embeddings", "/embeddings", "/embed", "/v1/embed", "/v2/embed"]
)
def test_embeddings_sent_to_the_rerank_service_say_where_embeddings_are(
    rerank_server: LiveServer, path: str
) -> None:
    with rerank_server.client() as client:
        reply = client.post(path, json={"input": "a"})
    assert reply.status_code == 404, reply.text
    for part in EMBED_ELSEWHERE:
        assert part in reply.text, reply.text


@pytest.mark.parametrize(
    ("server", "path", "elsewhere", "also"),
    [
        ("embeddings", "/v1/rerank/", RERANK_ELSEWHERE, "trailing slash"),
        ("embeddings", "/api/rerank/", RERANK_ELSEWHERE, "trailing slash"),
        ("rerank", "/v1/embeddings/", EMBED_ELSEWHERE, "trailing slash"),
        ("rerank", "/v1/v1/embeddings", EMBED_ELSEWHERE, "/v1 twice"),
        ("rerank", "/v1/v1/embeddings/", EMBED_ELSEWHERE, "trailing slash"),
    ],
)
def test_the_other_services_path_misspelt_is_not_sent_to_a_route_missing_here(
    request: pytest.FixtureRequest, server: str, path: str, elsewhere: tuple[str, ...], also: str
) -> None:
    """The 404's trailing-slash and /v1-twice hints had sent a client at the wrong service
    to the spelling this server has no route for either ("Leave out the trailing slash:
    /v1/rerank" on the embedder), and said nothing of the other service."""
    live: LiveServer = request.getfixturevalue(f"{server}_server")
    with live.client() as client:
        reply = client.post(path, json={"input": "a", "query": "q", "documents": ["d"]})
    assert reply.status_code == 404, reply.text
    for part in (*elsewhere, also):
        assert part in reply.text, reply.text


def test_a_misspelt_path_of_this_service_keeps_its_own_hint(
    embeddings_server: LiveServer,
) -> None:
    with embeddings_server.client() as client:
        reply = client.post("/v1/embeddings/", json={"input": "a"})
        assert reply.status_code == 404 and "trailing slash: /v1/embeddings" in reply.text
        assert "SERVICE_TYPE" not in reply.text
        reply = client.post("/v1/v1/embeddings", json={"input": "a"})
        assert reply.status_code == 404 and "/v1 twice" in reply.text
        assert "SERVICE_TYPE" not in reply.text
        reply = client.post("/v1/rerankx", json={"input": "a"})
        assert reply.status_code == 404 and "SERVICE_TYPE" not in reply.text


def test_sdks_pointed_at_the_wrong_service_are_told_which_is_right(
    embeddings_server: LiveServer, rerank_server: LiveServer
) -> None:
    """The openai SDK at the reranker's URL, the cohere SDK at the embedder's."""
    import cohere
    import openai

    client = openai.OpenAI(base_url=f"{rerank_server.base_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model=EMBEDDINGS_MODEL, input="東京")
    assert all(part in missing.value.message for part in EMBED_ELSEWHERE), missing.value.message
    v2 = cohere.ClientV2(base_url=embeddings_server.base_url, api_key="x")
    with pytest.raises(cohere.errors.NotFoundError) as gone:
        v2.rerank(model=RERANKER_MODEL, query="q", documents=["d"])
    assert "SERVICE_TYPE=reranker" in str(gone.value.body)
    with embeddings_server.client() as http:  # Ollama's client reads error as a string
        reply = http.post(
            "/api/rerank", json={"model": RERANKER_MODEL, "query": "q", "documents": ["d"]}
        )
    assert reply.status_code == 404 and "SERVICE_TYPE=reranker" in reply.json()["error"]


# --- probes, /info, /metrics -------------------------------------------------------------


def test_health_and_ready(fake_server: LiveServer) -> None:
    with fake_server.client() as client:
        health = client.get("/health")
        ready = client.get("/ready")
        # Some load balancers and uptime monitors probe with HEAD.
        heads = [client.head(path) for path in ("/health", "/ready")]
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert [(head.status_code, head.content) for head in heads] == [(200, b""), (200, b"")]


def _raw_reply(server: LiveServer, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """The status line, headers and body of the one reply to ``request`` (the server
    closes: HTTP/1.0)."""
    with server.connect() as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (x.partition(":") for x in lines)}
    return status, headers, body


@pytest.mark.parametrize(
    "path",
    [
        *("/v1/models", "/models", "/info", "/info/quantization"),
        *("/api/tags", "/api/ps", "/api/version"),
    ],
)
def test_every_get_route_answers_head(fake_server: LiveServer, path: str) -> None:
    """Uptime monitors, ``wget --spider`` and HAProxy's ``option httpchk HEAD`` probe with
    HEAD; FastAPI's GET routes had answered 405."""
    with fake_server.client() as client:
        get = client.get(path)
        head = client.head(path)
    assert get.status_code == 200
    assert head.status_code == 200, head.text
    assert head.content == b""
    if path == "/info":
        # Its counters (uptime, engine seconds) move between the two calls: their
        # digits, not the shape of the reply.
        assert abs(int(head.headers["content-length"]) - len(get.content)) < 64
    else:
        assert head.headers["content-length"] == str(len(get.content))
    assert head.headers["content-type"] == get.headers["content-type"]


def test_options_lists_a_paths_methods(fake_server: LiveServer) -> None:
    """HAProxy's plain ``option httpchk`` sends ``OPTIONS / HTTP/1.0`` and wants a 2xx."""
    status, headers, body = _raw_reply(fake_server, b"OPTIONS / HTTP/1.0\r\n\r\n")
    assert status.split()[1] == "204", status
    assert headers["allow"] == "GET, HEAD, OPTIONS, POST"  # Ollama's GET /, TEI's POST /
    assert body == b""
    with fake_server.client() as client:
        health = client.options("/health")
        embeddings = client.options("/v1/embeddings")
        nowhere = client.options("/v1/nowhere")
    assert (health.status_code, health.headers["allow"]) == (204, "GET, HEAD, OPTIONS")
    assert (embeddings.status_code, embeddings.headers["allow"]) == (204, "OPTIONS, POST")
    assert_error(nowhere, 404, code="not_found")


def test_ollamas_root_says_it_is_running(fake_server: LiveServer) -> None:
    """Ollama's CLI and browser extensions probe its root (HEAD or GET)."""
    with fake_server.client() as client:
        get = client.get("/")
        head = client.head("/")
    assert (get.status_code, get.text) == (200, "Ollama is running")
    assert get.headers["content-type"].startswith("text/plain")
    assert (head.status_code, head.content) == (200, b"")


def test_repeated_slashes_count_as_one(fake_server: LiveServer) -> None:
    """A base URL pasted with a trailing slash, joined by a client that adds
    ``/v1/embeddings``, asks for ``//v1/embeddings`` (nginx merges the slashes too)."""
    with fake_server.client() as client:
        replies = [
            client.post(fake_server.base_url + path, json={"input": ["a", "b"]})
            for path in ("//v1/embeddings", "/v1//embeddings", "///embeddings")
        ]
        twice = client.post("/v1/v1/embeddings", json={"input": "a"})
        direct = client.post("/v1/embeddings", json={"input": ["a", "b"]})
    for reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.json()["data"] == direct.json()["data"]
    error = assert_error(twice, 404, code="not_found")
    assert "/v1 twice" in str(error["message"])


def test_info_publishes_models_and_limits(embeddings_server: LiveServer, hf_home: Path) -> None:
    with embeddings_server.client() as client:
        info = client.get("/info").json()
    assert info["service_type"] == "embeddings"
    assert info["state"] == "ready"
    assert isinstance(info["version"], str) and info["version"]
    model = info["models"][EMBEDDINGS_MODEL]
    # The Hub commit its files are from, as the cache names it (TEI's model_sha too): a
    # model updated on the Hub serves other vectors under the same name.
    cached = hf_home / "hub" / f"models--{EMBEDDINGS_MODEL.replace('/', '--')}"
    commit = (cached / "refs" / "main").read_text().strip()
    assert model["revision"] == info["model_sha"] == commit
    assert model["dimension"] == 64
    assert model["max_length"] == 512
    assert model["dtype"] == "float32"
    assert model["device"] == "cpu"
    limits = info["limits"]
    for key in ("max_request_bytes", "max_inputs", "max_input_chars", "max_request_tokens"):
        assert isinstance(limits[key], int) and limits[key] > 0


def test_metrics_in_prometheus_text(fake_server: LiveServer) -> None:
    with fake_server.client() as client:
        assert client.post("/v1/embeddings", json={"input": "東京"}).status_code == 200
        assert client.post("/v1/embeddings", json={"input": ""}).status_code == 400
        reply = client.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    text = reply.text
    assert "# HELP fos_requests_total" in text
    assert "# TYPE fos_requests_total counter" in text
    assert 'fos_requests_total{route="/v1/embeddings",status="200"}' in text
    assert 'fos_requests_total{route="/v1/embeddings",status="400"}' in text
    assert "fos_batch_items_bucket" in text
    from prometheus_client.parser import text_string_to_metric_families

    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"fos_requests", "fos_request_seconds", "fos_batch_items"} <= names
    assert "東京" not in text


# --- error envelope everywhere -----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nope"),
        ("POST", "/v1/nope"),
        ("GET", "/v1/embeddings/extra"),
        ("GET", "/v3/rerank"),
    ],
)
def test_unknown_route_is_404_envelope(fake_server: LiveServer, method: str, path: str) -> None:
    with fake_server.client() as client:
        reply = client.request(method, path, json={} if method == "POST" else None)
    assert_error(reply, 404, code="not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/embeddings"),
        ("GET", "/embeddings"),
        ("GET", "/v1/rerank"),
        ("PUT", "/v2/rerank"),
        ("DELETE", "/health"),
        ("POST", "/v1/models"),
        ("POST", "/ready"),
    ],
)
def test_wrong_method_is_405_envelope(fake_server: LiveServer, method: str, path: str) -> None:
    with fake_server.client() as client:
        reply = client.request(method, path)
    assert_error(reply, 405, code="method_not_allowed")
    assert reply.headers["allow"]


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/rerank", "/v2/rerank", "/rerank"])
@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"input": "a",}', b"", b"[1, 2]", b'"text"', b"null", b"\xff\xfe"],
    ids=repr,
)
def test_invalid_json_is_400_envelope(fake_server: LiveServer, path: str, content: bytes) -> None:
    with fake_server.client() as client:
        reply = client.post(path, content=content, headers={"content-type": "application/json"})
    assert_error(reply, 400)


def test_json_without_content_type_is_accepted(fake_server: LiveServer) -> None:
    """curl -d sends application/x-www-form-urlencoded; the body is JSON all the same."""
    with fake_server.client() as client:
        reply = client.post(
            "/v1/embeddings",
            content=b'{"input": "a"}',
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert reply.status_code == 200, reply.text


def test_validation_error_names_the_field(fake_server: LiveServer) -> None:
    with fake_server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": "a", "model": 123})
    assert_error(reply, 400, param="model", contains="model")


def test_huge_invalid_value_is_not_echoed_whole(fake_server: LiveServer) -> None:
    with fake_server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": "a", "model": "x" * 100_000})
    error = assert_error(reply, 404, code="model_not_found")
    assert len(reply.content) < 2_000, error


# --- not ready ---------------------------------------------------------------------------


def gated_plugin(gate: Path, fail: bool = False) -> Plugin:
    """Fakes whose loading waits until ``gate`` exists, then fails if asked to."""
    return fake_plugin(load_gate=str(gate), load_error=f"cannot open {SECRET}" if fail else "")


def test_ready_is_503_while_loading_then_200(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    app = build_app(Settings(service_type="all", warmup=False), gated_plugin(gate))
    try:
        with serve_app(app, wait=False) as server, server.client() as client:
            ready = client.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["status"] == "loading"
            assert client.get("/health").status_code == 200
            # SageMaker sends /invocations once /ping is 200 (TEI's name for /ready).
            ping = client.get("/ping")
            assert (ping.status_code, ping.json()) == (503, ready.json())
            for path, body in [
                ("/v1/embeddings", {"input": "a"}),
                ("/v1/rerank", {"query": "q", "documents": ["d"]}),
            ]:
                reply = client.post(path, json=body)
                assert_error(reply, 503, code="model_not_ready")
                assert reply.headers["retry-after"].isdigit()
            gate.touch()
            wait_ready(server.base_url, timeout=30)
            assert client.post("/v1/embeddings", json={"input": "a"}).status_code == 200
            assert client.get("/ping").json() == {"status": "ready"}
    finally:
        gate.touch()


def test_failed_loading_is_503_without_the_exception_text(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    app = build_app(Settings(service_type="all", warmup=False), gated_plugin(gate, fail=True))
    with serve_app(app, wait=False) as server, server.client() as client:
        for _ in range(100):
            ready = client.get("/ready")
            if ready.json()["status"] != "loading":
                break
            time.sleep(0.05)
        assert ready.status_code == 503
        assert ready.json()["status"] == "failed"
        assert "secret" not in ready.text
        reply = client.post("/v1/embeddings", json={"input": "a"})
        assert_error(reply, 503)
        assert "secret" not in reply.text


# --- 500s ----------------------------------------------------------------------------------


def exploding_plugin(where: str) -> Plugin:
    """ "boom" makes the tokenizer raise, the model raise or return NaN; rerank always raises."""
    if where == "tokenize":
        return fake_plugin(tokenizer_raise="b", model_raise_rerank=True)
    fault = "raise" if where == "embed" else "nan"
    return fake_plugin(triggers={"b": fault}, model_raise_rerank=True)


@pytest.mark.parametrize("where", ["tokenize", "embed", "nan"])
def test_500_never_carries_exception_text(where: str) -> None:
    app = build_app(Settings(service_type="all", warmup=False), exploding_plugin(where))
    with serve_app(app) as server, server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": "boom"})
        error = assert_error(reply, 500)
        assert error["type"] == "server_error"
        assert "secret" not in reply.text and "/home" not in reply.text
        assert "RuntimeError: " not in reply.text
        rerank = client.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
        assert_error(rerank, 500)
        assert "secret" not in rerank.text
        # The server keeps serving.
        assert client.post("/v1/embeddings", json={"input": "all fine"}).status_code == 200
        assert client.get("/health").status_code == 200


def test_error_replies_carry_a_request_id(fake_server: LiveServer) -> None:
    with fake_server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": ""})
        mine = client.post("/v1/embeddings", json={"input": ""}, headers={"x-request-id": "abc-1"})
    assert reply.headers["x-request-id"]
    assert mine.headers["x-request-id"] == "abc-1"
