"""The app factories, the package's front door: one FastAPI app per service type.

``create_embeddings_app``, ``create_rerank_app`` and ``create_all_in_one_app`` each
build the app of their service (settings from the environment when none are given), so
each works as ``uvicorn --factory fake_openai_server:create_embeddings_app``;
``create_app`` builds the one ``SERVICE_TYPE`` names. The entry point (``cli.py``) builds
its app with ``build_app`` and serves it itself (logging, connection limits, the garbage
collector's settling, SIGTERM), which uvicorn's ``--factory`` does not. The models load in
the app's lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from fastapi.telemetry import TelemetryConfig
from starlette.types import Scope

from fake_openai_server.api import (
    cohere_embed,
    embeddings,
    middleware,
    ollama,
    quantized,
    rerank,
    system,
    tei,
)
from fake_openai_server.api.errors import install_error_handlers, route_path
from fake_openai_server.api.hot import hot_routes
from fake_openai_server.api.openapi import document_truthfully
from fake_openai_server.api.schemas import ItemLimits
from fake_openai_server.backends.base import Plugin
from fake_openai_server.errors import excerpt
from fake_openai_server.runtime import Runtime
from fake_openai_server.service.quantize import Calibrations, calibration_embedders
from fake_openai_server.settings import ServiceType, Settings

log = logging.getLogger(__name__)

TITLE = "fake-openai-server"
# FastAPI's native OpenTelemetry, off: it asks on every request whether a provider has
# been configured since (three environment lookups, a few percent of a one-text
# request's time in this process).
NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


def opentelemetry_wanted(environ: Mapping[str, str]) -> bool:
    """Leave FastAPI's native OpenTelemetry on where the environment configures
    OpenTelemetry (``OTEL_*``, ``FASTAPI_OTEL_AUTO_CONFIGURE``)."""
    return any(name.startswith(("OTEL_", "FASTAPI_OTEL_")) for name in environ)


def build_app(
    settings: Settings,
    plugin: Plugin | None = None,
    *,
    runtime: Runtime | None = None,
    on_failure: Callable[[], None] | None = None,
) -> FastAPI:
    """The app for ``settings.service_type``; models load when the app starts.

    ``plugin`` names the backend plugin the engine loads (default: the real models).
    ``on_failure`` is called when the models cannot be loaded or the engine cannot be
    restarted (the entry point stops the server and exits non-zero); without it a load
    failure leaves ``/ready`` at 503 and an engine that cannot come back ends the
    process with SIGTERM (under ``uvicorn --factory``: a drain, then a non-zero exit).
    """
    runtime = runtime or Runtime(settings, plugin)
    metrics = runtime.metrics
    calibrations = Calibrations(normalize=settings.normalize)

    def stop_serving() -> None:
        if on_failure is not None:
            on_failure()

    def give_up() -> None:
        """The engine cannot be restarted: stop, so that a supervisor starts a new server."""
        if on_failure is not None:
            on_failure()
        else:
            signal.raise_signal(signal.SIGTERM)

    runtime.on_fatal = give_up

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def load() -> None:
            await runtime.start()
            if runtime.state == "failed":
                stop_serving()
            # The start-up hook of the int8/uint8 calibration (service/quantize.py): once
            # the models are ready, calibrate now when warming up on a GPU (a fraction of
            # a second), else on first use (on a CPU it takes the model a minute or two
            # that the first requests would otherwise wait behind).
            if runtime.state == "ready" and runtime.embeddings is not None:
                embedders = calibration_embedders(runtime.embeddings)
                on_gpu = all(m.device.startswith("cuda") for m in runtime.models.values())
                calibrations.attach(embedders, start=settings.warmup and on_gpu)

        loading = asyncio.create_task(load(), name="load-models")
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await calibrations.stop()
            await runtime.stop()

    telemetry = opentelemetry_wanted(os.environ)
    app = FastAPI(
        title=TITLE,
        version=system.package_version(),
        summary="OpenAI-compatible embeddings and Cohere/Jina-compatible rerank for Japanese",
        lifespan=lifespan,
        telemetry=None if telemetry else NO_TELEMETRY,
        # A path with a trailing slash gets the JSON 404 that says so, not Starlette's
        # empty 307 to a URL built from the client's Host header (http:// even behind a
        # TLS proxy, where a client following it sends its texts in clear).
        redirect_slashes=False,
    )
    app.state.runtime = runtime
    app.state.calibrations = calibrations
    app.state.settings = settings
    app.state.started = int(time.time())

    routers = routers_for(settings)
    for router in routers:
        app.include_router(router)
    app.state.unrouted = Unrouted(settings)
    install_error_handlers(app)
    api_keys = settings.all_api_keys()
    document_truthfully(app, keys_required=bool(api_keys), public_paths=middleware.PUBLIC_PATHS)
    # Metrics label each request by its route's path. FastAPI includes routers lazily
    # (app.routes holds opaque wrappers), so take the paths from the routers themselves.
    routes = [getattr(route, "path", "") for route in app.routes]
    routes += [getattr(route, "path", "") for router in routers for route in router.routes]
    middleware.install(
        app,
        metrics=metrics,
        api_keys=api_keys,
        max_body_bytes=settings.max_request_bytes,
        routes=routes,
        # FastAPI's spans and metrics name a request by the route its routing found: with
        # OpenTelemetry on, every request takes that way (the shortcut would leave them
        # unnamed).
        hot={} if telemetry else hot_routes(routers),
        endpoints=[*app.routes, *(route for router in routers for route in router.routes)],
        cors_origins=settings.cors_allow_origins,
        item_limits=ItemLimits(settings.max_inputs, settings.max_documents),
        runtime=runtime,
    )
    return app


def routers_for(settings: Settings) -> list[APIRouter]:
    """The routes of every API family, for what ``settings`` serves.

    No two routers share a path and method (the root is TEI's POST and Ollama's GET,
    each router always included). FastAPI tries the routers in this order on every request
    (walking each one's routes), so the busiest come first: the OpenAI and rerank routes.
    """
    busiest: list[APIRouter] = []
    others: list[APIRouter] = []
    if settings.serves_embeddings:
        busiest.append(embeddings.router)
        others += _embeddings_routers()
    if settings.serves_rerank:
        busiest.append(rerank.router)
        others += _rerank_routers()
    return [*busiest, *others, system.router, tei.router, ollama.router]


# Where the other service's requests should go, by the service run elsewhere: the README's
# setup runs the two services on two ports, and a client given one's URL for the other's
# is the commonest mistake.
_SERVED_ELSEWHERE = {
    "embeddings": (
        "this server reranks only (SERVICE_TYPE=reranker). Embeddings are served by the "
        "embeddings service (SERVICE_TYPE=embeddings, port 8081 by default): give the client "
        "that server's URL, or serve both from one port with SERVICE_TYPE=all."
    ),
    "reranker": (
        "this server serves embeddings only (SERVICE_TYPE=embeddings). Rerank is served by "
        "the reranker service (SERVICE_TYPE=reranker, port 8082 by default): give the client "
        "that server's URL, or serve both from one port with SERVICE_TYPE=all."
    ),
}


class Unrouted:
    """The 404's message for a path this server does not route, saying what the client
    can do about it: send the other service's requests to that service, leave out a
    trailing slash, end a base URL in /v1 once."""

    def __init__(self, settings: Settings) -> None:
        # Where the other service is, when this server runs one only ("" when it runs both).
        self.elsewhere = ""
        unserved: list[APIRouter] = []
        if not settings.serves_rerank:
            unserved = [rerank.router, *_rerank_routers()]
            self.elsewhere = _SERVED_ELSEWHERE["reranker"]
        elif not settings.serves_embeddings:
            unserved = [embeddings.router, *_embeddings_routers()]
            self.elsewhere = _SERVED_ELSEWHERE["embeddings"]
        self.patterns: list[re.Pattern[str]] = [
            route.path_regex
            for router in unserved
            for route in router.routes
            if isinstance(route, APIRoute)
        ]

    def message(self, method: str, scope: Scope) -> str:
        sent, path = scope["path"], route_path(scope)
        message = f"No route {method} {excerpt(sent, 80)}"
        slash = len(path) > 1 and path.endswith("/")
        twice = path.startswith("/v1/v1/")
        # The path as the hints below would correct it: without the slash, with /v1 once.
        spelt = path.rstrip("/") if slash else path
        once = spelt[3:] if twice else spelt
        if self._served_elsewhere(spelt) or self._served_elsewhere(once):
            # The other service's path, also as corrected: the hints alone would send the
            # client to a route this server does not have either.
            message += f": {self.elsewhere}"
            if slash:
                return message + " (Leave out the trailing slash.)"
            if twice and not self._served_elsewhere(path):
                return message + " (The base URL has /v1 twice: end it in /v1 once.)"
            return message  # /v1/v1/rerank is itself a rerank route (n8n's)
        if slash:
            return message + f". Leave out the trailing slash: {excerpt(sent.rstrip('/'), 80)}"
        if twice:
            return message + ". The base URL has /v1 twice: end it in /v1 once."
        return message + "."

    def _served_elsewhere(self, path: str) -> bool:
        return any(pattern.match(path) for pattern in self.patterns)


def _embeddings_routers() -> list[APIRouter]:
    """The embeddings service's routes, beyond OpenAI's (in routers_for's order)."""
    return [quantized.router, tei.embed_router, ollama.embed_router, cohere_embed.router]


def _rerank_routers() -> list[APIRouter]:
    return [tei.rerank_router, ollama.rerank_router]


def _for(service_type: ServiceType, settings: Settings | None) -> Settings:
    """``settings`` (read from the environment when None) serving ``service_type``,
    checked as such (a copy would keep settings valid only for the other service: an
    empty RERANKER_MODEL had left the rerank app waiting forever on a failed engine)."""
    if settings is None:
        return Settings(service_type=service_type)
    return Settings.model_validate({**settings.model_dump(), "service_type": service_type})


def create_embeddings_app(
    settings: Settings | None = None, plugin: Plugin | None = None
) -> FastAPI:
    """The embeddings service (OpenAI, TEI, Ollama, Cohere embed routes, and
    /info/quantization)."""
    return build_app(_for("embeddings", settings), plugin)


def create_rerank_app(settings: Settings | None = None, plugin: Plugin | None = None) -> FastAPI:
    """The rerank service (Cohere, Jina, TEI, Voyage routes, and Ollama's /api/rerank)."""
    return build_app(_for("reranker", settings), plugin)


def create_all_in_one_app(
    settings: Settings | None = None, plugin: Plugin | None = None
) -> FastAPI:
    """Both services in one process (SERVICE_TYPE=all)."""
    return build_app(_for("all", settings), plugin)


def create_app(settings: Settings | None = None, plugin: Plugin | None = None) -> FastAPI:
    """The app SERVICE_TYPE names (settings from the environment when none are given)."""
    return build_app(settings or Settings(), plugin)
