"""Loads the configured models as backends (the only place that picks torch classes)."""

from __future__ import annotations

import logging

from fake_openai_server.backends.base import EmbeddingBackend, RerankBackend
from fake_openai_server.backends.sentence_transformers import (
    CrossEncoderBackend,
    SentenceTransformerBackend,
    configure_threads,
    resolve_precision,
)
from fake_openai_server.settings import Settings

log = logging.getLogger(__name__)


def load_embeddings(settings: Settings) -> dict[str, EmbeddingBackend]:
    configure_threads(settings.cpu_threads)
    precision = resolve_precision(settings.device, settings.dtype)
    backends: dict[str, EmbeddingBackend] = {}
    for name in settings.embeddings_model:
        log.info(
            "loading embeddings model %s on %s as %s (%s)",
            name,
            precision.device,
            precision.dtype,
            precision.reason,
        )
        backends[name] = SentenceTransformerBackend(name, precision, settings.max_seq_length)
    return backends


def load_reranker(settings: Settings) -> dict[str, RerankBackend]:
    configure_threads(settings.cpu_threads)
    precision = resolve_precision(settings.device, settings.dtype)
    name = settings.reranker_model
    log.info(
        "loading reranker model %s on %s as %s (%s)",
        name,
        precision.device,
        precision.dtype,
        precision.reason,
    )
    return {name: CrossEncoderBackend(name, precision, settings.max_seq_length)}
