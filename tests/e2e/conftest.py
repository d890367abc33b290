"""Shared pieces for the end-to-end tests: the error-envelope check, the stand-in
tokenizer, and the real CLI in a subprocess (only where the process boundary matters)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.live import LiveServer, run_cli

EMBEDDINGS_MODEL = "cl-nagoya/ruri-large"
RERANKER_MODEL = "cl-nagoya/ruri-v3-reranker-310m"
STANDIN_DIM = 64  # the tiny ruri-large stand-in's dimension


def assert_error(
    reply: httpx.Response,
    status: int,
    *,
    param: str | None = None,
    code: str | None = None,
    contains: str | tuple[str, ...] = (),
) -> dict[str, Any]:
    """``reply`` is ``status`` with the OpenAI envelope, all four keys; returns ``error``."""
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    for part in (contains,) if isinstance(contains, str) else contains:
        assert part in error["message"], error
    return dict(error)


@pytest.fixture(scope="session")
def ruri_tokenizer(hf_home: Path) -> Any:
    """The stand-in ruri-large tokenizer (MeCab + WordPiece), loaded from the HF cache."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(EMBEDDINGS_MODEL)


@pytest.fixture(scope="session")
def cli_env(hf_home: Path) -> dict[str, str]:
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "DTYPE": "float32"}


@pytest.fixture(scope="session")
def cli_embeddings_server(
    cli_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """``python -m fake_openai_server`` with SERVICE_TYPE=embeddings, as users start it.

    MAX_INPUT_CHARS is raised so that a 3,000,000-character input reaches the
    tokenizer path: only the server's own cut stands between it and MeCab.
    """
    env = {**cli_env, "SERVICE_TYPE": "embeddings", "MAX_INPUT_CHARS": "4000000"}
    with run_cli(env, tmp_path_factory.mktemp("cli-embeddings")) as server:
        yield server
