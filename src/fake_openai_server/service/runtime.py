"""The running models: load, warm up, batch, serve, stop.

The API's lifespan owns one :class:`Runtime`. Loading happens off the event
loop, so ``/health`` answers and ``/ready`` says 503 while a large model loads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from fake_openai_server.backends.base import EmbeddingBackend, ModelInfo, RerankBackend
from fake_openai_server.engine.batcher import Batcher, RunBatch
from fake_openai_server.errors import ErrorKind, ServiceError
from fake_openai_server.families import family_for, with_overrides
from fake_openai_server.metrics import Metrics
from fake_openai_server.service.embeddings import EmbeddingModel, EmbeddingsService
from fake_openai_server.service.rerank import RerankModel, RerankService
from fake_openai_server.settings import Settings, SettingsError

log = logging.getLogger(__name__)

State = Literal["loading", "ready", "failed", "stopping"]

# After this many failed batches in a row (and none since that ran), /ready says 503
# "failing": the model is likely broken (e.g. a lost CUDA context) rather than unlucky
# once. Requests are still served, so the first batch that runs makes it ready again.
FAILING_AFTER = 3

WARMUP_TEXT = "東京は日本の首都です。瑠璃色は深い青色のことです。" * 64


@dataclass
class Backends:
    embeddings: dict[str, EmbeddingBackend] = field(default_factory=dict)
    rerank: dict[str, RerankBackend] = field(default_factory=dict)


BackendLoader = Callable[[Settings], Backends]


def load_backends(settings: Settings) -> Backends:
    """The real models, through sentence-transformers (imports torch lazily)."""
    from fake_openai_server.backends import loader

    backends = Backends()
    if settings.serves_embeddings:
        backends.embeddings = loader.load_embeddings(settings)
    if settings.serves_rerank:
        backends.rerank = loader.load_reranker(settings)
    return backends


def check_limits(settings: Settings, backends: Backends) -> None:
    """Limits that contradict a model, known only once it is loaded (its maximum length)."""
    infos = [b.info for b in backends.embeddings.values()]
    infos += [b.info for b in backends.rerank.values()]
    for info in infos:
        if info.max_length > settings.max_batch_tokens:
            raise SettingsError(
                f"MAX_BATCH_TOKENS={settings.max_batch_tokens} is smaller than the maximum "
                f"length {info.max_length} of {info.name}: a full-length input would not fit "
                "in one batch; raise MAX_BATCH_TOKENS or set MAX_SEQ_LENGTH lower"
            )


def warm_up(backends: Backends, max_batch_size: int) -> None:
    """Run the shapes traffic will bring once, so the first request is not the slow one."""
    for backend in backends.embeddings.values():
        short, full = backend.tokenize(["ウォームアップ", WARMUP_TEXT])
        backend.embed([short.ids])
        backend.embed([full.ids[:128]] * min(8, max_batch_size))
        backend.embed([full.ids])
    for reranker in backends.rerank.values():
        pair, long_pair = reranker.tokenize_pairs("ウォームアップ", ["テスト", WARMUP_TEXT])
        reranker.score([pair.ids])
        reranker.score([long_pair.ids[:128]] * min(8, max_batch_size))


class Runtime:
    def __init__(
        self,
        settings: Settings,
        loader: BackendLoader = load_backends,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self._loader = loader
        self.metrics = metrics or Metrics()
        self.state: State = "loading"
        self.failure: str | None = None
        self.misconfigured = False  # the failure is a setting that contradicts a model
        self.embeddings: EmbeddingsService | None = None
        self.rerank: RerankService | None = None
        self.models: dict[str, ModelInfo] = {}
        self._batchers: list[Batcher] = []
        self._inference = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._tokenizers = ThreadPoolExecutor(
            settings.tokenizer_workers, thread_name_prefix="tokenizer"
        )

    async def start(self) -> None:
        """Load and warm the models; on failure, record why (``/ready`` reports it)."""
        started = time.perf_counter()
        try:
            backends = await asyncio.to_thread(self._loader, self.settings)
            check_limits(self.settings, backends)
            if self.settings.warmup:
                await asyncio.to_thread(warm_up, backends, self.settings.max_batch_size)
        except SettingsError as exc:
            self.state, self.failure, self.misconfigured = "failed", str(exc), True
            log.error("invalid setting: %s", self.failure)
            return
        except Exception as exc:
            self.state = "failed"
            self.failure = f"{type(exc).__name__}: {exc}"
            log.error("model loading failed: %s", self.failure)
            return
        self._build(backends)
        self.state = "ready"
        for info in self.models.values():
            log.info(
                "ready: %s on %s, dtype %s (%s), max length %d, in %.1fs",
                info.name,
                info.device,
                info.dtype,
                info.precision_reason,
                info.max_length,
                time.perf_counter() - started,
            )

    def _batcher(self, name: str, run: RunBatch) -> Batcher:
        s = self.settings
        batcher = Batcher(
            run,
            max_batch_size=s.max_batch_size,
            max_batch_tokens=s.max_batch_tokens,
            max_queue_tokens=s.max_queue_tokens,
            executor=self._inference,
            observer=self.metrics.batch_observer(name),
            name=name,
        )
        self.metrics.track_queue(name, lambda: batcher.queued_tokens)
        batcher.start()
        self._batchers.append(batcher)
        return batcher

    def _build(self, backends: Backends) -> None:
        s = self.settings
        if backends.embeddings:
            models = {
                name: EmbeddingModel(
                    backend,
                    self._batcher(name, backend.embed),
                    with_overrides(family_for(name), s.query_prefix, s.document_prefix),
                )
                for name, backend in backends.embeddings.items()
            }
            self.embeddings = EmbeddingsService(models, s, self._tokenizers)
        if backends.rerank:
            rerankers = {
                name: RerankModel(backend, self._batcher(name, backend.score))
                for name, backend in backends.rerank.items()
            }
            self.rerank = RerankService(rerankers, s, self._tokenizers)
        self.models = {name: b.info for name, b in backends.embeddings.items()}
        self.models.update({name: b.info for name, b in backends.rerank.items()})

    def require_embeddings(self) -> EmbeddingsService:
        self._require_ready()
        assert self.embeddings is not None
        return self.embeddings

    def require_rerank(self) -> RerankService:
        self._require_ready()
        assert self.rerank is not None
        return self.rerank

    def _require_ready(self) -> None:
        if self.state != "ready":
            raise ServiceError(
                ErrorKind.NOT_READY,
                "The model is still loading; retry shortly."
                if self.state == "loading"
                else "The server cannot serve requests now (see /ready).",
            )

    def readiness(self) -> tuple[str, str | None]:
        """What /ready reports: the state, or "failing" while a model keeps failing."""
        if self.state == "failed":
            return "failed", "model loading failed; see the server log"
        failing = [b.name for b in self._batchers if b.consecutive_failures >= FAILING_AFTER]
        if self.state == "ready" and failing:
            names = ", ".join(failing)
            return "failing", f"the last {FAILING_AFTER} or more batches failed on {names}"
        return self.state, None

    def stats(self) -> dict[str, dict[str, float]]:
        return {b.name: b.stats.as_dict() for b in self._batchers}

    async def stop(self) -> None:
        self.state = "stopping"
        for batcher in self._batchers:
            await batcher.stop()
        self._inference.shutdown(wait=True, cancel_futures=True)
        self._tokenizers.shutdown(wait=False, cancel_futures=True)
