"""The other APIs a Japanese team's stack may already speak, with their real clients over
a real socket: text-embeddings-inference (huggingface_hub's InferenceClient, the client
LangChain's HuggingFaceEndpointEmbeddings uses), Ollama (the ollama client), Cohere
embed (the cohere SDK, v1 and v2) and Voyage AI (the voyageai client); plus the exact
requests Dify's TEI and Ollama providers send and the fields they read.

Expected vectors come from this server's OpenAI route (itself checked against
sentence-transformers in test_parity.py), or, over the fake backend, from
``fake_text_vector``, computed without the server.

Base URLs: InferenceClient posts to the URL it is given (the bare server URL means
POST /, as TEI serves it); the ollama client takes the bare URL; the cohere SDK appends
``v1/embed`` / ``v2/embed`` to the bare URL; the voyageai client appends
``/embeddings`` and ``/rerank`` to a base URL ending in ``/v1``.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import cohere
import httpx
import huggingface_hub.constants
import numpy as np
import ollama
import pytest
import voyageai
import voyageai.error
from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import HfHubHTTPError

from fake_openai_server.api.app import build_app
from fake_openai_server.settings import Settings
from tests.e2e.test_clients import DOCS, QUERY, TEXTS, Recorder, float_vectors, scores_alone
from tests.e2e.test_rerank_contract import expected_fake_order
from tests.support.contract import EMBEDDINGS_MODEL, RERANKER_MODEL, STANDIN_DIM, assert_error
from tests.support.fakes import (
    BOS,
    EOS,
    MAX_LENGTH,
    char_ids,
    fake_plugin,
    fake_text_vector,
    fake_vector,
)
from tests.support.live import LiveServer, serve_app
from tests.support.standins import japanese_text


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def typed_vectors(server: LiveServer, texts: list[str], input_type: str) -> np.ndarray:
    with server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": texts, "input_type": input_type})
    assert reply.status_code == 200, reply.text
    return np.asarray([d["embedding"] for d in reply.json()["data"]], dtype=np.float32)


# --- text-embeddings-inference: huggingface_hub's InferenceClient ---------------------------


@pytest.fixture
def hub_client_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests run with HF_HUB_OFFLINE=1, which makes huggingface_hub refuse every HTTP
    request, the loopback server's too. Lifted for the InferenceClient tests only: they
    talk to 127.0.0.1, and the stand-in models are already loaded."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_inference_client_at_the_bare_url_embeds_normalised(
    embeddings_server: LiveServer, hub_client_allowed: None
) -> None:
    """What LangChain's HuggingFaceEndpointEmbeddings does with a TEI URL (up to
    langchain-huggingface 0.3; 1.x accepts only Hub repo ids): ``InferenceClient(model=url)``
    and ``feature_extraction(text=texts)``, i.e. POST / with ``{"inputs": texts}``; its
    async methods do the same through AsyncInferenceClient."""
    client = InferenceClient(model=embeddings_server.base_url)
    got = client.feature_extraction(text=TEXTS)
    assert got.shape == (len(TEXTS), STANDIN_DIM)
    np.testing.assert_allclose(got, unit(float_vectors(embeddings_server, TEXTS)), atol=1e-5)
    one = client.feature_extraction(TEXTS[0])
    np.testing.assert_allclose(one, got[:1], atol=1e-6)

    async def in_parallel() -> list[Any]:
        async with AsyncInferenceClient(model=embeddings_server.base_url) as async_client:
            return list(
                await asyncio.gather(*(async_client.feature_extraction(text=[t]) for t in TEXTS))
            )

    parallel = np.concatenate(asyncio.run(in_parallel()))
    np.testing.assert_allclose(parallel, got, atol=1e-5)


def test_inference_client_embed_with_every_parameter(
    embeddings_server: LiveServer, hub_client_allowed: None
) -> None:
    client = InferenceClient(model=f"{embeddings_server.base_url}/embed")
    got = client.feature_extraction(
        TEXTS, normalize=False, prompt_name="query", truncate=True, truncation_direction="right"
    )
    np.testing.assert_allclose(got, typed_vectors(embeddings_server, TEXTS, "query"), atol=1e-5)
    documents = client.feature_extraction(TEXTS, normalize=False, prompt_name="document")
    assert not np.allclose(documents, got, atol=1e-4)  # the prefix changes the vector
    cut = client.feature_extraction(TEXTS[0], normalize=True, dimensions=16)
    np.testing.assert_allclose(
        cut, unit(float_vectors(embeddings_server, TEXTS[:1])[:, :16]), atol=1e-5
    )


def test_inference_client_sees_tei_errors(
    fake_server: LiveServer, hub_client_allowed: None
) -> None:
    client = InferenceClient(model=f"{fake_server.base_url}/embed")
    with pytest.raises(HfHubHTTPError) as bad:
        client.feature_extraction("東京", prompt_name="instruction")
    assert bad.value.response is not None and bad.value.response.status_code == 400
    assert "prompt_name must be one of" in str(bad.value)
    body = bad.value.response.json()
    assert body == {"error": body["error"], "error_type": "Validation"}


def test_inference_client_at_the_other_services_url_is_told_where_to_go(
    embeddings_server: LiveServer, rerank_server: LiveServer, hub_client_allowed: None
) -> None:
    """POST / reranks on a reranker and embeds on an embedder (as TEI does): an embedding
    client given the reranker's URL had been told "'query' is required"."""
    with pytest.raises(HfHubHTTPError) as bad:
        InferenceClient(model=rerank_server.base_url).feature_extraction("東京")
    assert bad.value.response is not None and bad.value.response.status_code == 400
    for part in ("SERVICE_TYPE=reranker", "SERVICE_TYPE=embeddings", "8081"):
        assert part in str(bad.value), str(bad.value)
    assert set(bad.value.response.json()) == {"error", "error_type"}
    with embeddings_server.client() as client:  # TEI's rerank body at an embedder's root
        reply = client.post("/", json={"query": "東京", "texts": ["東京都", "大阪"]})
    assert reply.status_code == 400, reply.text
    assert "SERVICE_TYPE=reranker" in reply.json()["error"] and "8082" in reply.json()["error"]


def cosines(vectors: np.ndarray) -> np.ndarray:
    """Each row's cosine similarity to the first, the others' order kept."""
    rows = unit(vectors)
    return rows[1:] @ rows[0]


def test_inference_client_sentence_similarity(
    embeddings_server: LiveServer, hub_client_allowed: None
) -> None:
    """``sentence_similarity`` posts ``{"inputs": {"source_sentence", "sentences"}}`` to
    the URL it was given: TEI's /similarity, or the bare URL (POST /, as TEI started with
    TASK=sentence-similarity answers it); each sentence's cosine to the source's."""
    expected = cosines(float_vectors(embeddings_server, [QUERY, *DOCS]))
    for url in (embeddings_server.base_url, f"{embeddings_server.base_url}/similarity"):
        got = InferenceClient(model=url).sentence_similarity(QUERY, other_sentences=DOCS)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert int(np.argmax(expected)) != int(np.argmin(expected))  # the sentences differ


def test_tei_similarity_parameters_and_sagemakers_invocations(fake_server: LiveServer) -> None:
    """TEI's ``parameters`` (prompt_name, truncate, truncation_direction) apply to every
    sentence; SageMaker's POST /invocations is POST / (embed, or similarity by the body)."""
    body = {"inputs": {"source_sentence": QUERY, "sentences": DOCS}}
    plain = post(fake_server, "/similarity", body)
    assert plain.status_code == 200, plain.text
    as_queries = post(fake_server, "/similarity", {**body, "parameters": {"prompt_name": "query"}})
    assert as_queries.status_code == 200, as_queries.text
    queries = typed_vectors(fake_server, [QUERY, *DOCS], "query")
    np.testing.assert_allclose(as_queries.json(), cosines(queries), atol=1e-5)
    assert not np.allclose(as_queries.json(), plain.json(), atol=1e-4)  # the prefix counts
    invoked = post(fake_server, "/invocations", body)
    assert (invoked.status_code, invoked.json()) == (200, plain.json())
    embedded = post(fake_server, "/invocations", {"inputs": DOCS})
    assert embedded.json() == post(fake_server, "/embed", {"inputs": DOCS}).json()
    long = "あ" * 100  # over the fake model's 32 tokens
    cut = {"inputs": {"source_sentence": QUERY, "sentences": [long]}}
    left = post(fake_server, "/similarity", {**cut, "parameters": {"truncation_direction": "left"}})
    right = post(fake_server, "/similarity", cut)
    assert left.status_code == right.status_code == 200, (left.text, right.text)
    refused = post(fake_server, "/similarity", {**cut, "parameters": {"truncate": False}})
    assert refused.status_code == 400
    assert refused.json()["error_type"] == "Validation"


# --- text-embeddings-inference: the routes themselves ----------------------------------------


def post(server: LiveServer, path: str, body: Any) -> httpx.Response:
    with server.client() as client:
        return client.post(path, json=body)


def test_tei_rerank_shape_next_to_the_cohere_shape(rerank_server: LiveServer) -> None:
    tei = post(rerank_server, "/rerank", {"query": QUERY, "texts": DOCS, "return_text": True})
    assert tei.status_code == 200, tei.text
    ranks = tei.json()
    expected = scores_alone(rerank_server, QUERY, DOCS)
    assert [r["index"] for r in ranks] == sorted(range(len(DOCS)), key=lambda i: -expected[i])
    for rank in ranks:
        assert set(rank) == {"index", "text", "score"}
        assert rank["text"] == DOCS[rank["index"]]
        assert rank["score"] == pytest.approx(expected[rank["index"]], abs=1e-5)
    raw = post(rerank_server, "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True})
    for rank in raw.json():
        assert set(rank) == {"index", "score"}
        logit = rank["score"]
        assert 1 / (1 + np.exp(-logit)) == pytest.approx(expected[rank["index"]], abs=1e-5)
    cohere_shape = post(rerank_server, "/rerank", {"query": QUERY, "documents": DOCS})
    assert cohere_shape.status_code == 200
    assert {r["index"] for r in cohere_shape.json()["results"]} == set(range(len(DOCS)))


def test_tei_post_root_on_a_reranker_reranks(rerank_server: LiveServer) -> None:
    reply = post(rerank_server, "/", {"query": QUERY, "texts": DOCS})
    assert reply.status_code == 200, reply.text
    assert sorted(r["index"] for r in reply.json()) == list(range(len(DOCS)))


def test_tei_truncate_false_refuses_what_truncate_true_cuts(embeddings_server: LiveServer) -> None:
    long = japanese_text(3000, seed=5)
    refused = post(embeddings_server, "/embed", {"inputs": long, "truncate": False})
    assert refused.status_code == 400
    assert refused.json()["error_type"] == "Validation"
    assert "maximum of 512" in refused.json()["error"]
    cut = post(embeddings_server, "/embed", {"inputs": long, "truncate": True, "normalize": False})
    assert cut.status_code == 200
    np.testing.assert_allclose(cut.json(), float_vectors(embeddings_server, [long]), atol=1e-5)


def test_tei_left_truncation_keeps_the_end_and_the_prefix(fake_server: LiveServer) -> None:
    """Over the fake model one character is one token: the cut is exactly predictable."""
    body = "".join(chr(0x3042 + i % 80) for i in range(200))
    reply = post(
        fake_server,
        "/embed",
        {
            "inputs": body,
            "truncation_direction": "left",
            "prompt_name": "query",
            "normalize": False,
        },
    )
    assert reply.status_code == 200, reply.text
    prefix = "クエリ: "
    kept = MAX_LENGTH - 2 - len(prefix)
    expected = fake_vector([BOS, *char_ids(prefix + body[-kept:]), EOS])
    np.testing.assert_allclose(reply.json()[0], expected, rtol=1e-6)
    right = post(
        fake_server, "/embed", {"inputs": body, "prompt_name": "query", "normalize": False}
    )
    np.testing.assert_allclose(right.json()[0], fake_text_vector(prefix + body), rtol=1e-6)


def test_tei_left_truncation_with_the_real_tokenizer(embeddings_server: LiveServer) -> None:
    """Cut at the start, two texts that end alike (over the whole 512 tokens) embed alike,
    and unlike the same text cut at the end."""
    tail = japanese_text(3000, seed=9)
    body = {"truncation_direction": "left", "prompt_name": "query", "normalize": False}
    first = post(
        embeddings_server, "/embed", {**body, "inputs": japanese_text(5000, seed=3) + tail}
    )
    second = post(embeddings_server, "/embed", {**body, "inputs": "別の書き出し。" * 200 + tail})
    assert first.status_code == second.status_code == 200, first.text
    np.testing.assert_allclose(first.json(), second.json(), atol=1e-5)
    right = post(embeddings_server, "/embed", {"inputs": tail, "prompt_name": "query"})
    assert not np.allclose(unit(np.float32(first.json())), right.json(), atol=1e-3)


def test_tei_tokenize_and_decode_with_the_real_tokenizer(
    embeddings_server: LiveServer, ruri_tokenizer: Any
) -> None:
    text = "東京は日本の首都です。"
    reply = post(embeddings_server, "/tokenize", {"inputs": [text], "prompt_name": "document"})
    assert reply.status_code == 200, reply.text
    tokens = reply.json()[0]
    ids = [t["id"] for t in tokens]
    assert ids == ruri_tokenizer("文章: " + text)["input_ids"]
    assert tokens[0]["special"] and tokens[-1]["special"]  # [CLS] ... [SEP]
    assert tokens[0]["start"] is None
    utf8 = ("文章: " + text).encode()
    for token in tokens[1:-1]:
        assert not token["special"]
        # Byte offsets into the input's UTF-8, as TEI gives them (a kanji is 3 bytes).
        assert utf8[token["start"] : token["stop"]].decode() == token["text"]
    assert tokens[-2]["stop"] == len(utf8)
    plain = post(embeddings_server, "/tokenize", {"inputs": text, "add_special_tokens": False})
    assert [t["id"] for t in plain.json()[0]] == ruri_tokenizer(text, add_special_tokens=False)[
        "input_ids"
    ]
    decoded = post(embeddings_server, "/decode", {"ids": ids})
    assert decoded.status_code == 200
    assert decoded.json() == [ruri_tokenizer.decode(ids, skip_special_tokens=True)]
    both = post(embeddings_server, "/decode", {"ids": [ids, ids], "skip_special_tokens": False})
    assert both.json() == [ruri_tokenizer.decode(ids, skip_special_tokens=False)] * 2


def test_tei_tokenize_over_the_fake_tokenizer(fake_server: LiveServer) -> None:
    reply = post(fake_server, "/tokenize", {"inputs": "東京"})
    assert [(t["text"], t["special"], t["start"]) for t in reply.json()[0]] == [
        ("<s>", True, None),
        ("東", False, 0),
        ("京", False, 3),  # bytes, as TEI
        ("</s>", True, None),
    ]


# --- Dify's text-embeddings-inference provider --------------------------------------------------


def test_dify_xinference_provider_finds_each_models_type(fake_server: LiveServer) -> None:
    """Dify's Xinference provider looks its model uid up at {server_url}/v1/models/{uid}
    (a uid holds no slash: the short name) and adds only a model whose model_type it
    knows; it had been refused as "Invalid api key"."""
    with fake_server.client() as client:
        info = client.get("/info").json()["models"]
        embedding = client.get("/v1/models/ruri-large").json()
        reranker = client.get("/v1/models/ruri-v3-reranker-310m").json()
    assert embedding["model_type"] == "embedding" and embedding["model_ability"] == ["embed"]
    assert embedding["context_length"] == info[EMBEDDINGS_MODEL]["max_length"]
    assert reranker["model_type"] == "rerank"
    assert reranker["context_length"] == info[RERANKER_MODEL]["max_length"]


def test_dify_tei_embedding_provider(embeddings_server: LiveServer) -> None:
    """Credentials check: GET {server_url}/info (first model_type key must be "embedding";
    max_input_length, max_client_batch_size), then an embed of "ping". Embeddings go to
    {server_url}/v1/embeddings with {"input": texts} and nothing else; Dify reads
    data[*].embedding."""
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=embeddings_server.base_url, headers=headers, timeout=60) as http:
        info = http.get("/info").json()
        assert next(iter(info["model_type"])) == "embedding"
        assert info["max_input_length"] == 512
        assert info["max_client_batch_size"] >= 1
        for texts in (["ping"], TEXTS[: info["max_client_batch_size"]]):
            reply = http.post("/v1/embeddings", json={"input": texts})
            assert reply.status_code == 200, reply.text
            got = [item["embedding"] for item in reply.json()["data"]]
            np.testing.assert_allclose(got, float_vectors(embeddings_server, texts), atol=1e-5)


def test_dify_tei_rerank_provider(rerank_server: LiveServer) -> None:
    """Credentials check: /info's first model_type key must be "reranker", then a rerank
    with score_threshold 0.8. Rerank posts {"query", "texts", "return_text": true} to
    {server_url}/rerank and reads index, text and score, in order, stopping at top_n."""
    with httpx.Client(base_url=rerank_server.base_url, timeout=60) as http:
        info = http.get("/info").json()
        assert next(iter(info["model_type"])) == "reranker"
        assert info["max_input_length"] == 8192
        reply = http.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True})
    assert reply.status_code == 200, reply.text
    top_n, threshold, kept = 2, 0.0, []
    for result in reply.json():
        if result["score"] >= threshold:
            kept.append((result["index"], result["text"], result["score"]))
        if len(kept) >= top_n:
            break
    expected = scores_alone(rerank_server, QUERY, DOCS)
    best = sorted(range(len(DOCS)), key=lambda i: -expected[i])[:top_n]
    assert [index for index, _, _ in kept] == best
    assert [text for _, text, _ in kept] == [DOCS[i] for i in best]


def test_info_on_a_combined_server_lists_the_embedding_model_first(fake_server: LiveServer) -> None:
    info = post_get(fake_server, "/info")
    assert list(info["model_type"]) == ["embedding", "reranker"]
    assert info["model_id"] == info["served_model_name"] == EMBEDDINGS_MODEL
    assert info["version"] == version("fake-openai-server")  # ours, not a TEI version
    assert {"service_type", "models", "limits", "engine", "quantization"} <= set(info)


def post_get(server: LiveServer, path: str) -> Any:
    with server.client() as client:
        reply = client.get(path)
    assert reply.status_code == 200, reply.text
    return reply.json()


# --- Ollama: the ollama client ---------------------------------------------------------------


def test_ollama_client_embed_is_normalised(embeddings_server: LiveServer) -> None:
    client = ollama.Client(host=embeddings_server.base_url)
    reply = client.embed(model=f"{EMBEDDINGS_MODEL}:latest", input=TEXTS, truncate=True)
    got = np.asarray(reply.embeddings, dtype=np.float32)
    np.testing.assert_allclose(got, unit(float_vectors(embeddings_server, TEXTS)), atol=1e-5)
    assert reply.prompt_eval_count and reply.prompt_eval_count > len(TEXTS)
    one = client.embed(model="ruri-large", input=TEXTS[0], dimensions=8)
    cut = float_vectors(embeddings_server, TEXTS[:1])[:, :8]
    np.testing.assert_allclose(one.embeddings, unit(cut), atol=1e-5)


@pytest.mark.parametrize("dimensions", [0, -3, STANDIN_DIM, STANDIN_DIM + 1, 100_000])
def test_ollama_dimensions_cut_only_to_fewer(
    embeddings_server: LiveServer, dimensions: int
) -> None:
    """Ollama cuts only when 0 < dimensions < the model's size, and leaves the vectors whole
    for any other value (a client set for a wider model works)."""
    client = ollama.Client(host=embeddings_server.base_url)
    reply = client.embed(model="ruri-large", input=TEXTS[0], dimensions=dimensions)
    whole = unit(float_vectors(embeddings_server, TEXTS[:1]))
    np.testing.assert_allclose(reply.embeddings, whole, atol=1e-5)


@pytest.mark.parametrize("loading", ["", [], None])
def test_ollama_empty_input_only_loads_and_a_list_of_one_empty_text_is_refused(
    fake_server: LiveServer, loading: object
) -> None:
    """``[""]`` is one text, as in Ollama (its empty answer had left LangChain's
    ``embed_query("")`` an IndexError); ``""``, ``[]`` and null only load the model."""
    with fake_server.client() as client:
        loaded = client.post("/api/embed", json={"model": "ruri-large", "input": loading})
        one_empty = client.post("/api/embed", json={"model": "ruri-large", "input": [""]})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["embeddings"] == []
    assert one_empty.status_code == 400
    assert "input[0] is empty" in one_empty.json()["error"]


def test_ollama_client_legacy_embeddings_are_the_models_own(embeddings_server: LiveServer) -> None:
    client = ollama.Client(host=embeddings_server.base_url)
    reply = client.embeddings(model="ruri-large", prompt=TEXTS[1])
    np.testing.assert_allclose(
        reply.embedding, float_vectors(embeddings_server, TEXTS[1:2])[0], atol=1e-5
    )


@pytest.fixture(scope="module")
def normalizing_server() -> Iterator[LiveServer]:
    """The fake backends with NORMALIZE=true."""
    settings = Settings(service_type="all", warmup=False, normalize=True)
    with serve_app(build_app(settings, fake_plugin())) as server:
        yield server


def test_ollama_legacy_embeddings_stay_the_models_own_under_normalize(
    normalizing_server: LiveServer,
) -> None:
    """Ollama's /api/embeddings gives the model's vector as it is; with NORMALIZE=true it
    had been normalised (the OpenAI route is, as NORMALIZE asks)."""
    client = ollama.Client(host=normalizing_server.base_url)
    reply = client.embeddings(model="ruri-large", prompt=TEXTS[1])
    own = fake_text_vector(TEXTS[1])
    np.testing.assert_allclose(reply.embedding, own, rtol=1e-6)
    assert abs(np.linalg.norm(own) - 1) > 0.1  # the fake vector is not unit length
    assert_unit_rows(_openai_vectors(normalizing_server, {"input": TEXTS[1]}))


def _openai_vectors(server: LiveServer, body: dict[str, Any]) -> np.ndarray:
    with server.client() as client:
        reply = client.post("/v1/embeddings", json=body)
    assert reply.status_code == 200, reply.text
    return np.asarray([d["embedding"] for d in reply.json()["data"]], dtype=np.float32)


def assert_unit_rows(vectors: np.ndarray) -> None:
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_jina_normalized_is_honoured_both_ways(
    fake_server: LiveServer, normalizing_server: LiveServer
) -> None:
    """Jina's ``normalized`` (LangChain JS's JinaEmbeddings sends it) had been dropped: a
    client asking for unit vectors got the model's own under the default NORMALIZE=false."""
    own = np.asarray([fake_text_vector(text) for text in TEXTS], dtype=np.float32)
    asked = {"input": TEXTS, "model": "ruri-large"}
    unit_ones = _openai_vectors(fake_server, {**asked, "normalized": True})
    np.testing.assert_allclose(unit_ones, unit(own), rtol=1e-5)
    raw = _openai_vectors(normalizing_server, {**asked, "normalized": False})
    np.testing.assert_allclose(raw, own, rtol=1e-5)
    assert_unit_rows(_openai_vectors(normalizing_server, asked))  # unsaid: NORMALIZE
    with fake_server.client() as client:
        refused = client.post("/v1/embeddings", json={**asked, "normalized": "yes"})
    assert refused.status_code == 400, refused.text


def test_jina_older_encoding_type_is_embedding_type(fake_server: LiveServer) -> None:
    """LlamaIndex's JinaEmbedding sends ``encoding_type`` (Jina's older name): it had been
    ignored, and the float vectors it got back were read as packed bits."""
    own = np.asarray([fake_text_vector(text) for text in TEXTS], dtype=np.float32)
    with fake_server.client() as client:
        replies = [
            client.post("/v1/embeddings", json={"input": TEXTS, field: "ubinary"})
            for field in ("encoding_type", "embedding_type")
        ]
        clash = {"input": TEXTS, "encoding_type": "binary", "embedding_type": "float"}
        refused = client.post("/v1/embeddings", json=clash)
    older, newer = (np.asarray([d["embedding"] for d in r.json()["data"]]) for r in replies)
    np.testing.assert_array_equal(older, np.packbits(own > 0, axis=1))
    np.testing.assert_array_equal(older, newer)
    assert_error(refused, 400, param="embedding_type", contains="encoding_type")


def test_jina_text_objects_are_texts(fake_server: LiveServer) -> None:
    """Jina's object inputs (Dify's Jina provider sends them for v4 and CLIP models,
    LlamaIndex TS types them): ``{"text": ...}`` is the text; an image is refused by name."""
    plain = _openai_vectors(fake_server, {"input": TEXTS})
    objects = [{"text": text} for text in TEXTS[:-1]] + [TEXTS[-1]]
    np.testing.assert_array_equal(_openai_vectors(fake_server, {"input": objects}), plain)
    with fake_server.client() as client:
        image = client.post("/v1/embeddings", json={"input": [{"text": "a"}, {"image": "x.png"}]})
        empty = client.post("/v1/embeddings", json={"input": [{"text": "a"}, {}]})
        blank = client.post("/v1/embeddings", json={"input": [{"text": " "}]})
    assert_error(image, 400, param="input", contains="input[1] gives 'image'")
    assert_error(empty, 400, param="input", contains="input[1] has no 'text'")
    assert_error(blank, 400, param="input", contains="input[0] is empty")


def test_ollama_client_list_show_and_errors(fake_server: LiveServer) -> None:
    client = ollama.Client(host=fake_server.base_url)
    names = [m.model for m in client.list().models]
    assert names == [f"{EMBEDDINGS_MODEL}:latest", f"{RERANKER_MODEL}:latest"]
    running = client.ps().models  # loaded: every model, for as long as the server runs
    assert [m.model for m in running] == names
    info = post_get(fake_server, "/info")["models"]
    assert [m.context_length for m in running] == [
        info[EMBEDDINGS_MODEL]["max_length"],
        info[RERANKER_MODEL]["max_length"],
    ]
    assert all(m.expires_at and m.expires_at.year == 9999 for m in running)
    shown = client.show(f"{EMBEDDINGS_MODEL}:latest")
    assert shown.capabilities == ["embedding"]
    assert shown.modelinfo is not None and shown.modelinfo["bert.embedding_length"] == 8
    with pytest.raises(ollama.ResponseError) as unknown:
        client.show("llama3")
    assert unknown.value.status_code == 404  # naming every model served, of both kinds
    assert EMBEDDINGS_MODEL in unknown.value.error and RERANKER_MODEL in unknown.value.error
    with pytest.raises(ollama.ResponseError) as missing:
        client.embed(model="nomic-embed-text", input="東京")
    assert missing.value.status_code == 404
    assert "nomic-embed-text" in missing.value.error and EMBEDDINGS_MODEL in missing.value.error
    with pytest.raises(ollama.ResponseError) as empty:
        client.embed(model="ruri-large", input=["東京", " "])
    assert empty.value.status_code == 400 and "input[1] is empty" in empty.value.error
    loaded = client.embed(model="ruri-large", input="")  # loads the model: no vectors
    assert loaded.embeddings == []
    assert post_get(fake_server, "/api/version")["version"]


PULL_NOT_FOUND = "pull model manifest: file does not exist"  # Ollama's text, its CLI's test


def test_ollama_client_pulls_a_served_model(fake_server: LiveServer) -> None:
    """Tools pull a model before they use it (the client's pull(), Open WebUI's model
    manager, ``ollama pull``): a served one is already here, by any name /api/embed takes."""
    client = ollama.Client(host=fake_server.base_url)
    for name in (f"{EMBEDDINGS_MODEL}:latest", "ruri-large", RERANKER_MODEL):
        progress = [p.status for p in client.pull(name, stream=True)]
        assert progress == ["pulling manifest", "success"], name
        assert client.pull(name).status == "success"  # the client's default: stream false


def test_ollama_client_pull_of_a_model_not_served_is_404(fake_server: LiveServer) -> None:
    """Nothing is downloaded: Ollama's not-found text (its CLI looks for it), then why,
    naming the models served; before any progress line, streamed or not."""
    client = ollama.Client(host=fake_server.base_url)
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.pull("llama3", stream=True))
    with pytest.raises(ollama.ResponseError) as alone:
        client.pull("llama3:latest")
    for unknown in (streamed.value, alone.value):
        assert unknown.status_code == 404
        assert unknown.error.startswith(f"{PULL_NOT_FOUND}: 'llama3' is not a model")
        assert "cannot download" in unknown.error
        assert EMBEDDINGS_MODEL in unknown.error and RERANKER_MODEL in unknown.error


def test_ollama_pull_streams_ndjson_as_ollama_and_its_cli_send_it(fake_server: LiveServer) -> None:
    """Streamed by default, as Ollama; the ollama CLI sends the older ``name`` with an
    empty ``model`` (and the empty username and password Ollama ignores)."""
    cli = {"model": "", "name": "ruri-large", "username": "", "password": ""}
    with fake_server.client() as client:
        streamed = client.post("/api/pull", json=cli)
        alone = client.post("/api/pull", json={"model": "ruri-large:latest", "stream": False})
        not_served = client.post("/api/pull", json={"name": "nomic-embed-text", "stream": True})
    assert streamed.status_code == 200, streamed.text
    assert streamed.headers["content-type"] == "application/x-ndjson"
    assert streamed.text.splitlines() == ['{"status":"pulling manifest"}', '{"status":"success"}']
    assert streamed.text.endswith("\n")
    assert alone.status_code == 200 and alone.headers["content-type"] == "application/json"
    assert alone.json() == {"status": "success"}
    assert not_served.status_code == 404
    assert not_served.headers["content-type"] == "application/json"
    assert set(not_served.json()) == {"error"}
    assert not_served.json()["error"].startswith(f"{PULL_NOT_FOUND}: 'nomic-embed-text'")


@pytest.mark.parametrize("service_type", ["embeddings", "reranker"])
def test_ollama_pull_knows_the_models_tags_lists(service_type: str) -> None:
    """What /api/tags lists pulls, and MODEL_ALIASES too; the other service's model is
    not served here, as /api/show says."""
    settings = Settings(
        service_type=service_type,
        warmup=False,
        model_aliases="text-embedding-3-small=ruri-large,rr=ruri-v3-reranker-310m",
    )
    with serve_app(build_app(settings, fake_plugin())) as server:
        client = ollama.Client(host=server.base_url)
        listed = [m.model for m in client.list().models]
        alias, other = ("text-embedding-3-small", RERANKER_MODEL)
        if service_type == "reranker":
            alias, other = ("rr", EMBEDDINGS_MODEL)
        for name in [*listed, alias]:
            assert name and client.pull(name).status == "success", name
        with pytest.raises(ollama.ResponseError) as shown:
            client.show(other)
        with pytest.raises(ollama.ResponseError) as pulled:
            client.pull(other)
    assert shown.value.status_code == pulled.value.status_code == 404
    assert pulled.value.error.startswith(PULL_NOT_FOUND) and f", {alias}." in pulled.value.error


def test_ollama_truncate_false_refuses(fake_server: LiveServer) -> None:
    client = ollama.Client(host=fake_server.base_url)
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model="ruri-large", input="あ" * 100, truncate=False)
    assert refused.value.status_code == 400 and "not to truncate" in refused.value.error
    assert len(client.embed(model="ruri-large", input="あ" * 100).embeddings) == 1


# --- Dify's Ollama provider ------------------------------------------------------------------


def test_dify_ollama_embedding_provider(embeddings_server: LiveServer) -> None:
    """{base_url}/api/embed with {"input", "model", "truncate": true, "options"}; reads
    "embeddings". Its credentials check embeds ["ping"]."""
    for texts in (["ping"], TEXTS):
        body = {
            "input": texts,
            "model": EMBEDDINGS_MODEL,
            "truncate": True,
            "options": {"use_mmap": True},
        }
        reply = post(embeddings_server, "/api/embed", body)
        assert reply.status_code == 200, reply.text
        got = reply.json()["embeddings"]
        np.testing.assert_allclose(got, unit(float_vectors(embeddings_server, texts)), atol=1e-5)


def test_dify_ollama_rerank_provider(rerank_server: LiveServer) -> None:
    """{base_url}/api/rerank with {"model", "query", "documents", "top_n"}; reads
    results[*].index, relevance_score, and document as a string when present."""
    body = {"model": RERANKER_MODEL, "query": QUERY, "documents": DOCS, "top_n": 3}
    reply = post(rerank_server, "/api/rerank", body)
    assert reply.status_code == 200, reply.text
    expected = scores_alone(rerank_server, QUERY, DOCS)
    results = reply.json()["results"][:3]
    assert [r["index"] for r in results] == sorted(range(len(DOCS)), key=lambda i: -expected[i])[:3]
    for item in results:
        text = item["document"] if "document" in item else DOCS[item["index"]]
        assert isinstance(text, str)
        assert item["relevance_score"] == pytest.approx(expected[item["index"]], abs=1e-5)


# --- Cohere embed: the cohere SDK -------------------------------------------------------------


def test_cohere_v1_embed_floats(embeddings_server: LiveServer) -> None:
    recorder = Recorder()
    client = cohere.Client(
        base_url=embeddings_server.base_url,
        api_key="unused",
        httpx_client=httpx.Client(event_hooks={"request": [recorder]}),
    )
    reply = client.embed(texts=TEXTS, model=EMBEDDINGS_MODEL, input_type="search_query")
    assert recorder.paths == ["/v1/embed"]
    assert reply.response_type == "embeddings_floats"
    expected = typed_vectors(embeddings_server, TEXTS, "query")
    np.testing.assert_allclose(np.float32(reply.embeddings), expected, atol=1e-5)
    assert reply.texts == TEXTS
    assert reply.meta is not None and reply.meta.billed_units is not None
    assert reply.meta.billed_units.input_tokens and reply.meta.billed_units.input_tokens > 0


def test_cohere_v1_embed_by_type(fake_server: LiveServer) -> None:
    client = cohere.Client(base_url=fake_server.base_url, api_key="unused")
    reply = client.embed(
        texts=TEXTS, model=EMBEDDINGS_MODEL, embedding_types=["float", "ubinary", "binary"]
    )
    assert reply.response_type == "embeddings_by_type"
    floats = np.float32(reply.embeddings.float_)
    np.testing.assert_allclose(floats, [fake_text_vector(t) for t in TEXTS], rtol=1e-6)
    bits = np.packbits(floats > 0, axis=1)
    assert reply.embeddings.ubinary == bits.tolist()
    assert reply.embeddings.binary == (bits.astype(int) - 128).tolist()


def test_cohere_v2_embed(embeddings_server: LiveServer) -> None:
    recorder = Recorder()
    client = cohere.ClientV2(
        base_url=embeddings_server.base_url,
        api_key="unused",
        httpx_client=httpx.Client(event_hooks={"request": [recorder]}),
    )
    reply = client.embed(
        texts=TEXTS,
        model=EMBEDDINGS_MODEL,
        input_type="search_document",
        embedding_types=["float", "base64"],
        output_dimension=32,
    )
    assert recorder.paths == ["/v2/embed"]
    expected = typed_vectors(embeddings_server, TEXTS, "document")[:, :32]
    np.testing.assert_allclose(np.float32(reply.embeddings.float_), expected, atol=1e-5)
    assert reply.embeddings.base64 is not None
    decoded = [np.frombuffer(base64.b64decode(b), dtype="<f4") for b in reply.embeddings.base64]
    np.testing.assert_allclose(decoded, expected, atol=1e-5)
    assert reply.meta is not None and reply.meta.api_version is not None
    assert reply.meta.api_version.version == "2"


def test_cohere_v2_inputs_and_truncate(fake_server: LiveServer) -> None:
    client = cohere.ClientV2(base_url=fake_server.base_url, api_key="unused")
    inputs = [{"content": [{"type": "text", "text": "東京"}, {"type": "text", "text": "大阪"}]}]
    reply = client.embed(
        inputs=inputs,  # type: ignore[arg-type]  # plain JSON dicts, not the SDK's models
        model=EMBEDDINGS_MODEL,
        input_type="clustering",
        embedding_types=["float"],
    )
    expected = fake_text_vector("クエリ: 東京\n大阪")  # ruri's prefix for clustering
    np.testing.assert_allclose(reply.embeddings.float_[0], expected, rtol=1e-6)
    with pytest.raises(cohere.BadRequestError) as refused:
        client.embed(
            texts=["あ" * 100],
            model=EMBEDDINGS_MODEL,
            input_type="search_query",
            embedding_types=["float"],
            truncate="NONE",
        )
    assert "not to truncate" in refused.value.body["message"]
    start = client.embed(
        texts=["あい" * 50],
        model=EMBEDDINGS_MODEL,
        input_type="search_query",
        embedding_types=["float"],
        truncate="START",
    )
    end = client.embed(
        texts=["あい" * 50],
        model=EMBEDDINGS_MODEL,
        input_type="search_query",
        embedding_types=["float"],
        truncate="END",
    )
    prefix, kept = "クエリ: ", MAX_LENGTH - 2 - len("クエリ: ")
    np.testing.assert_allclose(
        start.embeddings.float_[0],
        fake_vector([BOS, *char_ids(prefix + ("あい" * 50)[-kept:]), EOS]),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        end.embeddings.float_[0], fake_text_vector(prefix + "あい" * 50), rtol=1e-6
    )
    with pytest.raises(cohere.BadRequestError) as image:
        client.embed(
            inputs=[{"content": [{"type": "image_url", "image_url": {"url": "data:"}}]}],  # type: ignore[list-item]
            model=EMBEDDINGS_MODEL,
            input_type="search_query",
            embedding_types=["float"],
        )
    assert "text only" in image.value.body["message"]


def test_cohere_sdk_sees_unknown_model_as_404(fake_server: LiveServer) -> None:
    client = cohere.Client(base_url=fake_server.base_url, api_key="unused")
    with pytest.raises(cohere.NotFoundError) as missing:
        client.embed(texts=["東京"], model="embed-multilingual-v3.0")
    assert EMBEDDINGS_MODEL in missing.value.body["message"]


# --- Voyage AI: the voyageai client ----------------------------------------------------------


def test_voyage_clients_without_top_k_get_data(fake_server: LiveServer) -> None:
    """Continue's Voyage reranker sends {query, documents, model} and reads data; LiteLLM's
    voyage provider sends top_k only with top_n, and reads data[*].document as a string.
    Cohere's and Jina's clients on the same path read results, documents as objects."""
    expected = expected_fake_order(QUERY, DOCS)
    with fake_server.client() as client:
        plain = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
        echoed = client.post(
            "/v1/rerank", json={"query": QUERY, "documents": DOCS, "return_documents": True}
        )
        v2 = client.post("/v2/rerank", json={"query": QUERY, "documents": DOCS})
    assert [r["index"] for r in plain.json()["data"]] == expected
    assert plain.json()["object"] == "list"
    body = echoed.json()
    assert [r["document"] for r in body["data"]] == [DOCS[i] for i in expected]
    assert [r["document"] for r in body["results"]] == [{"text": DOCS[i]} for i in expected]
    assert [r["relevance_score"] for r in body["data"]] == [
        r["relevance_score"] for r in body["results"]
    ]
    assert "data" not in v2.json()  # Cohere v2's path: its own reply only


def test_voyageai_embed_float_and_dimension(embeddings_server: LiveServer) -> None:
    client = voyageai.Client(api_key="unused", base_url=f"{embeddings_server.base_url}/v1")
    reply = client.embed(TEXTS, model=EMBEDDINGS_MODEL, input_type="query", output_dimension=16)
    expected = typed_vectors(embeddings_server, TEXTS, "query")[:, :16]
    np.testing.assert_allclose(np.float32(reply.embeddings), expected, atol=1e-5)
    assert reply.total_tokens > len(TEXTS)


@pytest.mark.parametrize("dtype", ["binary", "ubinary"])
def test_voyageai_embed_bits(fake_server: LiveServer, dtype: str) -> None:
    """The client asks for base64 and decodes it as int8 (binary) or uint8 (ubinary)."""
    client = voyageai.Client(api_key="unused", base_url=f"{fake_server.base_url}/v1")
    reply = client.embed(TEXTS, model=EMBEDDINGS_MODEL, output_dtype=dtype)
    bits = np.packbits(np.float32([fake_text_vector(t) for t in TEXTS]) > 0, axis=1).astype(int)
    assert reply.embeddings == (bits if dtype == "ubinary" else bits - 128).tolist()


def test_voyageai_truncation_false_refuses(fake_server: LiveServer) -> None:
    client = voyageai.Client(api_key="unused", base_url=f"{fake_server.base_url}/v1")
    with pytest.raises(voyageai.error.InvalidRequestError) as refused:
        client.embed(["あ" * 100], model=EMBEDDINGS_MODEL, truncation=False)
    assert "not to truncate" in str(refused.value)


def test_voyageai_rerank(rerank_server: LiveServer) -> None:
    """The client sends top_k and truncation and reads data[*] and usage.total_tokens."""
    client = voyageai.Client(api_key="unused", base_url=f"{rerank_server.base_url}/v1")
    reply = client.rerank(QUERY, DOCS, model=RERANKER_MODEL, top_k=2)
    expected = scores_alone(rerank_server, QUERY, DOCS)
    best = sorted(range(len(DOCS)), key=lambda i: -expected[i])[:2]
    assert [r.index for r in reply.results] == best
    for result in reply.results:
        assert result.document == DOCS[result.index]
        assert result.relevance_score == pytest.approx(expected[result.index], abs=1e-5)
    assert reply.total_tokens > 0


def test_voyage_return_documents_gives_each_document_as_the_string_it_was(
    fake_server: LiveServer,
) -> None:
    """Voyage's ``data[*].document`` is the document string (its TypeScript client types it
    so; the Python client puts its own copy back, and does not show it)."""
    body = {"query": QUERY, "documents": DOCS, "top_k": 2, "return_documents": True}
    with fake_server.client() as client:
        reply = client.post("/v1/rerank", json=body)
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert len(data) == 2 and all(d["document"] == DOCS[d["index"]] for d in data), data
