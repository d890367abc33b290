"""The server's numbers equal sentence-transformers' own, in the same process.

Stand-in models with random weights, loaded under the real names from the
temporary cache; the reference is ``SentenceTransformer.encode`` /
``CrossEncoder.predict`` on the same texts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.live import LiveServer, serve_app
from tests.support.standins import RERANKER, RURI_LARGE, japanese_text

# float32 on both sides; differences come only from batch composition and padding.
ATOL = 2e-5

TEXTS = [
    "東京は日本の首都です。",
    "瑠璃色はサファイアのような深い青色のことを指します。",
    "ok",
    japanese_text(300, seed=1),
    japanese_text(900, seed=2),  # over 512 tokens: truncated the way sentence-transformers does
    "Dify uses an OpenAI-compatible API.",
]
QUERY = "日本の首都はどこですか"
DOCUMENTS = ["東京は日本の首都です。", "大阪は食の都です。", japanese_text(700, seed=3), "ok"]


@pytest.fixture(scope="session")
def st_model(hf_home: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(RURI_LARGE, device="cpu")


@pytest.fixture(scope="session")
def cross_encoder(hf_home: Path) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(RERANKER, device="cpu")


def embed(server: LiveServer, texts: list[str], **extra: Any) -> tuple[np.ndarray, int]:
    with server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": texts, **extra})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    vectors = np.array([item["embedding"] for item in body["data"]], dtype=np.float32)
    return vectors, body["usage"]["prompt_tokens"]


def rerank(server: LiveServer, query: str, documents: list[str], **extra: Any) -> dict[int, float]:
    with server.client() as client:
        reply = client.post("/v1/rerank", json={"query": query, "documents": documents, **extra})
    assert reply.status_code == 200, reply.text
    return {r["index"]: r["relevance_score"] for r in reply.json()["results"]}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_embeddings_equal_sentence_transformers(
    embeddings_server: LiveServer, st_model: Any
) -> None:
    vectors, _ = embed(embeddings_server, TEXTS)
    expected = st_model.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(vectors, expected, atol=ATOL, rtol=1e-4)


def test_embeddings_one_at_a_time_equal_batched(embeddings_server: LiveServer) -> None:
    """Batch composition (padding) does not change a vector."""
    batched, _ = embed(embeddings_server, TEXTS)
    single = np.concatenate([embed(embeddings_server, [text])[0] for text in TEXTS])
    np.testing.assert_allclose(single, batched, atol=ATOL, rtol=1e-4)


def test_token_counts_are_the_tokenizers(embeddings_server: LiveServer, st_model: Any) -> None:
    tokenizer = st_model.tokenizer
    expected = sum(
        len(tokenizer(text, truncation=True, max_length=512)["input_ids"]) for text in TEXTS
    )
    _, tokens = embed(embeddings_server, TEXTS)
    assert tokens == expected
    # The 900-character text was cut to exactly the model's maximum.
    _, long_tokens = embed(embeddings_server, [TEXTS[4]])
    assert long_tokens == 512


def test_dimensions_and_normalisation_match(embeddings_server: LiveServer, st_model: Any) -> None:
    vectors, _ = embed(embeddings_server, TEXTS[:3], dimensions=16)
    expected = st_model.encode(TEXTS[:3], truncate_dim=16)
    np.testing.assert_allclose(vectors, expected, atol=ATOL, rtol=1e-4)
    # ruri has no Normalize module: vectors are not unit length unless NORMALIZE is set.
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)


def test_rerank_scores_equal_cross_encoder(rerank_server: LiveServer, cross_encoder: Any) -> None:
    scores = rerank(rerank_server, QUERY, DOCUMENTS)
    expected = cross_encoder.predict([(QUERY, doc) for doc in DOCUMENTS])
    got = np.array([scores[i] for i in range(len(DOCUMENTS))])
    np.testing.assert_allclose(got, expected, atol=ATOL)
    assert ((got > 0) & (got < 1)).all()


def test_rerank_raw_scores_are_logits(rerank_server: LiveServer, cross_encoder: Any) -> None:
    raw = rerank(rerank_server, QUERY, DOCUMENTS, raw_scores=True)
    import torch

    expected = cross_encoder.predict(
        [(QUERY, doc) for doc in DOCUMENTS], activation_fn=torch.nn.Identity()
    )
    np.testing.assert_allclose([raw[i] for i in range(len(DOCUMENTS))], expected, atol=ATOL)


def cut_document_scores(cross_encoder: Any, query: str, documents: list[str], tokens: int) -> Any:
    """The model's scores of pairs whose documents keep their first ``tokens`` tokens:
    the pairs built by the tokenizer's Rust library from the cut encodings, run through
    the CrossEncoder's own model one by one (no padding)."""
    import copy

    import torch

    backend = copy.deepcopy(cross_encoder.tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.enable_truncation(cross_encoder.max_seq_length, strategy="longest_first")
    first = backend.encode(query, add_special_tokens=False)
    scores = []
    for doc in documents:
        second = backend.encode(doc, add_special_tokens=False)
        second.truncate(tokens)
        ids = torch.tensor([backend.post_process(first, second).ids])
        with torch.inference_mode():
            logit = cross_encoder.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        scores.append(torch.sigmoid(logit[0, 0]).item())
    return np.array(scores)


@pytest.mark.parametrize("tokens", [3, 40])
def test_rerank_max_tokens_per_doc_scores_the_first_tokens(
    rerank_server: LiveServer, cross_encoder: Any, tokens: int
) -> None:
    """Cohere v2's max_tokens_per_doc: each document as if it had been sent that short."""
    with rerank_server.client() as client:
        reply = client.post(
            "/v2/rerank",
            json={"query": QUERY, "documents": DOCUMENTS, "max_tokens_per_doc": tokens},
        )
    assert reply.status_code == 200, reply.text
    scores = {r["index"]: r["relevance_score"] for r in reply.json()["results"]}
    got = np.array([scores[i] for i in range(len(DOCUMENTS))])
    expected = cut_document_scores(cross_encoder, QUERY, DOCUMENTS, tokens)
    np.testing.assert_allclose(got, expected, atol=ATOL)
    # The long document's score moved; a short one's did not.
    whole = rerank(rerank_server, QUERY, DOCUMENTS)
    assert abs(got[2] - whole[2]) > 10 * ATOL
    assert got[3] == pytest.approx(whole[3], abs=ATOL) or tokens < 4


# --- tokenizer processes -----------------------------------------------------


@pytest.fixture(scope="module")
def processes_server(hf_home: Path) -> Iterator[LiveServer]:
    """Both models, tokenizing in a tokenizer process (a GPU host's default) rather than
    in the server's threads (a CPU host's, which every other test here uses)."""
    from fake_openai_server.api.app import create_all_in_one_app
    from fake_openai_server.settings import Settings

    app = create_all_in_one_app(Settings(dtype="float32", tokenizer_workers=1))
    with serve_app(app) as server:
        assert app.state.runtime.tokenizers.workers, "no tokenizer process started"
        yield server


def test_tokenizer_processes_give_the_same_numbers(
    processes_server: LiveServer, st_model: Any, cross_encoder: Any
) -> None:
    texts = [*TEXTS, "\u3000全角\tと\u00a0空白\n", "🙂 e\u0301 ｶﾀｶﾅ", "x" * 3000]
    vectors, tokens = embed(processes_server, texts)
    np.testing.assert_allclose(
        vectors, st_model.encode(texts, convert_to_numpy=True), atol=ATOL, rtol=1e-4
    )
    tokenizer = st_model.tokenizer
    assert tokens == sum(
        len(tokenizer(text, truncation=True, max_length=512)["input_ids"]) for text in texts
    )
    # One text per request, as Dify sends them.
    single = np.concatenate([embed(processes_server, [text])[0] for text in texts])
    np.testing.assert_allclose(single, vectors, atol=ATOL, rtol=1e-4)
    scores = rerank(processes_server, QUERY, DOCUMENTS)
    expected = cross_encoder.predict([(QUERY, doc) for doc in DOCUMENTS])
    np.testing.assert_allclose([scores[i] for i in range(len(DOCUMENTS))], expected, atol=ATOL)
    # Cohere v2's max_tokens_per_doc travels to the tokenizer process.
    scores = rerank(processes_server, QUERY, DOCUMENTS, max_tokens_per_doc=40)
    expected = cut_document_scores(cross_encoder, QUERY, DOCUMENTS, 40)
    np.testing.assert_allclose([scores[i] for i in range(len(DOCUMENTS))], expected, atol=ATOL)


# --- reduced precision --------------------------------------------------------


@pytest.fixture(scope="module", params=["bfloat16", "int8"])
def reduced_servers(request: pytest.FixtureRequest, hf_home: Path) -> Iterator[LiveServer]:
    from fake_openai_server.api.app import build_app
    from fake_openai_server.settings import Settings

    settings = Settings(service_type="all", dtype=request.param, device="cpu")
    with serve_app(build_app(settings)) as server:
        yield server


def test_reduced_precision_parity(
    reduced_servers: LiveServer, st_model: Any, cross_encoder: Any
) -> None:
    """Every reduced precision: cosine >= 0.999 to float32; same rerank order, scores ±0.01."""
    vectors, _ = embed(reduced_servers, TEXTS)
    reference = st_model.encode(TEXTS)
    assert cosine(vectors, reference).min() >= 0.999

    scores = rerank(reduced_servers, QUERY, DOCUMENTS)
    expected = cross_encoder.predict([(QUERY, doc) for doc in DOCUMENTS])
    got = np.array([scores[i] for i in range(len(DOCUMENTS))])
    np.testing.assert_allclose(got, expected, atol=0.01)
    # Same order for every pair of documents that float32 tells apart by more than the
    # tolerance (random stand-in weights give near-ties that no precision can order).
    for a in range(len(DOCUMENTS)):
        for b in range(len(DOCUMENTS)):
            if expected[a] - expected[b] > 0.01:
                assert got[a] > got[b], (a, b, got, expected)
