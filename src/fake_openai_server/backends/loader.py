"""The backend plugin for real models (see ``backends/base.py``).

``load_models`` runs in the engine process and is the only place that picks torch
classes; ``open_tokenizer`` runs where texts are tokenized and needs no model.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from typing import Any

from fake_openai_server import logs
from fake_openai_server.backends import hub
from fake_openai_server.backends.base import Model, ModelInfo, Tokenizer
from fake_openai_server.settings import Settings

log = logging.getLogger(__name__)


def route_library_logs(settings: Settings) -> None:
    """transformers and huggingface_hub log through handlers of their own: route them
    through the server's (so LOG_JSON=true gives only JSON lines). Their progress bars are
    off with LOG_JSON; where no terminal shows them (``docker logs``, a file), transformers'
    is off too (loading the weights, in a split second: a line of carriage returns and
    escapes), and huggingface_hub's stays (a first download's progress, for minutes)."""
    import transformers.utils.logging as transformers_logging
    from huggingface_hub.utils.tqdm import are_progress_bars_disabled, enable_progress_bars

    logs.adopt_library_loggers()
    if settings.log_json or not sys.stderr.isatty():
        downloads = not are_progress_bars_disabled()
        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        if downloads and not settings.log_json:
            enable_progress_bars()  # transformers had turned them off as well


def load_models(settings: Settings, options: dict[str, Any]) -> list[Model]:
    """The configured models, loaded onto the device in the precision DTYPE picks."""
    from fake_openai_server.backends.sentence_transformers import (
        CrossEncoderModel,
        SentenceTransformerModel,
        configure_threads,
        resolve_precision,
    )

    route_library_logs(settings)
    configure_threads(settings.cpu_threads)
    precision = resolve_precision(settings.device, settings.dtype)
    wanted: list[tuple[str, type[SentenceTransformerModel | CrossEncoderModel]]] = []
    if settings.serves_embeddings:
        wanted += [(name, SentenceTransformerModel) for name in settings.embeddings_model]
    if settings.serves_rerank:
        wanted.append((settings.reranker_model, CrossEncoderModel))
    revisions = settings.revisions()
    cache_only = hub.cache_only([name for name, _ in wanted], revisions)
    models: list[Model] = []
    for name, kind in wanted:
        log.info(
            "loading %s model %s on %s as %s (%s)",
            "embeddings" if kind is SentenceTransformerModel else "reranker",
            hub.pinned_name(name, revisions),
            precision.device,
            precision.dtype,
            precision.reason,
        )
        pinned = revisions.get(name)
        common = (name, precision, settings.max_seq_length, settings.cuda_graphs)
        try:
            model = kind(*common, name in cache_only, pinned)
        except hub.UnreadableCopy:
            if not hub.completable(name, pinned):
                raise
            log.warning("%s: its copy in the cache is incomplete: completing it", name)
            model = kind(*common, False, pinned)
        model.info = replace(model.info, revision=hub.revision(name, pinned))
        models.append(model)
    return models


def prepare_tokenizers() -> None:
    """Import the tokenizer libraries (seconds), while the engine process loads the models."""
    import transformers  # noqa: F401


def open_tokenizer(info: ModelInfo, options: dict[str, Any]) -> Tokenizer:
    from fake_openai_server.backends.tokenizer import HFTokenizer

    return HFTokenizer.open(info)
