"""First end-to-end checks over the fake and the real stand-in models."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_the_app_factories_are_the_package_front_door() -> None:
    """Exported from the package root, loaded on first use: the engine and tokenizer
    processes import the package without the HTTP stack."""
    import subprocess
    import sys

    probe = (
        "import sys, fake_openai_server as p; "
        "assert 'fastapi' not in sys.modules; "
        "import fake_openai_server.engine.worker, fake_openai_server.service.tokenize_worker; "
        "assert 'fastapi' not in sys.modules, 'a worker process imports FastAPI'; "
        "names = [p.create_embeddings_app, p.create_rerank_app, p.create_all_in_one_app, "
        "p.create_app]; assert all(callable(f) for f in names)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_routers_never_share_a_route_and_the_busiest_come_first() -> None:
    """FastAPI tries the routers in order on every request, so ``routers_for`` puts the
    OpenAI and rerank routes first; that order is free only because no method and path
    is answered by two routers (which one would win would depend on it)."""
    from fake_openai_server.api.app import routers_for
    from fake_openai_server.settings import Settings

    for service_type, first in [
        ("embeddings", "/v1/embeddings"),
        ("reranker", "/v1/rerank"),
        ("all", "/v1/embeddings"),
    ]:
        routers = routers_for(Settings(service_type=service_type))
        answered = [
            (method, route.path)
            for router in routers
            for route in router.routes
            for method in getattr(route, "methods", None) or ()
        ]
        assert len(answered) == len(set(answered)), sorted(
            key for key in set(answered) if answered.count(key) > 1
        )
        assert first in {getattr(route, "path", "") for route in routers[0].routes}


def test_a_factory_checks_the_settings_for_the_service_it_makes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``uvicorn --factory fake_openai_server:create_rerank_app`` with SERVICE_TYPE left
    at embeddings: an empty RERANKER_MODEL is refused as it is for SERVICE_TYPE=reranker.
    It had been let through, and the server had waited forever on a failed engine."""
    from pydantic import ValidationError

    from fake_openai_server import create_all_in_one_app, create_rerank_app
    from fake_openai_server.settings import Settings

    monkeypatch.setenv("RERANKER_MODEL", "")
    for factory in (create_rerank_app, create_all_in_one_app):
        with pytest.raises(ValidationError, match="RERANKER_MODEL is empty"):
            factory()
        with pytest.raises(ValidationError, match="RERANKER_MODEL is empty"):
            factory(Settings(service_type="embeddings"))
