"""MODEL_ALIASES: other names clients may send as ``model`` (an OpenAI model's name in a
client that cannot be told another)."""

from __future__ import annotations

import httpx

from fake_openai_server.api.app import build_app
from fake_openai_server.settings import Settings
from tests.support.fakes import fake_plugin
from tests.support.live import serve_app


def test_an_alias_may_name_its_model_as_clients_do() -> None:
    """By id or by its last path part, as ``model`` may be sent; an alias to a model of
    the other service (SERVICE_TYPE=all shares the setting) is that service's."""
    aliases = "text-embedding-3-small=ruri-large,ada=cl-nagoya/ruri-large,rr=ruri-v3-reranker-310m"
    settings = Settings(service_type="all", warmup=False, model_aliases=aliases)
    with (
        serve_app(build_app(settings, fake_plugin())) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as client,
    ):
        for alias in ("text-embedding-3-small", "ada"):
            reply = client.post("/v1/embeddings", json={"model": alias, "input": "別名"})
            assert reply.status_code == 200, reply.text[:300]
        reply = client.post("/v1/rerank", json={"model": "rr", "query": "q", "documents": ["a"]})
        assert reply.status_code == 200, reply.text[:300]
        # A model of the other kind, by alias or id: still a 404, but saying so. It had
        # said the model "does not exist on this server", which /v1/models lists.
        for name in ("rr", "cl-nagoya/ruri-v3-reranker-310m"):
            reply = client.post("/v1/embeddings", json={"model": name, "input": "別名"})
            assert reply.status_code == 404
            message = reply.json()["error"]["message"]
            assert "is for reranking, not for embeddings: send one of" in message, message
            assert "cl-nagoya/ruri-large" in message
        reply = client.post("/v1/rerank", json={"model": "ada", "query": "q", "documents": ["a"]})
        assert "is for embeddings, not for reranking" in reply.json()["error"]["message"]


def test_an_alias_to_no_served_model_is_named() -> None:
    """It is ignored (its clients get 404): the CLI warns of it at start-up; it had been
    dropped without a word."""
    settings = Settings(
        service_type="embeddings",
        model_aliases="a=ruri-large,b=cl-nagoya/ruri-v3-310m,c=cl-nagoya/ruri-v3-reranker-310m",
    )
    # c names the reranker, which an embeddings server does not serve.
    assert settings.aliases_for_nothing() == {
        "b": "cl-nagoya/ruri-v3-310m",
        "c": "cl-nagoya/ruri-v3-reranker-310m",
    }
    assert (
        Settings(service_type="all", model_aliases="c=ruri-v3-reranker-310m").aliases_for_nothing()
        == {}
    )
