"""Start-up wiring: the running server's moving parts, and whether it can serve.

A :class:`Runtime` starts the engine process (which loads and warms the models),
opens the tokenizers and the tokenizer processes, builds the services over them,
wires the metrics, watches the event loop, and says what ``/ready`` reports. The
API's lifespan starts and stops it; the entry point (``cli.py``) reads why it failed.
The engine process loads the models while this process keeps answering, so ``/health``
answers and ``/ready`` says 503 while a large model loads.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Literal

from fake_openai_server.backends.base import ModelInfo, Plugin, Tokenizer
from fake_openai_server.engine.core import LOADING, Engine, server_stopping
from fake_openai_server.errors import ErrorKind, ServiceError
from fake_openai_server.families import family_for, with_overrides
from fake_openai_server.memory import AfterOverload
from fake_openai_server.metrics import Metrics
from fake_openai_server.service.common import unknown_model
from fake_openai_server.service.embeddings import EmbeddingModel, EmbeddingsService
from fake_openai_server.service.rerank import RerankModel, RerankService
from fake_openai_server.service.tokenizing import TokenizerPool
from fake_openai_server.service.tokens import Tokens
from fake_openai_server.settings import Settings, SettingsError
from fake_openai_server.workers import StartFailed, WorkerGone

log = logging.getLogger(__name__)

State = Literal["loading", "ready", "failed", "stopping"]

# How often the event loop's lag is measured (it shows on /metrics).
LAG_INTERVAL = 0.25
# How often a model whose batches keep failing is tried with a text of the server's own.
PROBE_SECONDS = 10.0
PROBE_TEXT = "probe"


def check_limits(settings: Settings, models: list[ModelInfo]) -> None:
    """Limits that contradict a model, known only once it is loaded (its maximum length)."""
    for info in models:
        if info.max_length > settings.max_batch_tokens:
            raise SettingsError(
                f"MAX_BATCH_TOKENS={settings.max_batch_tokens} is smaller than the maximum "
                f"length {info.max_length} of {info.name}: a full-length input would not fit "
                "in one batch; raise MAX_BATCH_TOKENS or set MAX_SEQ_LENGTH lower"
            )


class Runtime:
    def __init__(
        self,
        settings: Settings,
        plugin: Plugin | None = None,
    ) -> None:
        self.settings = settings
        self.limits = settings.limits()
        self.plugin = plugin or Plugin()
        self.metrics = Metrics()
        self.state: State = "loading"
        self.failure: str | None = None
        self.misconfigured = False  # the failure is a setting that contradicts a model
        self.on_fatal: Callable[[], None] | None = None  # the engine cannot be restarted
        self.on_ready: Callable[[], None] | None = None  # start-up is done (not on failure)
        self.embeddings: EmbeddingsService | None = None
        self.rerank: RerankService | None = None
        self.tokens: Tokens | None = None  # TEI's /tokenize and /decode
        # The requests being answered, each by what ends it with an error (refuse_waiting).
        self.answering: set[Callable[[ServiceError], None]] = set()
        self.refusing: ServiceError | None = None  # refuse_waiting's error, once called
        self.models: dict[str, ModelInfo] = {}
        self.tokenizer_kinds: dict[str, str] = {}
        self.engine = Engine(
            settings,
            self.plugin,
            observers=self.metrics.batch_observer,
            on_fatal=self._fatal,
        )
        self.tokenizers = TokenizerPool(settings, self.plugin)
        self.metrics.track_restarts(lambda: self.engine.restarts, lambda: self.tokenizers.restarts)
        self.metrics.track_ready(lambda: self.readiness()[0] == "ready")
        self.metrics.track_engine_process(lambda: self.engine.pid)
        self.metrics.track_tokenizer_processes(
            lambda: [w.pid for w in self.tokenizers.workers if w.alive and w.pid is not None]
        )
        self._tasks: list[asyncio.Task[None]] = []  # the runtime's own, until stop()

    async def start(self) -> None:
        """Start the engine and open the tokenizers; on failure, record why (``/ready`` says)."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._measure_lag(), name="loop-lag"))
        # The tokenizer libraries load here while the engine process loads the models.
        preparing = asyncio.ensure_future(asyncio.to_thread(self._prepare_tokenizers))
        try:
            models = await self.engine.start()
            check_limits(self.settings, models)
            await preparing
            tokenizers = await asyncio.to_thread(self._open_tokenizers, models)
            await self.tokenizers.start(models, tokenizers)
        except SettingsError as exc:
            self.state, self.failure, self.misconfigured = "failed", str(exc), True
            log.error("invalid setting: %s", self.failure)
            return
        except StartFailed as exc:
            self.state, self.failure, self.misconfigured = "failed", str(exc), exc.setting
            log.error("%s: %s", "invalid setting" if exc.setting else "model loading failed", exc)
            return
        except WorkerGone as exc:
            self.state, self.failure = "failed", str(exc)
            log.error("model loading failed: %s", self.failure)
            return
        except Exception as exc:
            self.state, self.failure = "failed", f"{type(exc).__name__}: {exc}"
            log.error("start-up failed: %s", self.failure)
            return
        finally:
            if not preparing.done():
                preparing.cancel()
            elif not preparing.cancelled():
                # Retrieved, or asyncio prints its traceback when the engine failed first.
                preparing.exception()
        self._build(models, tokenizers)
        self._tasks.append(loop.create_task(self._probe_failing(), name="probe-failing"))
        if self.on_ready is not None:
            self.on_ready()  # before /ready says so: no request waits for it
        self.state = "ready"
        for info in models:
            log.info(
                "ready: %s%s on %s, dtype %s (%s), max length %d, tokenizer %s, in %.1fs",
                info.name,
                f" (revision {info.revision})" if info.revision else "",
                info.device,
                info.dtype,
                info.precision_reason,
                info.max_length,
                self.tokenizer_kinds[info.name],
                time.perf_counter() - started,
            )

    def _prepare_tokenizers(self) -> None:
        prepare = getattr(importlib.import_module(self.plugin.module), "prepare_tokenizers", None)
        if prepare is not None:
            prepare()

    def _open_tokenizers(self, models: list[ModelInfo]) -> dict[str, Tokenizer]:
        plugin = importlib.import_module(self.plugin.module)
        options = self.plugin.options or {}
        return {info.name: plugin.open_tokenizer(info, options) for info in models}

    def _build(self, models: list[ModelInfo], tokenizers: dict[str, Tokenizer]) -> None:
        s = self.settings
        engine = self.engine
        for info in models:
            self.metrics.track_queue(info.name, partial(engine.queued_tokens, info.name))
            self.tokenizer_kinds[info.name] = tokenizers[info.name].kind
        embedders = {
            info.name: EmbeddingModel(
                info,
                tokenizers[info.name],
                with_overrides(family_for(info.name), s.query_prefix, s.document_prefix),
            )
            for info in models
            if info.task == "embeddings"
        }
        if embedders:
            self.embeddings = EmbeddingsService(
                embedders,
                engine,
                self.tokenizers,
                limits=self.limits,
                aliases=s.aliases(),
                default_input_type=s.default_input_type,
                normalize=s.normalize,
                allow_token_ids=s.allow_token_ids,
            )
        rerankers = {
            info.name: RerankModel(info, tokenizers[info.name])
            for info in models
            if info.task == "rerank"
        }
        if rerankers:
            self.rerank = RerankService(
                rerankers, engine, self.tokenizers, limits=self.limits, aliases=s.aliases()
            )
        if self.embeddings is not None and self.rerank is not None:
            self.embeddings.names.others = self.rerank.names
            self.rerank.names.others = self.embeddings.names
        self.tokens = Tokens(
            self.embeddings,
            self.rerank,
            max_inputs=self.limits.max_inputs,
            max_tokens=self.limits.max_request_tokens,
        )
        self.models = {info.name: info for info in models}

    def _fatal(self, reason: str) -> None:
        self.state, self.failure = "failed", reason
        if self.on_fatal is not None:
            self.on_fatal()

    async def _measure_lag(self) -> None:
        """How late the event loop wakes up (what every request waits before it is read);
        and, once a large queue has drained, give its memory back."""
        loop = asyncio.get_running_loop()
        overload = AfterOverload()
        while True:
            expected = loop.time() + LAG_INTERVAL
            await asyncio.sleep(LAG_INTERVAL)
            self.metrics.observe_loop_lag(max(loop.time() - expected, 0.0))
            if self.state == "ready":
                overload.observe(self.engine.queued_items + self.engine.in_flight)

    async def _probe_failing(self) -> None:
        """A model whose last batches failed keeps /ready at 503 "failing" until a batch
        of it succeeds, and a pod that its readinessProbe takes out of the Service gets no
        request to prove it well again (a CUDA out-of-memory while another process held
        the device, say). So every PROBE_SECONDS such a model is sent one short text of
        the server's own, tokenized and run as a request's: when it answers, /ready is
        200 again (and while it fails, its batch failures go on counting)."""
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            if self.state != "ready" or self.engine.state != "ready":
                continue
            for name in self.engine.failing():
                try:
                    if self.models[name].task == "rerank":
                        encoded = await self.tokenizers.encode_pairs(name, PROBE_TEXT, [PROBE_TEXT])
                    else:
                        encoded = await self.tokenizers.encode(name, [PROBE_TEXT])
                    await self.engine.submit(name, [encoded[0].ids])
                except Exception as exc:
                    log.debug("%s: the probe failed (%s)", name, type(exc).__name__)
                else:
                    log.info("%s: a probe batch succeeded; serving again", name)

    def model_names(self) -> list[str]:
        """Every name /v1/models lists: each service's models and aliases, embeddings first."""
        services = (self.embeddings, self.rerank)
        return [
            name for service in services if service is not None for name in service.names.listed
        ]

    def resolve_any(self, requested: str) -> str:
        """The served model, of either kind, that ``requested`` names; a 404 naming every
        served model when none is."""
        for service in (self.embeddings, self.rerank):
            if service is not None and requested in service.names:
                return service.names.resolve(requested)
        raise unknown_model(requested, self.model_names())

    def require_embeddings(self) -> EmbeddingsService:
        self.require_ready()
        assert self.embeddings is not None
        return self.embeddings

    def require_rerank(self) -> RerankService:
        self.require_ready()
        assert self.rerank is not None
        return self.rerank

    def require_tokens(self) -> Tokens:
        self.require_ready()
        assert self.tokens is not None
        return self.tokens

    def require_ready(self) -> None:
        """Raise the 503 a request gets while the models are not serving."""
        if self.state != "ready":
            raise ServiceError(
                ErrorKind.NOT_READY,
                LOADING
                if self.state == "loading"
                else "The server cannot serve requests now (see /ready).",
            )

    def readiness(self) -> tuple[str, str | None]:
        """What /ready reports: the state and, when not ready, why."""
        if self.state == "failed":
            if self.misconfigured or self.engine.state != "failed":
                return "failed", "model loading failed; see the server log"
            return "failed", self.engine.detail
        if self.state != "ready":
            return self.state, None
        status, detail = self.engine.readiness()
        if status == "ready":
            detail = self.tokenizers.health()
        return status, detail

    def stats(self) -> dict[str, dict[str, float]]:
        return self.engine.stats()

    def refuse_waiting(self) -> None:
        """The drain's time is nearly up: answer every request still waiting, and every
        one that comes from now on, with 503 "shutting down" while their clients still
        wait for a reply (uvicorn cancels what is left at the end: a bare text 500).
        Those in the engine (``Engine.refuse_waiting``), and those anywhere else: waiting
        for a tokenizer, or on their way to the engine."""
        self.refusing = server_stopping()
        self.engine.refuse_waiting()
        for refuse in list(self.answering):
            refuse(self.refusing)

    async def stop(self) -> None:
        self.state = "stopping"
        for task in self._tasks:
            task.cancel()
        # Whatever became of them, the engine and the tokenizers are stopped below.
        for task, ended in zip(
            self._tasks, await asyncio.gather(*self._tasks, return_exceptions=True), strict=True
        ):
            if isinstance(ended, Exception):
                log.error("the task %s had failed", task.get_name(), exc_info=ended)
        try:
            await self.engine.stop()
        finally:
            await self.tokenizers.stop()
