"""Quantized embeddings over HTTP, on the stand-in ruri-large: the published scale is the
one the corpus gives, every route quantizes with it, and recall@10 of each form against
float stays where bench/quantization.py measured it."""

from __future__ import annotations

import base64
import time
from typing import Any

import cohere
import numpy as np
import pytest
import voyageai

from bench.quantization import measure
from fake_openai_server.service.calibration_corpus import CALIBRATION_CORPUS
from tests.e2e.test_clients import TEXTS
from tests.e2e.test_other_apis import typed_vectors
from tests.support.contract import EMBEDDINGS_MODEL, STANDIN_DIM
from tests.support.live import LiveServer


def published(server: LiveServer) -> dict[str, Any]:
    """The model's entry in /info/quantization, once calibrated: at start-up on a GPU, by
    the first int8/uint8 request on a CPU (as here)."""
    deadline = time.monotonic() + 60
    with server.client() as client:
        first = client.post("/v1/embeddings", json={"input": "較正", "output_dtype": "int8"})
        assert first.status_code == 200, first.text
        while True:
            entry: dict[str, Any] = client.get("/info/quantization").json()["models"][
                EMBEDDINGS_MODEL
            ]
            if entry["state"] == "ready" or time.monotonic() > deadline:
                return entry
            time.sleep(0.1)


def expected_int8(vectors: np.ndarray, step: float) -> np.ndarray:
    return np.clip(np.rint(vectors / np.float32(step)), -128, 127).astype(int)


def test_the_published_scale_is_the_corpus_largest_value(embeddings_server: LiveServer) -> None:
    entry = published(embeddings_server)
    assert entry["state"] == "ready"
    corpus = list(CALIBRATION_CORPUS)
    vectors = np.concatenate(
        [typed_vectors(embeddings_server, corpus, kind) for kind in ("query", "document")]
    )
    assert entry["texts"] == len(vectors) == 2 * len(corpus)
    assert entry["dimension"] == STANDIN_DIM
    assert entry["max_abs"] == pytest.approx(float(np.abs(vectors).max()), rel=1e-5)
    assert entry["step"] == pytest.approx(entry["max_abs"] / 127, rel=1e-6)
    with embeddings_server.client() as client:
        summary = client.get("/info").json()["quantization"]
    assert summary["models"] == {EMBEDDINGS_MODEL: "ready"}
    assert summary["scale_url"] == "/info/quantization"


def test_every_route_quantizes_with_the_published_scale(embeddings_server: LiveServer) -> None:
    step = published(embeddings_server)["step"]
    floats = typed_vectors(embeddings_server, TEXTS, "query")
    int8 = expected_int8(floats, step)
    with embeddings_server.client() as client:
        openai_route = client.post(
            "/v1/embeddings", json={"input": TEXTS, "input_type": "query", "output_dtype": "int8"}
        ).json()
        jina = client.post(
            "/v1/embeddings",
            json={"input": TEXTS, "input_type": "query", "embedding_type": "uint8"},
        ).json()
    assert [d["embedding"] for d in openai_route["data"]] == int8.tolist()
    assert [d["embedding"] for d in jina["data"]] == (int8 + 128).tolist()

    cohere_reply = cohere.ClientV2(base_url=embeddings_server.base_url, api_key="x").embed(
        texts=TEXTS,
        model=EMBEDDINGS_MODEL,
        input_type="search_query",
        embedding_types=["int8", "uint8", "float"],
    )
    assert cohere_reply.embeddings.int8 == int8.tolist()
    assert cohere_reply.embeddings.uint8 == (int8 + 128).tolist()

    voyage = voyageai.Client(api_key="x", base_url=f"{embeddings_server.base_url}/v1")
    for dtype, want in (("int8", int8), ("uint8", int8 + 128)):
        reply = voyage.embed(TEXTS, model=EMBEDDINGS_MODEL, input_type="query", output_dtype=dtype)
        assert reply.embeddings == want.tolist()  # decoded from base64 by the client


def test_cut_and_normalised_vectors_get_their_own_scale(embeddings_server: LiveServer) -> None:
    """A vector cut to d of D dimensions and normalised again has values about sqrt(D/d)
    times larger than the full-length ones the scale had been calibrated on: int8 clipped
    them (2% of the values, in nearly every vector, at 256 of 1,024 dimensions). Each cut
    and normalisation now has the corpus's own scale, published at
    /info/quantization?dimensions=&normalized=."""
    published(embeddings_server)  # calibrated
    cut = STANDIN_DIM // 4
    corpus = list(CALIBRATION_CORPUS)
    raw = {kind: typed_vectors(embeddings_server, corpus, kind) for kind in ("query", "document")}
    units = {
        kind: vectors[:, :cut] / np.linalg.norm(vectors[:, :cut], axis=1, keepdims=True)
        for kind, vectors in raw.items()
    }
    largest = max(float(np.abs(units[kind]).max()) for kind in units)
    with embeddings_server.client() as client:
        entry = client.get(
            "/info/quantization", params={"dimensions": cut, "normalized": "true"}
        ).json()["models"][EMBEDDINGS_MODEL]
        full = client.get("/info/quantization").json()["models"][EMBEDDINGS_MODEL]
        reply = client.post(
            "/v1/embeddings",
            json={
                "input": corpus,
                "input_type": "query",
                "dimensions": cut,
                "normalized": True,
                "output_dtype": "int8",
            },
        )
    assert (entry["dimension"], entry["normalized"]) == (cut, True)
    assert entry["max_abs"] == pytest.approx(largest, rel=1e-5)
    # The full-length scale (here of vectors not normalised, NORMALIZE=false) fits them
    # badly either way: it clips, or leaves most of the 256 levels unused.
    assert not 0.8 < entry["max_abs"] / full["max_abs"] < 1.25
    assert reply.status_code == 200, reply.text
    levels = np.asarray([d["embedding"] for d in reply.json()["data"]])
    want = np.rint(units["query"] / np.float32(entry["step"])).astype(int)
    assert 100 < np.abs(want).max() <= 127  # the corpus's own vectors: the whole range
    # Up to a level on a few values: the float vectors of one request and another differ
    # in their last bits as batching groups the texts, and a value at a rounding boundary
    # flips (the full-length step would be off by far more).
    off = np.abs(levels - want)
    assert off.max() <= 1 and (off > 0).mean() < 0.01, (off.max(), (off > 0).mean())


def test_base64_of_quantized_vectors_is_their_own_bytes(embeddings_server: LiveServer) -> None:
    step = published(embeddings_server)["step"]
    floats = typed_vectors(embeddings_server, TEXTS[:1], "document")
    with embeddings_server.client() as client:
        reply = client.post(
            "/v1/embeddings",
            json={
                "input": TEXTS[:1],
                "input_type": "document",
                "output_dtype": "int8",
                "encoding_format": "base64",
            },
        ).json()
    raw = base64.b64decode(reply["data"][0]["embedding"])
    assert len(raw) == STANDIN_DIM
    assert np.frombuffer(raw, dtype=np.int8).tolist() == expected_int8(floats, step)[0].tolist()


def test_recall_at_10_of_each_form_against_float(embeddings_server: LiveServer) -> None:
    """The tiny stand-in's numbers (bench/quantization.py, 1000 documents): int8 0.97,
    uint8 0.90, binary 0.14 (64 bits; chance is 0.01 here). A smaller set here."""
    recalls = measure(embeddings_server.base_url, documents=300, queries=30)
    assert recalls["int8"] >= 0.9, recalls
    assert recalls["uint8"] >= 0.8, recalls
    assert recalls["binary"] == recalls["ubinary"] >= 0.08, recalls
