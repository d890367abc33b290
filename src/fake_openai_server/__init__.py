"""fake-openai-server: OpenAI-compatible embeddings and Cohere/Jina-compatible rerank for
Japanese models.

The app factories are the front door (``api/app.py``)::

    uvicorn --factory fake_openai_server:create_embeddings_app
    uvicorn --factory fake_openai_server:create_rerank_app

They are imported on first use, so that the engine and tokenizer processes, which
import this package too, do not load the HTTP stack.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_all_in_one_app", "create_app", "create_embeddings_app", "create_rerank_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fake_openai_server.api import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
