"""Loads the configured models as backends (the only place that picks torch classes)."""

from __future__ import annotations

import logging

from fake_openai_server import logs
from fake_openai_server.backends.base import EmbeddingBackend, RerankBackend
from fake_openai_server.backends.sentence_transformers import (
    CrossEncoderBackend,
    SentenceTransformerBackend,
    configure_threads,
    resolve_precision,
)
from fake_openai_server.settings import Settings

log = logging.getLogger(__name__)


def route_library_logs(settings: Settings) -> None:
    """transformers and huggingface_hub log through handlers of their own: route them
    through the server's (so LOG_JSON=true gives only JSON lines), and with LOG_JSON
    turn their progress bars off."""
    import transformers.utils.logging as transformers_logging

    logs.adopt_library_loggers()
    if settings.log_json:
        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def load_embeddings(settings: Settings) -> dict[str, EmbeddingBackend]:
    route_library_logs(settings)
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
    route_library_logs(settings)
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
