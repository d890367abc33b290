"""First end-to-end checks over the fake and the real stand-in models."""

from __future__ import annotations

import numpy as np

from tests.support.fakes import fake_text_vector
from tests.support.live import LiveServer


def test_fake_embeddings_in_order(fake_server: LiveServer) -> None:
    texts = ["東京", "大阪の街", "a"]
    with fake_server.client() as client:
        reply = client.post(
            "/v1/embeddings", json={"input": texts, "model": "cl-nagoya/ruri-large"}
        )
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    for text, item in zip(texts, data, strict=True):
        np.testing.assert_allclose(item["embedding"], fake_text_vector(text), rtol=1e-6)


def test_real_embeddings_server_ready(embeddings_server: LiveServer) -> None:
    with embeddings_server.client() as client:
        reply = client.post("/v1/embeddings", json={"input": "東京は日本の首都です"})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["data"][0]["embedding"]) == 64
