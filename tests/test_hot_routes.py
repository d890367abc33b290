"""The hot routes (``api/hot.py``): the busiest endpoints answered without FastAPI's
per-request machinery, with nothing a client can see changed.

- which routes are hot, and what a hot endpoint must look like;
- over a real socket, a hot route and its cold twin (the same endpoint, reached only
  through FastAPI) give the same reply for good bodies, bad bodies and endpoint errors,
  and only the good bodies skip FastAPI;
- the body parse: whatever pydantic's JSON parser accepts, FastAPI's path (``json.loads``
  then validation) accepts too, with the same values. A body it does not accept goes on
  to FastAPI, so this is the one property the shortcut rests on.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError
from starlette.responses import Response

from fake_openai_server.api import middleware
from fake_openai_server.api.app import build_app, routers_for
from fake_openai_server.api.compat_schemas import (
    CohereEmbedRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaRerankRequest,
    TeiEmbedRequest,
)
from fake_openai_server.api.errors import install_error_handlers
from fake_openai_server.api.hot import hot, hot_routes, parsed_body
from fake_openai_server.api.schemas import EmbeddingsRequest, RerankRequest
from fake_openai_server.errors import ErrorKind, ServiceError
from fake_openai_server.metrics import Metrics
from fake_openai_server.settings import Settings
from tests.support.fakes import fake_plugin
from tests.support.live import serve_app


def test_the_routes_every_client_calls_are_hot() -> None:
    def hot_paths(service_type: str) -> set[str]:
        return set(hot_routes(routers_for(Settings(service_type=service_type))))

    assert hot_paths("embeddings") == {
        *("/v1/embeddings", "/embeddings"),  # OpenAI (Dify, Open WebUI, LangChain, n8n, ...)
        *("/api/embed", "/api/embeddings"),  # Ollama (Dify's and Open WebUI's Ollama)
        "/embed",  # TEI
        *("/v1/embed", "/v2/embed"),  # Cohere
    }
    assert hot_paths("reranker") == {"/v1/rerank", "/v1/v1/rerank", "/v2/rerank", "/api/rerank"}
    assert hot_paths("all") == hot_paths("embeddings") | hot_paths("reranker")


def test_a_hot_endpoint_must_take_a_body_model_and_the_request() -> None:
    router = APIRouter()

    @router.post("/a")
    @hot
    async def wrong_names(payload: EmbeddingsRequest, request: Request) -> Response:
        return Response()

    with pytest.raises(TypeError, match="must take"):
        hot_routes([router])

    router = APIRouter()

    async def needs_something() -> None:
        return None

    @router.post("/b", dependencies=[Depends(needs_something)])
    @hot
    async def with_dependency(body: EmbeddingsRequest, request: Request) -> Response:
        return Response()

    with pytest.raises(TypeError, match="dependencies"):
        hot_routes([router])


# --- a hot route and its cold twin over a real socket ----------------------------------
class Echo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: StrictStr
    times: int = 1


async def _echo(body: Echo, request: Request) -> Response:
    if body.text == "refuse":
        raise ServiceError(ErrorKind.INVALID_REQUEST, "Refused.", param="text")
    if body.text == "crash":
        raise RuntimeError("a bug")
    # Starlette's router puts the endpoint in the scope: only FastAPI's path has it.
    via = "fastapi" if "endpoint" in request.scope else "hot"
    return Response(json.dumps({"echo": body.text * body.times, "via": via}))


def _twin_app() -> FastAPI:
    router = APIRouter()

    @router.post("/hot")
    @hot
    async def hot_echo(body: Echo, request: Request) -> Response:
        return await _echo(body, request)

    @router.post("/cold")
    async def cold_echo(body: Echo, request: Request) -> Response:
        return await _echo(body, request)

    app = FastAPI()
    app.include_router(router)
    install_error_handlers(app)
    middleware.install(
        app,
        metrics=Metrics(),
        api_keys=[],
        max_body_bytes=1000,
        routes=["/hot", "/cold"],
        hot=hot_routes([router]),
        endpoints=router.routes,
    )
    return app


# (body, status, the way a good body went on the hot route)
BODIES: list[tuple[bytes, int, str]] = [
    (b'{"text": "ab", "times": 2}', 200, "hot"),
    (b'{"text": "ab", "unknown": [1, {"x": null}]}', 200, "hot"),
    (b'{"text": "ab", "times": 2.0}', 200, "hot"),  # lax int: both paths take 2.0 as 2
    # A BOM: pydantic's parser refuses it, FastAPI's json.loads takes it.
    (b"\xef\xbb\xbf" + b'{"text": "ab"}', 200, "fastapi"),
    (b'{"text": "refuse"}', 400, ""),
    (b'{"text": 5}', 400, ""),
    (b'{"text": "ab", "times": "x"}', 400, ""),
    (b'{"times": 1}', 400, ""),
    (b'{"text": "a', 400, ""),
    (b"", 400, ""),
    (b"[]", 400, ""),
    (b'{"text": "x' + b"y" * 1000 + b'"}', 413, ""),
]


@pytest.mark.parametrize(("body", "status", "via"), BODIES, ids=[repr(b[:24]) for b, *_ in BODIES])
def test_a_hot_route_answers_as_its_cold_twin(body: bytes, status: int, via: str) -> None:
    with serve_app(_twin_app(), wait=False) as server, server.client() as client:
        cold = client.post("/cold", content=body)
        warm = client.post("/hot", content=body)
    assert cold.status_code == warm.status_code == status, (cold.text, warm.text)
    if status != 200:
        assert warm.json() == cold.json()
        return
    assert cold.json()["via"] == "fastapi"
    assert warm.json() == {**cold.json(), "via": via}


def test_an_endpoint_crash_on_a_hot_route_is_the_usual_500_and_the_server_goes_on() -> None:
    with serve_app(_twin_app(), wait=False) as server, server.client() as client:
        cold = client.post("/cold", json={"text": "crash"})
        warm = client.post("/hot", json={"text": "crash"})
        after = client.post("/hot", json={"text": "ok"})
    assert cold.status_code == warm.status_code == 500
    assert warm.json() == cold.json()
    assert after.status_code == 200 and after.json()["via"] == "hot"


def test_a_hot_route_still_goes_through_the_servers_middleware() -> None:
    app = _twin_app()
    with serve_app(app, wait=False) as server, server.client() as client:
        reply = client.post("/hot", json={"text": "a"}, headers={"X-Request-Id": "abc-1"})
        wrong = client.get("/hot")  # not POST: FastAPI's 405
    assert reply.headers["x-request-id"] == "abc-1"
    assert wrong.status_code == 405
    assert wrong.json()["error"]["message"] == "Method GET is not allowed on /hot."


def test_a_hot_route_reads_a_chunked_body() -> None:
    def chunks() -> Any:
        yield b'{"text": '
        yield b'"abc"}'

    with serve_app(_twin_app(), wait=False) as server:
        reply = httpx.post(f"{server.base_url}/hot", content=chunks())
    assert reply.status_code == 200 and reply.json() == {"echo": "abc", "via": "hot"}


# Content types clients send: none (curl --data-binary), curl -d's form type, and JSON under
# names FastAPI alone would not parse as JSON (it would say the body is not an object).
CONTENT_TYPES = [
    None,
    "application/x-www-form-urlencoded",
    "text/plain",
    "text/json",
    "application/x-ndjson",
    "application/json; charset=utf-8",
    "application/ld+json",
    "application/json, text/plain",
]


def test_a_body_is_read_as_json_whatever_its_content_type_says_on_either_way() -> None:
    with serve_app(_twin_app(), wait=False) as server, server.client() as client:
        for content_type in CONTENT_TYPES:
            headers = {} if content_type is None else {"Content-Type": content_type}
            cold = client.post("/cold", content=b'{"text": "ab"}', headers=headers)
            warm = client.post("/hot", content=b'{"text": "ab"}', headers=headers)
            assert (cold.status_code, warm.status_code) == (200, 200), (content_type, cold.text)
            assert (cold.json(), warm.json()) == (
                {"echo": "ab", "via": "fastapi"},
                {"echo": "ab", "via": "hot"},
            ), content_type


def test_under_a_root_path_routes_are_found_as_fastapi_finds_them() -> None:
    """``uvicorn --root-path /api`` (behind a proxy that strips /api) puts the prefix in
    front of every request's path; the hot routes, the metrics' route label, the API keys'
    open paths and the error dialect read the path without it, as FastAPI's routing does.
    With the prefix kept, ``/embed`` (TEI) had been answered as Ollama's ``/api/embed``."""
    settings = Settings(service_type="all", warmup=False, api_keys=["k"])
    app = build_app(settings, fake_plugin())
    with serve_app(app, root_path="/api") as server, server.client() as client:
        key = {"Authorization": "Bearer k"}
        assert client.get("/health").status_code == 200  # open without a key
        tei = client.post("/embed", json={"inputs": "東京"}, headers=key)
        openai = client.post("/embeddings", json={"input": "東京"}, headers=key)
        rerank = client.post("/rerank", json={"query": "q", "documents": ["a", "b"]}, headers=key)
        refused = client.post("/v1/rerank", json={"query": "q", "documents": []})
        answered = server.metric("fos_requests_total", headers=key, route="/embed", status="200")
    assert tei.status_code == 200 and len(tei.json()) == 1, tei.text
    assert openai.status_code == 200 and openai.json()["object"] == "list", openai.text
    assert rerank.status_code == 200 and rerank.json()["meta"], rerank.text
    assert refused.status_code == 401 and refused.json()["error"]["code"], refused.text
    assert answered == 1


def test_under_a_root_path_errors_and_404_hints_read_the_path_as_routed() -> None:
    """Behind a proxy that strips /api, the errors' envelopes and the 404's hints are about
    the path the routes answer, and the spelling suggested keeps the prefix the client
    sent. Every error had come in Ollama's envelope (its routes are /api/...), and a
    doubled /v1 after the prefix had got no hint."""
    settings = Settings(service_type="embeddings", warmup=False)
    app = build_app(settings, fake_plugin())
    with serve_app(app, root_path="/api") as server, server.client() as client:
        slash = client.post("/v1/embeddings/", json={"input": "a"})
        twice = client.post("/v1/v1/embeddings", json={"input": "a"})
        n8n = client.post("/v1/v1/rerank", json={"query": "q", "documents": ["a"]})
        invalid = client.post("/v1/embeddings", json={"input": 5})
        tei = client.post("/embed", json={"inputs": 5})
    assert invalid.status_code == 400 and invalid.json()["error"]["param"] == "input"
    assert tei.status_code == 400 and tei.json()["error_type"] == "Validation", tei.text
    errors = [reply.json()["error"] for reply in (slash, twice, n8n)]
    assert [reply.status_code for reply in (slash, twice, n8n)] == [404] * 3, errors
    assert all(isinstance(error, dict) and error["code"] == "not_found" for error in errors)
    messages = [error["message"] for error in errors]
    assert messages[0].endswith("Leave out the trailing slash: /api/v1/embeddings"), messages
    assert messages[1].endswith("The base URL has /v1 twice: end it in /v1 once."), messages
    assert "SERVICE_TYPE=reranker" in messages[2] and "twice" not in messages[2], messages


def test_with_opentelemetry_on_every_request_is_named_by_its_route(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FastAPI's spans name a request by the route its routing found; where OpenTelemetry
    is configured (``OTEL_*``), every request goes that way and none is left unnamed."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process: no other test sets one
    monkeypatch.setenv("OTEL_SERVICE_NAME", "fake-openai-server")
    app = build_app(Settings(service_type="all", warmup=False), fake_plugin())
    with serve_app(app) as server, server.client() as client:
        exporter.clear()
        for path, body in [("/v1/embeddings", {"input": "東京"}), ("/embed", {"inputs": "a"})]:
            assert client.post(path, json=body).status_code == 200
    provider.force_flush()
    routes = [span.attributes.get("http.route") for span in exporter.get_finished_spans()]
    assert "/v1/embeddings" in routes and "/embed" in routes, routes


# --- the body parse ----------------------------------------------------------------------
def _cold_parse(model: type[BaseModel], raw: bytes) -> BaseModel | None:
    """FastAPI's way: the JSON as Python, then the model validated from it."""
    try:
        return model.model_validate(json.loads(raw))
    except (ValueError, ValidationError):  # json.JSONDecodeError and UnicodeDecodeError too
        return None


def _same(a: BaseModel, b: BaseModel) -> bool:
    # repr: NaN is not equal to itself, and -0.0 is equal to 0.0.
    return (
        repr(a.model_dump()) == repr(b.model_dump())
        and a.model_fields_set == b.model_fields_set
        and type(a) is type(b)
    )


def _assert_hot_implies_cold(model: type[BaseModel], raw: bytes) -> bool:
    refused = None
    try:
        hot_body = parsed_body(model, raw)
    except ServiceError as error:
        refused = error
    if refused is not None:
        # A model's own refusal (Cohere's images): FastAPI's way must meet the same, as
        # both ways answer it with the same error handler.
        with pytest.raises(ServiceError) as cold:
            model.model_validate(json.loads(raw))
        assert (cold.value.kind, cold.value.message) == (refused.kind, refused.message), raw
        return False
    if hot_body is None:
        return False
    cold_body = _cold_parse(model, raw)
    assert cold_body is not None, raw
    assert _same(hot_body, cold_body), raw
    return True


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
text = st.text(min_size=1, max_size=20)
embeddings_fields = {
    "input": text
    | st.lists(text, min_size=1, max_size=4)
    | st.lists(st.integers(0, 9999))
    | st.lists(st.lists(st.integers(0, 9999), min_size=1), max_size=3),
    "model": st.none() | st.text(max_size=20),
    "encoding_format": st.sampled_from([None, "float", "base64", "hex"]),
    "dimensions": st.none() | st.integers(-3, 2000) | st.floats(-3, 3),
    "input_type": st.none() | st.sampled_from(["query", "document", "passage"]),
    "user": json_value,
    "output_dtype": st.sampled_from([None, "float", "int8", "binary", "float16"]),
    "embedding_type": st.sampled_from([None, "float", "base64", "ubinary"]),
    "output_dimension": st.none() | st.integers(1, 64),
    "truncation": st.none() | st.booleans() | st.sampled_from([0, 1, "true"]),
}
document = text | st.dictionaries(
    st.sampled_from(["text", "title", "body"]) | st.text(max_size=5), json_value, max_size=3
)
rerank_fields = {
    "query": text | json_leaf,
    "documents": st.lists(document, min_size=1, max_size=4) | json_value,
    "model": st.none() | st.text(max_size=10),
    "top_n": st.none() | st.integers(-2, 10) | st.sampled_from([1.0, 2.5]),
    "top_k": st.none() | st.integers(0, 10),
    "return_documents": st.sampled_from([None, True, False, True, False, 1]),
    "rank_fields": st.none() | st.lists(st.text(max_size=5), max_size=3),
    "raw_scores": st.sampled_from([True, False, True, False, "yes"]),
    "truncation": st.none() | st.booleans(),
}


def _objects(
    fields: dict[str, st.SearchStrategy[Any]], required: tuple[str, ...]
) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the model's required fields and any of the others (and some it does
    not know), values of the right type or not."""
    return st.fixed_dictionaries(
        {name: fields[name] for name in required},
        optional={
            **{name: value for name, value in fields.items() if name not in required},
            "extra": json_value,
            "input_types": json_value,
        },
    )


# Values for the fields of the other hot models: of the usual types (and the words their
# Literal fields take), right or wrong for any given field.
some_value = (
    json_value
    | text
    | st.lists(text, min_size=1, max_size=3)
    | st.sampled_from(["query", "document", "search_query", "END", "NONE", "float", "left"])
)


def _any_fields(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    required = tuple(name for name, field in model.model_fields.items() if field.is_required())
    return _objects({name: some_value for name in model.model_fields}, required)


ollama_rerank_fields = {
    "query": text | json_leaf,
    "documents": st.lists(text, min_size=1, max_size=4) | json_value,
    "model": st.none() | st.text(max_size=10),
    "top_n": st.none() | st.integers(-2, 10) | st.sampled_from([1.0, 2.5]),
}
SPECIFIC = {
    EmbeddingsRequest: _objects(embeddings_fields, ("input",)),
    RerankRequest: _objects(rerank_fields, ("query", "documents")),
    OllamaRerankRequest: _objects(ollama_rerank_fields, ("query", "documents")),
}
HOT_MODELS = sorted(
    {route.model for route in hot_routes(routers_for(Settings(service_type="all"))).values()},
    key=lambda model: model.__name__,
)
MODELS = [
    (model, SPECIFIC[model] if model in SPECIFIC else _any_fields(model)) for model in HOT_MODELS
]


def test_every_hot_model_is_in_the_property() -> None:
    assert {EmbeddingsRequest, RerankRequest} < set(HOT_MODELS)


def _encoded(value: Any, ascii_only: bool, indent: int | None) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode()


@pytest.mark.parametrize(("model", "objects"), MODELS, ids=[m.__name__ for m, _ in MODELS])
@settings(max_examples=150, deadline=None)
@given(data=st.data(), ascii_only=st.booleans(), indent=st.sampled_from([None, 0, 2]))
def test_what_the_hot_parse_accepts_fastapi_accepts_the_same(
    model: type[BaseModel],
    objects: st.SearchStrategy[dict[str, Any]],
    data: st.DataObject,
    ascii_only: bool,
    indent: int | None,
) -> None:
    value = data.draw(objects | json_value)
    _assert_hot_implies_cold(model, _encoded(value, ascii_only, indent))


# Bodies at the edges of JSON itself, where two parsers are most likely to differ.
EDGE_BODIES = [
    b'{"input": "a\\ud800b"}',  # a lone surrogate escape
    b'{"input": "\\ud83d\\ude00"}',  # a pair: one emoji
    b'{"input": "a\x01b"}',  # a raw control character
    b'{"input": "a\x7fb"}',
    b'{"input": "a", "input": ["b", "c"]}',  # a key twice: the last wins
    b'{"input": "a", "dimensions": 8.0}',
    b'{"input": "a", "dimensions": 1e1}',
    b'{"input": "a", "dimensions": 123456789012345678901234567890}',
    b'{"input": [1, 2, 3.0]}',
    b'{"input": "a", "user": NaN}',
    b'{"input": "a", "user": Infinity}',
    b'{"input": "a", "user": 1e400}',
    b'{"input": "a", "user": -0.0}',
    b'{"input": "a"} ',
    b' \t\r\n{"input": "a"}',
    b'{"input": "a"}x',
    b'{"input": "a",}',
    b"{'input': 'a'}",
    b'{"input": "\xff"}',  # not UTF-8
    b'{"input": "\xc3\xa9", "model": null}',
    '{"input": "é"}'.encode("utf-16"),
    '{"input": "é"}'.encode("utf-16-le"),
    b"\xef\xbb\xbf" + b'{"input": "a"}',
    b'{"input": "a", "user": ' + b"[" * 300 + b"]" * 300 + b"}",  # deep nesting
    b'{"query": "q", "documents": [{"text": "d", "n": ' + b"[" * 300 + b"]" * 300 + b"}]}",
    b'{"query": "q", "documents": ["d"], "top_k": null}',  # Voyage: top_k set, as null
    b'{"query": "q", "documents": [{"text": "d", "title": "t"}], "return_documents": true}',
]


@pytest.mark.parametrize("raw", EDGE_BODIES, ids=[repr(b[:30]) for b in EDGE_BODIES])
def test_at_the_edges_of_json_the_hot_parse_is_never_more_lenient(raw: bytes) -> None:
    for model in HOT_MODELS:
        _assert_hot_implies_cold(model, raw)


def test_the_property_is_not_vacuous() -> None:
    """Good requests of every shape clients send are taken by the hot parse."""
    good = [
        (EmbeddingsRequest, {"input": "東京", "model": "ruri-large"}),
        (EmbeddingsRequest, {"input": ["a", "b"], "encoding_format": "base64", "user": "u"}),
        (EmbeddingsRequest, {"input": [[1, 2], [3]], "dimensions": 8, "truncation": True}),
        (EmbeddingsRequest, {"input": ["a"], "output_dtype": "int8", "input_type": "query"}),
        (RerankRequest, {"query": "q", "documents": ["a", {"text": "b", "id": 3}], "top_n": 1}),
        (RerankRequest, {"query": "q", "documents": ["a"], "top_k": None, "model": "m"}),
        (OllamaEmbedRequest, {"model": "ruri-large:latest", "input": ["a"], "truncate": True}),
        (OllamaEmbeddingsRequest, {"model": "ruri-large", "prompt": "a", "options": {}}),
        (OllamaRerankRequest, {"model": "m", "query": "q", "documents": ["a"], "top_n": 1}),
        (TeiEmbedRequest, {"inputs": ["a"], "normalize": False, "prompt_name": "query"}),
        (CohereEmbedRequest, {"texts": ["a"], "input_type": "search_query", "truncate": "END"}),
    ]
    assert {model for model, _ in good} == set(HOT_MODELS)
    for model, value in good:
        assert _assert_hot_implies_cold(model, json.dumps(value).encode()), value
