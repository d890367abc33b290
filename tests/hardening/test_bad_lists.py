"""A body that is a long list of wrong items costs what one wrong item costs.

pydantic checks every item of a list and keeps an error for each (and for each shape a
union allows), and FastAPI turns them all into dicts before the first is read: a body of
8 MiB holding ``{"input": [null, null, ...]}`` (1.6 million nulls) made 8.4 million
errors, held the event loop 46 s (``/health`` unanswered) and took the server process to
12 GB. Every list of a request stops at its first wrong item.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from fake_openai_server.api import compat_schemas, schemas
from fake_openai_server.api.app import build_app
from fake_openai_server.settings import Settings
from tests.support.fakes import fake_plugin
from tests.support.live import LiveServer, serve_app

ITEMS = 250_000  # about 1.2 MiB of bad items: seconds each before, milliseconds now
# Generous for a slow runner: 0.05 s each here (2 to 16 s before, on 2 cores).
SECONDS = 1.0


def _body(template: str, item: str) -> str:
    """``template`` with its ``LIST`` a JSON list of ITEMS ``item``s."""
    return template.replace("LIST", "[" + ",".join([item] * ITEMS) + "]")


# (path, body) with a list of ITEMS wrong items where each route takes a list.
BAD_LISTS = [
    ("/v1/embeddings", _body('{"input": LIST}', "null")),
    ("/v1/embeddings", _body('{"input": [LIST]}', '"a"')),  # a token-id row of strings
    ("/v1/embeddings", _body('{"input": [[1], LIST]}', '"a"')),
    ("/openai/deployments/ruri-large/embeddings", _body('{"input": LIST}', "null")),
    ("/v1/rerank", _body('{"query": "q", "documents": LIST}', "1")),
    ("/v2/rerank", _body('{"query": "q", "documents": ["a"], "rank_fields": LIST}', "1")),
    ("/rerank", _body('{"query": "q", "texts": LIST}', "1")),
    ("/embed", _body('{"inputs": LIST}', "1")),
    ("/", _body('{"inputs": LIST}', "1")),
    ("/similarity", _body('{"inputs": {"source_sentence": "a", "sentences": LIST}}', "1")),
    ("/tokenize", _body('{"inputs": LIST}', "1")),
    ("/decode", _body('{"ids": LIST}', '"a"')),
    ("/decode", _body('{"ids": [LIST]}', '"a"')),
    ("/api/embed", _body('{"input": LIST}', "1")),
    ("/api/rerank", _body('{"query": "q", "documents": LIST}', "1")),
    ("/v1/embed", _body('{"texts": LIST}', "1")),
    ("/v2/embed", _body('{"inputs": LIST, "input_type": "search_query"}', "1")),
    ("/v2/embed", _body('{"inputs": [{"content": LIST}], "input_type": "search_query"}', "1")),
    ("/v2/embed", _body('{"texts": ["a"], "embedding_types": LIST}', "1")),
]


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    settings = Settings(service_type="all", warmup=False, allow_token_ids=True)
    with serve_app(build_app(settings, fake_plugin())) as live:
        yield live


@pytest.mark.parametrize(("path", "body"), BAD_LISTS, ids=[f"{p} {b[:30]}" for p, b in BAD_LISTS])
def test_a_long_list_of_wrong_items_is_refused_at_once(
    server: LiveServer, path: str, body: str
) -> None:
    with server.client() as client:
        started = time.perf_counter()
        reply = client.post(path, content=body)
        took = time.perf_counter() - started
        assert reply.status_code == 400, reply.text[:300]
        assert len(reply.text) < 2000  # one error, not one per item
        assert took < SECONDS, f"{took:.1f}s for one 400"
        assert client.get("/health").status_code == 200


def _lists(schema: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every list schema in a pydantic core schema."""
    if isinstance(schema, dict):
        if schema.get("type") == "list":
            yield where, schema
        for key, value in schema.items():
            yield from _lists(value, f"{where}.{key}")
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            yield from _lists(value, f"{where}[{index}]")


REQUEST_MODELS = [
    model
    for module in (schemas, compat_schemas)
    for name, model in vars(module).items()
    if isinstance(model, type)
    and issubclass(model, BaseModel)
    and model.__module__ == module.__name__
    and (name.endswith("Request") or name in ("JinaInput", "DocumentObject"))
]


def test_the_request_models_are_found() -> None:
    names = {model.__name__ for model in REQUEST_MODELS}
    assert {"EmbeddingsRequest", "RerankRequest", "CohereEmbedRequest"} <= names
    assert {"TeiDecodeRequest", "OllamaEmbedRequest", "OllamaRerankRequest"} <= names


@pytest.mark.parametrize("model", REQUEST_MODELS, ids=lambda m: m.__name__)
def test_every_list_of_a_request_stops_at_its_first_wrong_item(model: type[BaseModel]) -> None:
    """A list added later without ``FailFast`` is named here, not found by a 12 GB server."""
    slow = [
        where
        for where, schema in _lists(model.__pydantic_core_schema__)
        if not schema.get("fail_fast")
    ]
    assert not slow, f"{model.__name__}: lists that check every item: {slow}"


def test_a_wrong_item_is_still_named(server: LiveServer) -> None:
    with server.client() as client:
        reply = client.post("/v1/rerank", json={"query": "q", "documents": ["a", 1, 2]})
        assert reply.status_code == 400
        assert "'documents'" in reply.json()["error"]["message"]
        reply = client.post(
            "/similarity", json={"inputs": {"source_sentence": "a", "sentences": ["a", 1]}}
        )
        assert reply.status_code == 400
        assert "inputs.sentences.1" in reply.json()["error"], reply.text
        reply = httpx.post(f"{server.base_url}/v1/embeddings", json={"input": ["a", None]})
        assert reply.status_code == 400
        assert reply.json()["error"]["param"] == "input"


# A list of well-formed items over MAX_INPUTS or MAX_DOCUMENTS: each item built as an
# object before the count was looked at. 8 MiB of {"input": [{}, {}, ...]} (2.8 million
# Jina input objects) held the event loop 10 s and took the server to 1.8 GB, to say
# that input[0] has no text.
FEW = 100
BODY_BYTES = 8 * 1024 * 1024 - 100  # MAX_REQUEST_BYTES's default, just under


def _full(template: str, item: str) -> str:
    """``template`` with its ``LIST`` a JSON list of ``item``s, the body near 8 MiB."""
    count = (BODY_BYTES - len(template)) // (len(item) + 1)
    return template.replace("LIST", "[" + ",".join([item] * count) + "]")


LONG_LISTS = [
    ("/v1/embeddings", _full('{"input": LIST}', "{}"), "input has", "MAX_INPUTS=100"),
    ("/v1/embeddings", _full('{"input": LIST}', '"a"'), "input has", "MAX_INPUTS=100"),
    (
        "/v1/rerank",
        _full('{"query": "q", "documents": LIST}', "{}"),
        "documents has",
        "MAX_DOCUMENTS=100",
    ),
    (
        "/v2/rerank",
        _full('{"query": "q", "documents": LIST}', '{"text": "a"}'),
        "documents has",
        "MAX_DOCUMENTS=100",
    ),
    (
        "/v2/embed",
        _full('{"inputs": LIST, "input_type": "search_query"}', "{}"),
        "inputs has",
        "MAX_INPUTS=100",
    ),
    ("/v1/embed", _full('{"texts": LIST}', '"a"'), "texts has", "MAX_INPUTS=100"),
    ("/embed", _full('{"inputs": LIST}', '"a"'), "inputs has", "MAX_INPUTS=100"),
    ("/rerank", _full('{"query": "q", "texts": LIST}', '"a"'), "texts has", "MAX_DOCUMENTS=100"),
    ("/tokenize", _full('{"inputs": LIST}', '"a"'), "inputs has", "MAX_INPUTS=100"),
    ("/api/embed", _full('{"input": LIST}', '"a"'), "input has", "MAX_INPUTS=100"),
    (
        "/api/rerank",
        _full('{"query": "q", "documents": LIST}', '"a"'),
        "documents has",
        "MAX_DOCUMENTS=100",
    ),
]


@pytest.fixture(scope="module")
def few_server() -> Iterator[LiveServer]:
    settings = Settings(
        service_type="all", warmup=False, allow_token_ids=True, max_inputs=FEW, max_documents=FEW
    )
    with serve_app(build_app(settings, fake_plugin())) as live:
        yield live


@pytest.mark.parametrize(
    ("path", "body", "says", "limit"),
    LONG_LISTS,
    ids=[f"{p} {b[:24]}" for p, b, _, _ in LONG_LISTS],
)
def test_a_list_over_its_limit_is_refused_before_its_items_are_built(
    few_server: LiveServer, path: str, body: str, says: str, limit: str
) -> None:
    with few_server.client() as client:
        started = time.perf_counter()
        reply = client.post(path, content=body)
        took = time.perf_counter() - started
        assert reply.status_code == 400, reply.text[:300]
        assert says in reply.text and limit in reply.text, reply.text[:300]
        # Reading 8 MiB of JSON into Python is left (under a second here, alone).
        assert took < 3 * SECONDS, f"{took:.1f}s for one 400"


def test_a_list_within_its_limit_is_served(few_server: LiveServer) -> None:
    with few_server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": [{"text": "a"}] * FEW})
        assert reply.status_code == 200, reply.text[:300]
        assert len(reply.json()["data"]) == FEW
        reply = client.post("/v1/rerank", json={"query": "q", "documents": ["a"] * FEW})
        assert reply.status_code == 200, reply.text[:300]
        # A flat list of token ids is one input, however long.
        reply = client.post("/v1/embeddings", json={"input": [1] * (FEW + 1)})
        assert reply.status_code == 200, reply.text[:300]
