"""Real clients over a real socket: the openai and cohere SDKs, and plain JSON in the
exact shapes Dify, Open WebUI, RAGFlow, FastGPT and n8n send, asserting on what each
of them reads (see client-contract.md).

Base URLs: the openai SDK appends ``/embeddings`` to its base URL, so it needs
``http://host:port/v1``; the cohere SDK appends ``v1/rerank`` (``Client``) or
``v2/rerank`` (``ClientV2``), so it needs the bare ``http://host:port``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import subprocess
import time
from collections.abc import Callable
from typing import Any

import cohere
import httpx
import numpy as np
import openai
import pytest

from tests.support.contract import EMBEDDINGS_MODEL, RERANKER_MODEL, STANDIN_DIM
from tests.support.fakes import fake_logit, fake_text_vector
from tests.support.live import LiveServer
from tests.support.standins import japanese_text

TEXTS = ["東京は日本の首都です。", "瑠璃色は深い青色のことです。", "Dify", "富士山"]
QUERY = "日本の首都はどこですか"
DOCS = [
    "東京は日本の首都です。",
    "ラーメンは醤油、味噌、塩など多様なスープがあります。",
    "富士山は日本で最も高い山です。",
    "首都東京の人口は多いです。",
]


class Recorder:
    """Keeps the JSON bodies a client sends, to assert on the request shape."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []

    def __call__(self, request: httpx.Request) -> None:
        self.paths.append(request.url.path)
        self.bodies.append(json.loads(request.content) if request.content else {})


def float_vectors(server: LiveServer, texts: list[str]) -> np.ndarray:
    with server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": texts, "encoding_format": "float"})
    assert reply.status_code == 200, reply.text
    return np.asarray([d["embedding"] for d in reply.json()["data"]], dtype=np.float32)


def scores_alone(server: LiveServer, query: str, docs: list[str]) -> list[float]:
    """Each document's score when it is ranked on its own (pair scores are independent)."""
    out = []
    with server.client() as client:
        for doc in docs:
            reply = client.post("/v1/rerank", json={"query": query, "documents": [doc]})
            assert reply.status_code == 200, reply.text
            out.append(reply.json()["results"][0]["relevance_score"])
    return out


# --- openai SDK ---------------------------------------------------------------------------


def openai_client(server: LiveServer, recorder: Recorder | None = None) -> openai.OpenAI:
    hooks: dict[str, list[Callable[..., Any]]] = {"request": [recorder]} if recorder else {}
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(event_hooks=hooks),  # type: ignore[arg-type]  # openai types httpx2
    )


def test_openai_sdk_default_base64_path(embeddings_server: LiveServer) -> None:
    recorder = Recorder()
    client = openai_client(embeddings_server, recorder)
    reply = client.embeddings.create(model=EMBEDDINGS_MODEL, input=TEXTS)
    assert recorder.bodies[0]["encoding_format"] == "base64"  # the SDK's own default
    assert recorder.paths == ["/v1/embeddings"]
    assert [d.index for d in reply.data] == list(range(len(TEXTS)))
    got = np.asarray([d.embedding for d in reply.data], dtype=np.float32)
    assert got.shape == (len(TEXTS), STANDIN_DIM)
    np.testing.assert_allclose(got, float_vectors(embeddings_server, TEXTS), atol=1e-5)
    assert reply.model == EMBEDDINGS_MODEL
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > len(TEXTS)


def test_openai_sdk_explicit_float_and_string_input(fake_server: LiveServer) -> None:
    recorder = Recorder()
    client = openai_client(fake_server, recorder)
    reply = client.embeddings.create(
        model="ruri-large", input="東京", encoding_format="float", dimensions=4
    )
    assert recorder.bodies[0]["encoding_format"] == "float"
    assert len(reply.data) == 1
    np.testing.assert_allclose(reply.data[0].embedding, fake_text_vector("東京")[:4], rtol=1e-6)


def test_openai_sdk_base64_exact(fake_server: LiveServer) -> None:
    reply = openai_client(fake_server).embeddings.create(model=EMBEDDINGS_MODEL, input=TEXTS)
    for text, item in zip(TEXTS, reply.data, strict=True):
        np.testing.assert_array_equal(np.float32(item.embedding), fake_text_vector(text))


def test_openai_sdk_sees_errors_as_its_own_exceptions(fake_server: LiveServer) -> None:
    client = openai_client(fake_server)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.embeddings.create(model="text-embedding-3-small", input="a")
    assert not_found.value.code == "model_not_found"
    assert EMBEDDINGS_MODEL in not_found.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model=EMBEDDINGS_MODEL, input="")
    assert bad.value.param == "input"


def test_openai_sdk_lists_and_retrieves_models(fake_server: LiveServer) -> None:
    """``models.retrieve`` (tools check that a configured model exists with it): the id
    holds a slash, and a short name a request may give is found too."""
    client = openai_client(fake_server)
    assert [m.id for m in client.models.list()] == [EMBEDDINGS_MODEL, RERANKER_MODEL]
    for name in (EMBEDDINGS_MODEL, RERANKER_MODEL, "ruri-large"):
        model = client.models.retrieve(name)
        assert (model.id, model.object) == (name, "model")
    with pytest.raises(openai.NotFoundError) as not_found:
        client.models.retrieve("text-embedding-3-small")
    assert not_found.value.code == "model_not_found"
    assert EMBEDDINGS_MODEL in not_found.value.message


def test_openai_sdk_token_ids_get_the_langchain_hint(fake_server: LiveServer) -> None:
    """What LangChain's OpenAIEmbeddings users see by default (tiktoken ids, base64)."""
    client = openai_client(fake_server)
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model=EMBEDDINGS_MODEL, input=[[9906, 1917], [35287]])
    assert "check_embedding_ctx_length=False" in bad.value.message
    assert bad.value.param == "input"


def test_async_openai_concurrent_calls(embeddings_server: LiveServer) -> None:
    texts = [japanese_text(10 + 7 * i, seed=i) for i in range(16)]
    expected = float_vectors(embeddings_server, texts)

    async def main() -> list[list[float]]:
        async with openai.AsyncOpenAI(
            base_url=f"{embeddings_server.base_url}/v1", api_key="unused", max_retries=0
        ) as client:
            replies = await asyncio.gather(
                *(client.embeddings.create(model=EMBEDDINGS_MODEL, input=t) for t in texts)
            )
        return [r.data[0].embedding for r in replies]

    got = np.asarray(asyncio.run(main()), dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_anythingllm_concurrent_requests_of_500_texts(fake_server: LiveServer) -> None:
    """AnythingLLM (the openai Node SDK, base64 by its default) sends up to 500 texts a
    request and fires its requests at once: every vector comes back exact, in order."""
    batches = [[f"文書{r}-{i}" for i in range(500)] for r in range(4)]

    async def main() -> list[Any]:
        async with openai.AsyncOpenAI(
            base_url=f"{fake_server.base_url}/v1", api_key="unused", max_retries=0
        ) as client:
            calls = (client.embeddings.create(model=EMBEDDINGS_MODEL, input=b) for b in batches)
            return list(await asyncio.gather(*calls))

    for texts, reply in zip(batches, asyncio.run(main()), strict=True):
        assert [d.index for d in reply.data] == list(range(500))
        got = np.asarray([d.embedding for d in reply.data], dtype=np.float32)
        np.testing.assert_array_equal(got, [fake_text_vector(t) for t in texts])


def test_langchain_openai_embeddings(embeddings_server: LiveServer) -> None:
    """Only where langchain-openai is installed (``uv run --with langchain-openai pytest``)."""
    langchain_openai = pytest.importorskip("langchain_openai")
    embeddings = langchain_openai.OpenAIEmbeddings(
        model=EMBEDDINGS_MODEL,
        base_url=f"{embeddings_server.base_url}/v1",
        api_key="unused",
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    docs = embeddings.embed_documents(TEXTS)
    query = embeddings.embed_query(TEXTS[0])
    expected = float_vectors(embeddings_server, TEXTS)
    np.testing.assert_allclose(np.float32(docs), expected, atol=1e-5)
    np.testing.assert_allclose(np.float32(query), expected[0], atol=1e-5)


# --- Azure OpenAI: the openai SDK's AzureOpenAI, LangChain's AzureOpenAIEmbeddings ---------


def test_azure_openai_sdk(embeddings_server: LiveServer) -> None:
    """Code written for Azure OpenAI, pointed here: the deployment in the path is the
    model (the body's ``model`` is the SDK caller's, e.g. an OpenAI model's name)."""
    recorder = Recorder()
    client = openai.AzureOpenAI(
        azure_endpoint=embeddings_server.base_url,
        api_key="unused",
        api_version="2024-10-21",
        max_retries=0,
        http_client=httpx.Client(event_hooks={"request": [recorder]}),  # type: ignore[arg-type]
    )
    expected = float_vectors(embeddings_server, TEXTS)
    reply = client.embeddings.create(model="ruri-large", input=TEXTS)  # base64, its default
    assert recorder.paths == ["/openai/deployments/ruri-large/embeddings"]
    got = np.asarray([d.embedding for d in reply.data], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > len(TEXTS)
    deployed = openai.AzureOpenAI(
        azure_endpoint=embeddings_server.base_url,
        azure_deployment=EMBEDDINGS_MODEL,
        api_key="unused",
        api_version="2024-10-21",
        max_retries=0,
    )
    one = deployed.embeddings.create(
        model="text-embedding-3-small", input=TEXTS[1], encoding_format="float"
    )
    np.testing.assert_allclose(np.float32(one.data[0].embedding), expected[1], atol=1e-5)
    with pytest.raises(openai.NotFoundError, match="'no-such-deployment' does not exist"):
        client.embeddings.create(model="no-such-deployment", input=TEXTS[0])


def test_langchain_azure_openai_embeddings(embeddings_server: LiveServer) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    embeddings = langchain_openai.AzureOpenAIEmbeddings(
        azure_endpoint=embeddings_server.base_url,
        azure_deployment="ruri-large",
        api_key="unused",
        api_version="2024-10-21",
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    expected = float_vectors(embeddings_server, TEXTS)
    np.testing.assert_allclose(np.float32(embeddings.embed_documents(TEXTS)), expected, atol=1e-5)
    np.testing.assert_allclose(np.float32(embeddings.embed_query(TEXTS[0])), expected[0], atol=1e-5)


# --- cohere SDK ----------------------------------------------------------------------------


def test_cohere_v1_rerank(rerank_server: LiveServer) -> None:
    recorder = Recorder()
    client = cohere.Client(
        base_url=rerank_server.base_url,
        api_key="unused",
        httpx_client=httpx.Client(event_hooks={"request": [recorder]}),
    )
    reply = client.rerank(
        model=RERANKER_MODEL,
        query=QUERY,
        documents=DOCS,
        top_n=3,
        return_documents=True,
        max_chunks_per_doc=10,
    )
    assert recorder.paths == ["/v1/rerank"]
    expected = scores_alone(rerank_server, QUERY, DOCS)
    best = sorted(range(len(DOCS)), key=lambda i: -expected[i])[:3]
    assert [r.index for r in reply.results] == best
    for r in reply.results:
        assert r.relevance_score == pytest.approx(expected[r.index], abs=1e-5)
        assert r.document is not None and r.document.text == DOCS[r.index]
    assert reply.id
    assert reply.meta is not None and reply.meta.billed_units is not None
    assert reply.meta.billed_units.search_units == 1


def test_cohere_v1_rerank_object_documents(fake_server: LiveServer) -> None:
    client = cohere.Client(base_url=fake_server.base_url, api_key="unused")
    docs = [{"text": d, "title": f"doc {i}"} for i, d in enumerate(DOCS)]
    reply = client.rerank(query=QUERY, documents=docs, rank_fields=["text"])
    order = sorted(range(len(DOCS)), key=lambda i: -fake_logit(QUERY, DOCS[i]))
    assert [r.index for r in reply.results] == order


def test_cohere_v1_with_a_base_url_ending_in_v1(fake_server: LiveServer) -> None:
    """A common mistake (base URL ".../v1") still works: the SDK hits /v1/v1/rerank."""
    recorder = Recorder()
    client = cohere.Client(
        base_url=f"{fake_server.base_url}/v1",
        api_key="unused",
        httpx_client=httpx.Client(event_hooks={"request": [recorder]}),
    )
    reply = client.rerank(query=QUERY, documents=DOCS)
    assert recorder.paths == ["/v1/v1/rerank"]
    assert len(reply.results) == len(DOCS)


def test_cohere_v2_rerank(rerank_server: LiveServer) -> None:
    recorder = Recorder()
    client = cohere.ClientV2(
        base_url=rerank_server.base_url,
        api_key="unused",
        httpx_client=httpx.Client(event_hooks={"request": [recorder]}),
    )
    reply = client.rerank(
        model=RERANKER_MODEL, query=QUERY, documents=DOCS, top_n=2, max_tokens_per_doc=4096
    )
    assert recorder.paths == ["/v2/rerank"]
    expected = scores_alone(rerank_server, QUERY, DOCS)
    best = sorted(range(len(DOCS)), key=lambda i: -expected[i])[:2]
    assert [r.index for r in reply.results] == best
    for r in reply.results:
        assert r.relevance_score == pytest.approx(expected[r.index], abs=1e-5)
    assert "document" not in reply.model_dump(exclude_none=True)["results"][0]


def test_cohere_sdk_sees_unknown_model_as_404(rerank_server: LiveServer) -> None:
    client = cohere.ClientV2(base_url=rerank_server.base_url, api_key="unused")
    with pytest.raises(cohere.NotFoundError):
        client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS)


# --- Dify ------------------------------------------------------------------------------------


def test_dify_embeddings_one_text_per_request(embeddings_server: LiveServer) -> None:
    headers = {"Content-Type": "application/json", "Authorization": ""}
    expected = float_vectors(embeddings_server, TEXTS)
    with httpx.Client(base_url=embeddings_server.base_url, timeout=60, headers=headers) as session:
        # The credential check: an ordinary call with "ping".
        check = session.post("/v1/embeddings", json={"model": EMBEDDINGS_MODEL, "input": ["ping"]})
        assert check.status_code == 200, check.text
        assert check.json()["usage"]["total_tokens"] > 0
        for text, want in zip(TEXTS, expected, strict=True):
            for extra in ({}, {"encoding_format": "float"}):
                reply = session.post(
                    "/v1/embeddings", json={"model": EMBEDDINGS_MODEL, "input": [text], **extra}
                )
                assert reply.status_code == 200, reply.text
                body = reply.json()
                vector = np.asarray(body["data"][0]["embedding"], dtype=np.float64)
                normed = vector / np.linalg.norm(vector)  # what Dify does with it
                assert np.isfinite(normed).all()
                np.testing.assert_allclose(vector, want, atol=1e-5)
                assert body["usage"]["prompt_tokens"] > 0
                assert body["usage"]["total_tokens"] > 0


def test_dify_embeddings_with_its_document_prefix(embeddings_server: LiveServer) -> None:
    """Dify joins a user-set prefix as f"{prefix} {text}"."""
    with embeddings_server.client(headers={"Authorization": ""}) as session:
        reply = session.post(
            "/v1/embeddings", json={"model": EMBEDDINGS_MODEL, "input": ["文章: 東京は首都です"]}
        )
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["data"][0]["embedding"]) == STANDIN_DIM


def dify_rerank(server: LiveServer, docs: list[str], top_n: int, threshold: float) -> list[Any]:
    """Dify's OpenAI-API-compatible rerank: reads index and relevance_score only."""
    with server.client(headers={"Authorization": ""}) as session:
        reply = session.post(
            "/v1/rerank",
            json={"model": RERANKER_MODEL, "query": QUERY, "documents": docs, "top_n": top_n},
        )
    assert reply.status_code == 200, reply.text
    kept = []
    for result in reply.json()["results"]:
        index = result["index"]
        assert 0 <= index < len(docs)
        if result["relevance_score"] >= threshold:
            kept.append((docs[index], result["relevance_score"]))
    return kept


def test_dify_rerank_credential_check(rerank_server: LiveServer) -> None:
    docs = [
        "Carson City is the capital city of the American state of Nevada.",
        "The Commonwealth of the Northern Mariana Islands is a group of islands in the Pacific "
        "Ocean. Its capital is Saipan.",
        "Washington, D.C. is the capital of the United States.",
    ]
    kept = dify_rerank(rerank_server, docs, top_n=3, threshold=0.0)
    assert sorted(doc for doc, _ in kept) == sorted(docs)


@pytest.mark.parametrize("top_n", [0, len(DOCS)])
def test_dify_rerank_top_n_zero_or_count_returns_everything(
    rerank_server: LiveServer, top_n: int
) -> None:
    kept = dify_rerank(rerank_server, DOCS, top_n=top_n, threshold=0.0)
    assert sorted(doc for doc, _ in kept) == sorted(DOCS)
    expected = dict(zip(DOCS, scores_alone(rerank_server, QUERY, DOCS), strict=True))
    for doc, score in kept:
        assert score == pytest.approx(expected[doc], abs=1e-5)


# --- Open WebUI -------------------------------------------------------------------------------


def raw_post(server: LiveServer, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
    """POST with http.client: httpx refuses header values with trailing spaces ("Bearer "),
    which Open WebUI's aiohttp/requests send as they are."""
    connection = http.client.HTTPConnection(*server.address, timeout=60)
    try:
        connection.request("POST", path, json.dumps(body), headers)
        reply = connection.getresponse()
        data = reply.read()
    finally:
        connection.close()
    assert reply.status == 200, data[:500]
    return json.loads(data)


OPEN_WEBUI_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer "}


def test_open_webui_embeddings(embeddings_server: LiveServer) -> None:
    body = {"input": TEXTS, "model": EMBEDDINGS_MODEL}
    data = raw_post(embeddings_server, "/v1/embeddings", body, OPEN_WEBUI_HEADERS)
    got = np.asarray([elem["embedding"] for elem in data["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, float_vectors(embeddings_server, TEXTS), atol=1e-5)


def test_open_webui_rerank_every_document_comes_back(rerank_server: LiveServer) -> None:
    docs = [*DOCS, *(japanese_text(30, seed=s) for s in range(6))]
    body = {"model": RERANKER_MODEL, "query": QUERY, "documents": docs, "top_n": len(docs)}
    data = raw_post(rerank_server, "/v1/rerank", body, OPEN_WEBUI_HEADERS)
    results = sorted(data["results"], key=lambda x: x.get("index", 0))
    scores = [r["relevance_score"] for r in results]
    assert len(scores) == len(docs)  # else the zip below shifts scores onto other documents
    expected = scores_alone(rerank_server, QUERY, docs)
    for (doc, score), want in zip(zip(docs, scores, strict=True), expected, strict=True):
        assert score == pytest.approx(want, abs=1e-5), doc


# --- RAGFlow ------------------------------------------------------------------------------------


def test_ragflow_embeddings_batches_of_16(embeddings_server: LiveServer) -> None:
    texts = [japanese_text(20 + i, seed=100 + i) for i in range(40)]
    client = openai_client(embeddings_server)
    vectors: list[list[float]] = []
    total = 0
    for start in range(0, len(texts), 16):
        reply = client.embeddings.create(
            input=texts[start : start + 16],
            model=EMBEDDINGS_MODEL,
            encoding_format="float",
            extra_body={"drop_params": True},
        )
        vectors += [d.embedding for d in sorted(reply.data, key=lambda d: d.index)]
        total += reply.usage.total_tokens
    np.testing.assert_allclose(
        np.float32(vectors), float_vectors(embeddings_server, texts), atol=1e-5
    )
    assert total > len(texts)


def test_ragflow_rerank(fake_server: LiveServer) -> None:
    with fake_server.client() as session:
        reply = session.post(
            "/v1/rerank",
            json={"model": RERANKER_MODEL, "query": QUERY, "documents": DOCS, "top_n": len(DOCS)},
        )
    assert reply.status_code == 200, reply.text
    rank = np.zeros(len(DOCS), dtype=float)
    for d in reply.json()["results"]:
        rank[d["index"]] = d["relevance_score"]
    assert ((rank > 0) & (rank < 1)).all()  # kept as is, not min-max normalised
    for i, doc in enumerate(DOCS):
        assert rank[i] == pytest.approx(1 / (1 + math.exp(-fake_logit(QUERY, doc))), rel=1e-6)


# --- FastGPT, n8n, Jina-style -------------------------------------------------------------------


def test_fastgpt_rerank_without_top_n(rerank_server: LiveServer) -> None:
    with rerank_server.client() as session:
        reply = session.post(
            "/v1/rerank", json={"model": RERANKER_MODEL, "query": QUERY, "documents": DOCS}
        )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert sorted(r["index"] for r in body["results"]) == list(range(len(DOCS)))
    assert body["meta"]["tokens"]["input_tokens"] == body["usage"]["total_tokens"] > 0


def test_n8n_rerank_at_v1_v1(rerank_server: LiveServer) -> None:
    with rerank_server.client() as session:
        reply = session.post(
            "/v1/v1/rerank",
            json={"model": RERANKER_MODEL, "query": QUERY, "documents": DOCS, "top_n": 2},
        )
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert len(results) == 2
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]
    assert results[0]["document"]["text"] == DOCS[results[0]["index"]]


def test_jina_style_client(fake_server: LiveServer) -> None:
    with fake_server.client() as session:
        reply = session.post(
            "/v1/rerank",
            json={
                "model": RERANKER_MODEL,
                "query": QUERY,
                "documents": DOCS,
                "top_n": 2,
                "return_documents": True,
            },
        )
        body = reply.json()
        assert body["usage"]["total_tokens"] > 0
        assert [r["document"]["text"] for r in body["results"]] == [
            DOCS[r["index"]] for r in body["results"]
        ]
        failed = session.post("/v1/rerank", json={"query": "", "documents": DOCS})
    assert failed.status_code == 400
    assert "query" in failed.json()["detail"]


# --- clients that offer HTTP/2 on plain http (Upgrade: h2c) ------------------------------

# What Java's HttpClient (and Spring's RestClient over it) sends on plain http, and Ktor.
H2C_OFFER = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAEAAEAAAAIAAAABAAMAAABkAAQBAAAAAAUAAEAA\r\n"
)


def _h2c_request(body: bytes, chunked: bool) -> tuple[bytes, bytes]:
    """The head and body of a POST /v1/embeddings that offers h2c."""
    length = b"Content-Length: %d\r\n" % len(body)
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else length
    head = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        + H2C_OFFER
        + framing
        + b"\r\n"
    )
    return head, (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "head-then-body"])
def test_a_request_offering_h2c_is_served_as_http_1_1(
    fake_server: LiveServer, chunked: bool, split: bool
) -> None:
    """HTTP lets a server decline an upgrade offer and answer in HTTP/1.1. httptools had
    dropped the body of such a request (a 400 "must be a JSON object"), or, sent after
    the head as Java's and Ktor's clients do, read it as a request of its own (uvicorn's
    issue #2722). The connection then serves a plain request as usual."""
    texts = ["東京", "京都"]
    head, body = _h2c_request(json.dumps({"input": texts}).encode(), chunked)
    with fake_server.connect() as sock:
        if split:
            sock.sendall(head)
            time.sleep(0.2)
            sock.sendall(body)
        else:
            sock.sendall(head + body)
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        data = json.loads(reply.read())
        assert reply.status == 200, data
        for item, text in zip(data["data"], texts, strict=True):
            np.testing.assert_allclose(item["embedding"], fake_text_vector(text), rtol=1e-6)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: test\r\n\r\n")  # keep-alive, plain
        again = http.client.HTTPResponse(sock)
        again.begin()
        assert again.status == 200 and json.loads(again.read())["data"]


def test_curl_http2_on_plain_http_gets_its_reply(fake_server: LiveServer) -> None:
    """``curl --http2`` offers h2c on plain http, as Java clients do."""
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps({"input": "大阪"}),
            f"{fake_server.base_url}/v1/embeddings",
        ],
        capture_output=True,
        timeout=30,
        check=True,
    )
    reply = json.loads(done.stdout)
    np.testing.assert_allclose(reply["data"][0]["embedding"], fake_text_vector("大阪"), rtol=1e-6)
