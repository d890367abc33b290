"""Malformed requests on the routes of the other APIs (TEI, Ollama, Cohere embed, the
Voyage and Jina fields): each gets its 4xx in the error envelope its clients parse, with
a message that says what to change, and the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from fake_openai_server.api.app import build_app
from fake_openai_server.api.errors import MESSAGE_LIMIT, TEI_PATHS
from fake_openai_server.settings import Settings
from tests.hardening.test_bad_requests import assert_still_serving
from tests.support.fakes import fake_plugin
from tests.support.live import serve_app


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    settings = Settings(service_type="all", warmup=False, max_input_chars=10_000)
    with serve_app(build_app(settings, fake_plugin())) as live, live.client() as c:
        yield c


@dataclass
class Bad:
    path: str
    body: Any  # sent as JSON; bytes as they are
    says: str
    status: int = 400

    def __str__(self) -> str:
        return f"{self.path} {str(self.body)[:50]}"


LONG = "あ" * 100  # over the fake model's 32 tokens
CATALOGUE = [
    # text-embeddings-inference
    Bad("/embed", {}, "'inputs' is required"),
    Bad("/embed", {"inputs": 5}, "'inputs': expected a string or a list of strings"),
    Bad("/embed", {"inputs": []}, "inputs must not be an empty list"),
    Bad("/embed", {"inputs": ["a", " "]}, "inputs[1] is empty"),
    Bad("/embed", {"inputs": "a", "normalize": "yes"}, "'normalize'"),
    Bad("/embed", {"inputs": "a", "truncation_direction": "up"}, "'truncation_direction'"),
    Bad("/embed", {"inputs": "a", "prompt_name": "instruction"}, "prompt_name must be one of"),
    Bad("/embed", {"inputs": "a", "dimensions": 0}, "dimensions must be between 1 and 8"),
    Bad("/embed", {"inputs": LONG, "truncate": False}, "not to truncate"),
    Bad("/embed", {"inputs": "a" * 20_000}, "MAX_INPUT_CHARS=10000"),
    Bad("/embed", {"inputs": "a", "model": "bge-m3"}, "does not exist", 404),
    Bad("/", {"inputs": []}, "inputs must not be an empty list"),
    Bad("/", [1, 2], "JSON object"),
    Bad("/invocations", {"inputs": []}, "inputs must not be an empty list"),
    Bad("/similarity", {"inputs": "a"}, "'inputs': expected an object with 'source_sentence'"),
    Bad("/similarity", {"inputs": {"sentences": ["a"]}}, "'inputs.source_sentence' is required"),
    Bad(
        "/similarity", {"inputs": {"source_sentence": "a", "sentences": "b"}}, "'inputs.sentences'"
    ),
    Bad("/similarity", {"inputs": {"source_sentence": "a", "sentences": []}}, "an empty list"),
    Bad(
        "/similarity",
        {"inputs": {"source_sentence": "a", "sentences": ["b"] * 2048}},
        "inputs.sentences has 2048 items; with inputs.source_sentence that is 2049, over",
    ),
    Bad("/similarity", {"inputs": {"source_sentence": " ", "sentences": ["b"]}}, "sentence is emp"),
    Bad("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b", ""]}}, "ces[1] is"),
    Bad("/", {"inputs": {"source_sentence": 1, "sentences": ["b"]}}, "'inputs.source_sentence'"),
    Bad(
        "/invocations",
        {"inputs": {"source_sentence": "a", "sentences": ["b"]}, "parameters": {"truncate": 1}},
        "'parameters.truncate'",
    ),
    Bad(
        "/similarity",
        {
            "inputs": {"source_sentence": "a", "sentences": [LONG]},
            "parameters": {"truncate": False},
        },
        "not to truncate",
    ),
    Bad(
        "/similarity",
        {
            "inputs": {"source_sentence": "a", "sentences": ["b"]},
            "parameters": {"prompt_name": "x"},
        },
        "prompt_name must be one of",
    ),
    Bad("/rerank", {"query": "q", "texts": []}, "texts must not be an empty list"),
    Bad("/rerank", {"query": "q", "texts": "a"}, "'texts'"),
    Bad("/rerank", {"query": "", "texts": ["a"]}, "query"),
    Bad("/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "left"}, "left"),
    Bad("/tokenize", {"inputs": []}, "inputs must not be empty"),
    Bad("/tokenize", {"inputs": "a", "prompt_name": "x"}, "prompt_name must be one of"),
    Bad("/tokenize", {"inputs": "a" * 60_000}, "at most 50000"),
    Bad("/decode", {"ids": []}, "ids must not be empty"),
    Bad("/decode", {"ids": [1, 999_999]}, "outside this model's vocabulary"),
    Bad("/decode", {"ids": "abc"}, "'ids': expected a list of token ids"),
    Bad("/decode", b'{"ids": [1], "model": "\\ud800"}', "lone UTF-16 surrogate"),
    # Ollama
    Bad("/api/embed", {"model": "nomic-embed-text", "input": "a"}, "does not exist", 404),
    Bad("/api/embed", {"input": 5}, "'input'"),
    Bad("/api/embed", {"input": ["a", ""]}, "input[1] is empty"),
    Bad("/api/embed", {"input": LONG, "truncate": False}, "not to truncate"),
    Bad("/api/embed", {"input": [""]}, "input[0] is empty"),  # Ollama's [] only loads
    Bad("/api/embeddings", {"prompt": ["a"]}, "'prompt'"),
    Bad("/api/embeddings", {"prompt": " "}, "prompt is empty"),  # one text, not a list
    Bad("/api/show", {"model": "llama3"}, "does not exist", 404),
    Bad("/api/show", b'{"name": "\\udfff"}', "lone UTF-16 surrogate"),
    Bad("/api/pull", {"model": "llama3"}, "pull model manifest: file does not exist", 404),
    Bad("/api/pull", {"name": "llama3", "stream": False}, "cannot download models", 404),
    Bad("/api/pull", {}, "invalid model name: say which model to pull"),  # Ollama's 400
    Bad("/api/pull", {"model": "", "stream": False}, "invalid model name"),
    Bad("/api/pull", {"name": ":latest"}, "invalid model name"),
    Bad("/api/pull", {"model": "ruri-large", "stream": "false"}, "'stream'"),
    Bad("/api/pull", {"model": "ruri-large", "insecure": 1}, "'insecure'"),
    Bad("/api/rerank", {"query": "q", "documents": []}, "documents must not be an empty list"),
    Bad("/api/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
    # Cohere embed
    Bad("/v1/embed", {}, "'texts' (or v2's 'inputs') is required"),
    Bad("/v1/embed", {"texts": []}, "texts must not be an empty list"),
    Bad("/v1/embed", {"texts": ["a"], "input_type": "poem"}, "'input_type'"),
    Bad("/v1/embed", {"texts": ["a"], "embedding_types": ["int4"]}, "'embedding_types"),
    Bad("/v1/embed", {"texts": ["a"], "truncate": "MIDDLE"}, "'truncate'"),
    Bad("/v1/embed", {"texts": [LONG], "truncate": "NONE"}, "not to truncate"),
    Bad("/v1/embed", {"texts": ["a"], "images": ["data:image/png;base64,AA"]}, "text only"),
    Bad("/v2/embed", {"images": ["data:image/png;base64,AA"], "input_type": "image"}, "text only"),
    Bad("/v1/embed", {"texts": ["a"], "input_type": "image"}, "input_type asks for image"),
    Bad("/v2/embed", {"texts": ["a"], "inputs": [{"content": []}]}, "not both"),
    Bad("/v2/embed", {"inputs": [{"content": [{"type": "image_url"}]}]}, "text only"),
    # The field the client sent, not v1's.
    Bad("/v2/embed", {"inputs": [{"content": [{"type": "text", "text": " "}]}]}, "inputs[0] is"),
    Bad("/v2/embed", {"inputs": [{"content": [{"text": "a"}]}]}, "'inputs.0.content.0.type' is"),
    Bad(
        "/v2/embed", {"inputs": "a"}, "'inputs': expected a list of objects, each with a 'content'"
    ),
    Bad("/v2/embed", {"texts": ["a"], "output_dimension": 4096}, "between 1 and 8"),
    Bad("/v2/embed", {"texts": ["a"], "max_tokens": 4}, "max_tokens"),
    # Voyage and Jina fields on the OpenAI route
    Bad("/v1/embeddings", {"input": "a", "output_dtype": "int4"}, "'output_dtype'"),
    Bad("/v1/embeddings", {"input": "a", "embedding_type": "sparse"}, "'embedding_type'"),
    Bad(
        "/v1/embeddings",
        {"input": "a", "output_dtype": "int8", "embedding_type": "binary"},
        "disagree",
    ),
    Bad("/v1/embeddings", {"input": "a", "dimensions": 4, "output_dimension": 2}, "disagree"),
    Bad("/v1/embeddings", {"input": LONG, "truncation": False}, "not to truncate"),
    Bad("/v1/rerank", {"query": "q", "documents": ["a"], "top_k": "2"}, "'top_k'"),
]

ENVELOPES = {"tei": {"error", "error_type"}, "ollama": {"error"}, "cohere": {"id", "message"}}


def envelope(path: str) -> str:
    if path.startswith("/api/"):
        return "ollama"
    if path in TEI_PATHS or path == "/rerank":
        return "tei"
    if path in ("/v1/embed", "/v2/embed"):
        return "cohere"
    return "openai"


def message_of(path: str, body: dict[str, Any]) -> str:
    kind = envelope(path)
    if kind == "openai":
        assert set(body["error"]) == {"message", "type", "param", "code"}
        return str(body["error"]["message"])
    assert set(body) == ENVELOPES[kind], body
    return str(body["message" if kind == "cohere" else "error"])


@pytest.mark.parametrize("bad", CATALOGUE, ids=str)
def test_bad_request_gets_its_4xx_in_its_apis_envelope(bad: Bad, client: httpx.Client) -> None:
    if isinstance(bad.body, bytes):
        reply = client.post(bad.path, content=bad.body)
    else:
        reply = client.post(bad.path, json=bad.body)
    assert reply.status_code == bad.status, reply.text[:500]
    message = message_of(bad.path, reply.json())
    assert bad.says in message, message
    assert 0 < len(message) <= MESSAGE_LIMIT + 40
    assert_still_serving(client)


def test_rerank_answers_in_the_envelope_of_the_body_it_was_sent(client: httpx.Client) -> None:
    """/rerank serves TEI's body (texts) and Cohere's (documents): errors follow the body."""
    tei = client.post("/rerank", json={"query": "q", "texts": [""]})
    assert set(tei.json()) == {"error", "error_type"}
    cohere = client.post("/rerank", json={"query": "q", "documents": [""]})
    assert set(cohere.json()["error"]) == {"message", "type", "param", "code"}
