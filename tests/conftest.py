"""Shared fixtures: stand-in models in a temporary HF cache, live servers on real sockets."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.fakes import fake_plugin
from tests.support.live import LiveServer, serve_app

if TYPE_CHECKING:
    from fake_openai_server.settings import Settings

# huggingface_hub reads HF_HOME and HF_HUB_OFFLINE once, when first imported: set them
# before anything imports it. Every test process gets its own empty cache.
_HF_HOME = Path(tempfile.mkdtemp(prefix="fos-hf-"))
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)  # also when no test used it
os.environ["HF_HOME"] = str(_HF_HOME)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("HF_HUB_CACHE", None)


@pytest.fixture(scope="session")
def hf_home() -> Iterator[Path]:
    """Tiny random-weight models under the real names, loaded with HF_HUB_OFFLINE=1."""
    from tests.support import standins

    standins.build_all(_HF_HOME, "tiny", ruri_v3=("cl-nagoya/ruri-v3-30m",))
    yield _HF_HOME
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _settings(**overrides: Any) -> Settings:
    from fake_openai_server.settings import Settings

    return Settings(**overrides)


@pytest.fixture(scope="session")
def embeddings_server(hf_home: Path) -> Iterator[LiveServer]:
    """The real embeddings app (default model names) in float32, for exact parity."""
    from fake_openai_server.api.app import create_embeddings_app

    with serve_app(create_embeddings_app(_settings(dtype="float32"))) as server:
        yield server


@pytest.fixture(scope="session")
def rerank_server(hf_home: Path) -> Iterator[LiveServer]:
    from fake_openai_server.api.app import create_rerank_app

    with serve_app(create_rerank_app(_settings(dtype="float32"))) as server:
        yield server


@pytest.fixture(scope="session")
def fake_server() -> Iterator[LiveServer]:
    """Both APIs over the deterministic fake backends: fast contract tests, no torch."""
    from fake_openai_server.api.app import build_app

    app = build_app(_settings(service_type="all", warmup=False), fake_plugin())
    with serve_app(app) as server:
        yield server
