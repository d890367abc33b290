"""Texts over the characters the tokenizer reads of one text, in few tokens.

The tokenizer reads at most ``char_limit(max_length)`` characters of a text (16 per
token of the model's maximum, at most 50,000: ``backends/tokenizer.py``), to bound its
work. Ordinary text has used up the model's length well before that. Over the stand-ins:
ruri-large reads 8,192 characters (512 tokens) and makes no tokens of whitespace, so a
long text's whitespace runs are squeezed to one space before it is cut; the reranker
reads 50,000 (8,192 tokens), and its tokenizer makes a few tokens of a long run of
newlines: such a text, cut, had been scored from its first characters alone, and with
truncation off it was not refused, as every other over-long text is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from fake_openai_server.api.app import build_app
from fake_openai_server.backends.tokenizer import CHARS_PER_TOKEN_CAP, MAX_TOKENIZER_CHARS
from fake_openai_server.settings import Settings
from tests.e2e.test_clients import float_vectors, scores_alone
from tests.support.contract import EMBEDDINGS_MODEL
from tests.support.live import LiveServer, serve_app
from tests.support.standins import japanese_text

EMBEDDINGS_CHARS = min(512 * CHARS_PER_TOKEN_CAP, MAX_TOKENIZER_CHARS)  # 8,192
RERANK_CHARS = min(8192 * CHARS_PER_TOKEN_CAP, MAX_TOKENIZER_CHARS)  # 50,000
# A few tokens, far more characters than the tokenizer reads: its end is never read.
SPACED = "東京" + " \n\u3000" * (EMBEDDINGS_CHARS // 3 + 100) + "大阪"
SPACED_DOC = "東京" + "\n" * (RERANK_CHARS + 1000) + "大阪"


def post(server: LiveServer, path: str, body: Any) -> httpx.Response:
    with server.client() as client:
        return client.post(path, json=body)


def message(reply: httpx.Response) -> str:
    """The error's message, in each API's envelope (OpenAI, TEI and Ollama, Cohere)."""
    body = reply.json()
    error = body.get("error", body.get("message"))
    return str(error["message"] if isinstance(error, dict) else error)


def assert_refused_for_characters(reply: httpx.Response, limit: int, max_length: int) -> None:
    assert reply.status_code == 400, reply.text[:500]
    text = message(reply)
    assert f"over {limit} characters" in text, text
    assert f"maximum of {max_length} tokens" in text, text


# Sent with truncation off, in each API's words.
EMBED_STRICT = [
    ("/v1/embeddings", {"input": [SPACED], "truncation": False}),  # Voyage
    ("/embed", {"inputs": SPACED, "truncate": False}),  # TEI
    ("/v2/embed", {"texts": [SPACED], "input_type": "search_document", "truncate": "NONE"}),
    ("/api/embed", {"model": EMBEDDINGS_MODEL, "input": SPACED, "truncate": False}),  # Ollama
]


@pytest.mark.parametrize(("path", "body"), EMBED_STRICT, ids=[p for p, _ in EMBED_STRICT])
def test_whitespace_runs_use_up_none_of_the_characters_read(
    embeddings_server: LiveServer, path: str, body: dict[str, Any]
) -> None:
    """ruri-large's tokenizer (MeCab + WordPiece) makes no tokens of whitespace: a text
    over the characters it reads has its whitespace runs squeezed to one space first, so
    two words and thousands of spaces are read whole, with truncation off too (the same
    vector as the two words with one space)."""
    assert len(SPACED) > EMBEDDINGS_CHARS
    reply = post(embeddings_server, path, body)
    assert reply.status_code == 200, reply.text[:500]
    whole = post(embeddings_server, "/embed", {"inputs": SPACED, "normalize": False})
    expected = float_vectors(embeddings_server, ["東京 大阪"])
    np.testing.assert_allclose(whole.json(), expected, atol=1e-5)


@pytest.mark.parametrize("prompt_name", [None, "query"])
def test_cut_at_the_start_a_text_ending_in_whitespace_keeps_its_words(
    embeddings_server: LiveServer, prompt_name: str | None
) -> None:
    """TEI's truncation_direction=left (Cohere's START) on a text whose words fit, then
    thousands of spaces: the words' vector. Counted by characters, its last ones (all
    spaces) would have been kept."""
    words = japanese_text(300, seed=5)  # under 512 tokens
    body: dict[str, Any] = {
        "inputs": words + " " * EMBEDDINGS_CHARS,
        "truncation_direction": "left",
        "truncate": True,
        "normalize": False,
    }
    if prompt_name:
        body["prompt_name"] = prompt_name
    reply = post(embeddings_server, "/embed", body)
    assert reply.status_code == 200, reply.text[:500]
    prefix = "クエリ: " if prompt_name else ""
    np.testing.assert_allclose(
        reply.json(), float_vectors(embeddings_server, [prefix + words]), atol=1e-5
    )
    cohere = post(
        embeddings_server,
        "/v2/embed",
        {
            "texts": [words + "\n" * EMBEDDINGS_CHARS],
            "input_type": "search_query",
            "truncate": "START",
        },
    )
    assert cohere.status_code == 200, cohere.text[:500]
    got = np.float32(cohere.json()["embeddings"]["float"])
    np.testing.assert_allclose(
        got, float_vectors(embeddings_server, ["クエリ: " + words]), atol=1e-5
    )


def test_a_document_or_query_over_the_characters_read_is_refused_when_truncation_is_off(
    rerank_server: LiveServer,
) -> None:
    assert len(SPACED_DOC) > RERANK_CHARS
    refused = [
        ("/v1/rerank", {"query": "東京", "documents": ["a", SPACED_DOC], "truncation": False}),
        ("/rerank", {"query": "東京", "texts": [SPACED_DOC], "truncate": False}),  # TEI
        ("/v1/rerank", {"query": SPACED_DOC, "documents": ["a"], "truncation": False}),
        # Only its first 100 tokens were asked, but the characters read hold fewer.
        (
            "/v2/rerank",
            {
                "query": "東京",
                "documents": [SPACED_DOC],
                "max_tokens_per_doc": 100,
                "truncation": False,
            },
        ),
    ]
    for path, body in refused:
        assert_refused_for_characters(post(rerank_server, path, body), RERANK_CHARS, 8192)
    # Truncation on: the score of the document's first characters.
    reply = post(rerank_server, "/v1/rerank", {"query": "東京", "documents": [SPACED_DOC]})
    assert reply.status_code == 200, reply.text[:500]
    expected = scores_alone(rerank_server, "東京", [SPACED_DOC[:RERANK_CHARS]])
    assert reply.json()["results"][0]["relevance_score"] == pytest.approx(expected[0], abs=1e-5)
    # An ordinary long document of which the first 100 tokens are asked: those are read.
    long = japanese_text(RERANK_CHARS + 1000, seed=4)
    body = {"query": "東京", "documents": [long], "max_tokens_per_doc": 100, "truncation": False}
    ok = post(rerank_server, "/v2/rerank", body)
    assert ok.status_code == 200, ok.text[:500]


@pytest.fixture(scope="module")
def strict_server(hf_home: Any) -> Iterator[LiveServer]:
    """TRUNCATE=false, tokenizing in a tokenizer process (what it says travels the wire)."""
    settings = Settings(service_type="all", dtype="float32", truncate=False, tokenizer_workers=1)
    app = build_app(settings)
    with serve_app(app) as server:
        assert len(app.state.runtime.tokenizers.workers) == 1
        yield server


def test_truncate_false_from_a_tokenizer_process(strict_server: LiveServer) -> None:
    """What the tokenizer process says travels the wire: a document cut by characters
    is refused; a text of whitespace runs is squeezed there, not cut."""
    reply = post(strict_server, "/v1/rerank", {"query": "東京", "documents": [SPACED_DOC]})
    assert_refused_for_characters(reply, RERANK_CHARS, 8192)
    assert "TRUNCATE=false" in message(reply)
    spaced = post(strict_server, "/v1/embeddings", {"input": [SPACED]})
    assert spaced.status_code == 200, spaced.text[:500]
    one_space = post(strict_server, "/v1/embeddings", {"input": ["東京 大阪"]})
    assert spaced.json()["data"] == one_space.json()["data"]
