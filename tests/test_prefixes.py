"""Japanese retrieval done right: prefixes per family and input_type, ruri-v3, all-in-one.

The expected prefixes are written out here, independently of ``families.py``,
and every vector is compared with sentence-transformers' output for the
explicitly prefixed text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fake_openai_server.families import apply_prefix, family_for
from tests.support.live import LiveServer, serve_app
from tests.support.standins import RERANKER, RURI_LARGE, japanese_text

RURI_V3_30M = "cl-nagoya/ruri-v3-30m"

# (model, input_type) → the prefix the model was trained with.
EXPECTED = {
    RURI_LARGE: {
        None: "",
        "query": "クエリ: ",
        "search_query": "クエリ: ",
        "document": "文章: ",
        "search_document": "文章: ",
        "passage": "文章: ",
        "classification": "クエリ: ",
        "clustering": "クエリ: ",
        "similarity": "クエリ: ",
    },
    RURI_V3_30M: {
        None: "",
        "query": "検索クエリ: ",
        "search_query": "検索クエリ: ",
        "document": "検索文書: ",
        "search_document": "検索文書: ",
        "passage": "検索文書: ",
        "classification": "トピック: ",
        "clustering": "トピック: ",
        "similarity": "",
    },
}
TEXT = "瑠璃色はサファイアのような深い青色のことを指します。"


@pytest.fixture(scope="module")
def all_server(hf_home: Path) -> Iterator[LiveServer]:
    """SERVICE_TYPE=all with two embedding models and the reranker, in one process."""
    from fake_openai_server.api.app import build_app
    from fake_openai_server.settings import Settings

    settings = Settings(
        service_type="all", embeddings_model=f"{RURI_LARGE},{RURI_V3_30M}", dtype="float32"
    )
    assert settings.effective_port == 8080
    with serve_app(build_app(settings)) as server:
        yield server


@pytest.fixture(scope="module")
def references(hf_home: Path) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    return {name: SentenceTransformer(name, device="cpu") for name in EXPECTED}


def embed(server: LiveServer, model: str, text: str, input_type: str | None) -> tuple[Any, int]:
    body: dict[str, Any] = {"model": model, "input": [text]}
    if input_type is not None:
        body["input_type"] = input_type
    with server.client() as client:
        reply = client.post("/v1/embeddings", json=body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    return np.array(data["data"][0]["embedding"]), data["usage"]["prompt_tokens"]


@pytest.mark.parametrize("model", list(EXPECTED))
def test_prefix_matrix(all_server: LiveServer, references: dict[str, Any], model: str) -> None:
    reference = references[model]
    for input_type, prefix in EXPECTED[model].items():
        expected = reference.encode([prefix + TEXT])[0]
        expected_tokens = len(reference.tokenizer(prefix + TEXT)["input_ids"])
        # Plain text, and text that already carries the prefix as Dify sends it
        # ("文章:" joined with a space, or the prefix typed with its own space).
        sent = [TEXT]
        if prefix:
            sent += [prefix + TEXT, prefix.rstrip() + " " + TEXT, prefix + " " + TEXT]
        for text in sent:
            vector, tokens = embed(all_server, model, text, input_type)
            np.testing.assert_allclose(vector, expected, atol=2e-5, err_msg=f"{input_type} {text}")
            assert tokens == expected_tokens, (input_type, text)


def test_prefix_never_doubled_with_any_input_type(all_server: LiveServer) -> None:
    """A document prefix already present wins over a different requested input_type."""
    as_doc, _ = embed(all_server, RURI_LARGE, "文章: " + TEXT, "document")
    as_query, _ = embed(all_server, RURI_LARGE, "文章: " + TEXT, "query")
    np.testing.assert_allclose(as_doc, as_query, atol=1e-6)


def test_unknown_input_type_is_a_400(all_server: LiveServer) -> None:
    with all_server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": "x", "input_type": "image"})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "input_type"


def test_jinas_task_chooses_the_prefix_as_input_type_does(all_server: LiveServer) -> None:
    """Jina's clients (LlamaIndex's JinaEmbedding, CAMEL) send ``task``, not input_type:
    it had been ignored, so their queries and passages went without ruri's prefixes."""
    with all_server.client() as client:

        def vector(**fields: str) -> list[float]:
            reply = client.post("/v1/embeddings", json={"input": TEXT, **fields})
            assert reply.status_code == 200, reply.text
            return list(reply.json()["data"][0]["embedding"])

        for task, input_type in [("retrieval.query", "query"), ("retrieval.passage", "document")]:
            assert vector(task=task) == vector(input_type=input_type) != vector()
        assert vector(task="retrieval.query", input_type="document") == vector(
            input_type="document"
        )
        reply = client.post("/v1/embeddings", json={"input": "x", "task": "image"})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "task"
    assert "task must be one of" in reply.json()["error"]["message"]


def test_ruri_v3_long_context(all_server: LiveServer, references: dict[str, Any]) -> None:
    """ruri-v3 reads up to 8192 tokens; longer input is cut there, counted truthfully."""
    tokenizer = references[RURI_V3_30M].tokenizer
    text = japanese_text(30_000, seed=5)
    expected = len(tokenizer(text, truncation=True, max_length=8192)["input_ids"])
    assert expected == 8192
    vector, tokens = embed(all_server, RURI_V3_30M, text, None)
    assert tokens == 8192
    reference = references[RURI_V3_30M].encode([text])[0]
    np.testing.assert_allclose(vector, reference, atol=1e-4)


def test_all_mode_serves_both_apis_and_lists_every_model(all_server: LiveServer) -> None:
    with all_server.client() as client:
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]
        rerank = client.post("/v1/rerank", json={"query": "東京", "documents": ["東京", "大阪"]})
        v3 = client.post("/v1/embeddings", json={"model": "ruri-v3-30m", "input": "東京"})
    assert models == [RURI_LARGE, RURI_V3_30M, RERANKER]
    assert rerank.status_code == 200
    assert len(rerank.json()["results"]) == 2
    assert len(v3.json()["data"][0]["embedding"]) == 256  # the real ruri-v3-30m dimension


def test_all_mode_with_real_sdk_clients(all_server: LiveServer) -> None:
    import cohere
    import openai

    client = openai.OpenAI(base_url=f"{all_server.base_url}/v1", api_key="unused")
    response = client.embeddings.create(model=RURI_V3_30M, input=["東京", "大阪"])
    assert [len(d.embedding) for d in response.data] == [256, 256]

    co = cohere.ClientV2(base_url=all_server.base_url, api_key="unused")
    ranked = co.rerank(model=RERANKER, query="東京", documents=["大阪", "東京都"])
    assert sorted(r.index for r in ranked.results) == [0, 1]


def test_default_input_type_and_prefix_overrides_over_http(
    hf_home: Path, references: dict[str, Any]
) -> None:
    """DEFAULT_INPUT_TYPE gives a request without input_type its prefix (what the README
    tells Dify users who leave Dify's prefix fields empty), without doubling one Dify
    typed; QUERY_PREFIX replaces the family's query prefix."""
    from fake_openai_server.api.app import build_app
    from fake_openai_server.settings import Settings

    settings = Settings(
        service_type="embeddings",
        embeddings_model=RURI_LARGE,
        dtype="float32",
        default_input_type="document",
        query_prefix="問い: ",
    )
    reference = references[RURI_LARGE]
    with serve_app(build_app(settings)) as server:
        for text, input_type, expected in [
            (TEXT, None, "文章: " + TEXT),  # the server's default
            ("文章: " + TEXT, None, "文章: " + TEXT),  # Dify's own prefix, kept once
            (TEXT, "query", "問い: " + TEXT),  # the overridden query prefix
            ("問い: " + TEXT, "query", "問い: " + TEXT),
        ]:
            vector, tokens = embed(server, RURI_LARGE, text, input_type)
            np.testing.assert_allclose(
                vector, reference.encode([expected])[0], atol=2e-5, err_msg=f"{input_type} {text}"
            )
            assert tokens == len(reference.tokenizer(expected)["input_ids"]), (input_type, text)


def test_prefix_overrides_in_the_families() -> None:
    """QUERY/DOCUMENT_PREFIX replace a family's prefixes; other models get none."""
    from fake_openai_server.families import with_overrides

    family = family_for("cl-nagoya/ruri-large")
    assert apply_prefix(family, "本文", "document") == "文章: 本文"
    custom = with_overrides(family_for("intfloat/multilingual-e5-large"), "query: ", "passage: ")
    assert apply_prefix(custom, "本文", "query") == "query: 本文"
    assert apply_prefix(custom, "passage: 本文", "query") == "passage: 本文"
    assert apply_prefix(family_for("some/other-model"), "本文", "query") == "本文"
    assert family_for("cl-nagoya/ruri-v3-reranker-310m").name == "plain"
    # QUERY_PREFIX=" " is no query prefix; the other input types keep theirs (a prefix
    # of blanks had matched every text, and no text got a prefix).
    blank = with_overrides(family, " ", None)
    assert apply_prefix(blank, "本文", "query") == "本文"
    assert apply_prefix(blank, "本文", "document") == "文章: 本文"
