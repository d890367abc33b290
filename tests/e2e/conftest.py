"""Fixtures for the end-to-end tests: the stand-in tokenizer, and the real CLI in a
subprocess (only where the process boundary matters). The error-envelope check and the
model names live in tests.support.contract."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.contract import EMBEDDINGS_MODEL
from tests.support.live import LiveServer, run_cli


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
