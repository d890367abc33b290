"""What the end-to-end tests share: the names the models are called by, the stand-in's
dimension, and the check of OpenAI's error envelope."""

from __future__ import annotations

from typing import Any

import httpx

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
