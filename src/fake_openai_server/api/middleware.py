"""What every request goes through before its route, one ASGI middleware per job:

``RequestLog`` (request id, metrics, access log) → Starlette's ``CORSMiddleware``, where
CORS_ALLOW_ORIGINS names origins → ``HttpRules`` (HEAD, OPTIONS, repeated slashes) →
``ApiKeys`` → ``BodyLimit`` → ``CrashReply`` → ``HotRoutes`` (``api/hot.py``: the busiest
routes, without FastAPI's per-request machinery) → FastAPI's routing: outermost first.
(``install`` adds them the other way round: Starlette wraps the app in the middleware
added last outermost.)
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fake_openai_server.api.connections import CYCLE
from fake_openai_server.api.errors import (
    CLIENT_CLOSED,
    BodyRefused,
    BodyTooLarge,
    crash_response,
    dialect_for,
    error_response,
    route_path,
    too_large,
)
from fake_openai_server.api.hot import HotRoute, HotRoutes
from fake_openai_server.api.schemas import ITEM_LIMITS, ItemLimits
from fake_openai_server.errors import ErrorKind, ServiceError, excerpt
from fake_openai_server.logs import printable
from fake_openai_server.metrics import Metrics

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

    from fake_openai_server.runtime import Runtime

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/ready", "/ping"})  # answered without an API key
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_SLASHES = re.compile(r"//+")
_RAW_SLASHES = re.compile(rb"//+")


def install(
    app: FastAPI,
    *,
    metrics: Metrics,
    api_keys: Iterable[str],
    max_body_bytes: int,
    routes: Iterable[str],
    hot: Mapping[str, HotRoute],
    endpoints: Iterable[BaseRoute],
    cors_origins: Sequence[str] = (),
    item_limits: ItemLimits | None = None,
    runtime: Runtime | None = None,
) -> None:
    """``routes``: every route's path (the metrics' labels); ``endpoints``: the routes
    themselves (the methods OPTIONS lists); ``cors_origins``: CORS_ALLOW_ORIGINS;
    ``item_limits``: MAX_INPUTS and MAX_DOCUMENTS, checked as a body is validated;
    ``runtime``: whose drain refuses the bodies still coming when its time is up."""
    # Starlette wraps the app in the middleware added last first: innermost first here.
    app.add_middleware(HotRoutes, routes=hot, handlers=app.exception_handlers)
    app.add_middleware(CrashReply)
    app.add_middleware(
        BodyLimit, max_body_bytes=max_body_bytes, item_limits=item_limits, runtime=runtime
    )
    app.add_middleware(ApiKeys, api_keys=api_keys)
    app.add_middleware(HttpRules, endpoints=endpoints)
    if cors_origins:
        # Outside the key check: a browser's preflight carries no key. Every reply,
        # errors included, gets the headers, so that the page can read the error.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=("GET", "HEAD", "POST", "OPTIONS"),
            allow_headers=("*",),  # Authorization, Content-Type, X-Request-Id, the SDKs' own
            expose_headers=("X-Request-Id", "Retry-After"),
            # Chrome asks before a public page may reach a server on a private address.
            allow_private_network=True,
        )
    app.add_middleware(RequestLog, metrics=metrics, routes=routes)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _reply(error: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(error, dialect=dialect_for(route_path(scope)))
    await response(scope, receive, send)


class RequestLog:
    """Gives every reply an X-Request-Id (the client's, when it sent a sane one), counts
    the request in the metrics by route and status, and logs it at debug level."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes)
        # Routes with a parameter in their path (Azure's deployment): labelled by their
        # template as OpenAPI writes it ({deployment}), so that no client can add series
        # by naming new deployments.
        self.templates = [compile_path(path)[:2] for path in self.routes if "{" in path]
        # Each series looked up once, on first use (prometheus_client checks the labels
        # on every .labels() call: a dozen function calls per request).
        self._by_route: dict[str, tuple[Gauge, Histogram]] = {}  # in progress, latency
        self._by_status: dict[tuple[str, int], Counter] = {}  # requests counted

    def _route_series(self, route: str) -> tuple[Gauge, Histogram]:
        series = self._by_route.get(route)
        if series is None:
            series = (self.metrics.in_progress.labels(route), self.metrics.latency.labels(route))
            self._by_route[route] = series
        return series

    def _count(self, route: str, status: int) -> None:
        counter = self._by_status.get((route, status))
        if counter is None:
            counter = self.metrics.requests.labels(route, str(status))
            self._by_status[route, status] = counter
        counter.inc()

    def _template(self, path: str) -> str:
        return next((route for regex, route in self.templates if regex.match(path)), "other")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        sent_id = _header(scope, b"x-request-id")
        request_id = sent_id if sent_id and _REQUEST_ID.match(sent_id) else os.urandom(16).hex()
        path = route_path(scope)
        if "//" in path:  # the route HttpRules will find
            path = _SLASHES.sub("/", path)
        route = path if path in self.routes else self._template(path)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        in_progress, latency = self._route_series(route)
        in_progress.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            in_progress.dec()
            # Taken out of the scope, which the cycle holds: no reference cycle is left
            # for the garbage collector (memory.py keeps its work rare).
            if getattr(scope.pop(CYCLE, None), "disconnected", False):
                status = CLIENT_CLOSED  # the reply never left: uvicorn drops it silently
            self._count(route, status)
            latency.observe(seconds)
            if log.isEnabledFor(logging.DEBUG):  # the access log: never a body, header or key
                log.debug(
                    "%s %s %d %.1fms request_id=%s",
                    scope["method"],
                    printable(excerpt(scope["path"], 100)),
                    status,
                    seconds * 1000,
                    request_id,
                )


class HttpRules:
    """What HTTP means and FastAPI's routes leave out, before the API key is asked for.

    - HEAD is answered as GET, without the body (uvicorn drops it): uptime monitors,
      ``wget --spider`` and HAProxy's ``option httpchk HEAD ...`` probe that way, and
      FastAPI's GET routes would say 405.
    - OPTIONS on a path that has routes gets 204 and their methods in ``Allow``, without
      a key: HAProxy's plain ``option httpchk`` sends ``OPTIONS /``, and browsers send
      their CORS preflight without credentials (where CORS_ALLOW_ORIGINS is set, the
      CORS middleware answers preflights before this; without it, this 204 carries no
      CORS headers, which a browser takes as a no). A path without routes goes on to
      its 404.
    - Repeated slashes count as one, as nginx reads them: a base URL pasted with a
      trailing slash, joined by a client that adds ``/v1/embeddings``, asks for
      ``//v1/embeddings``.
    """

    def __init__(self, app: ASGIApp, *, endpoints: Iterable[BaseRoute]) -> None:
        self.app = app
        self.endpoints = [route for route in endpoints if getattr(route, "methods", None)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "//" in scope["path"]:
            scope = _merge_slashes(scope)
        method = scope["method"]
        if method == "HEAD":
            # A copy: uvicorn reads its own scope's HEAD to leave the body out.
            scope = {**scope, "method": "GET"}
        elif method == "OPTIONS":
            allowed = self._allowed(scope)
            if allowed:
                allow = ", ".join(sorted(allowed))
                await Response(status_code=204, headers={"allow": allow})(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> set[str]:
        """The methods of the routes at ``scope``'s path (HEAD with GET, and OPTIONS)."""
        allowed: set[str] = set()
        for route in self.endpoints:
            if route.matches(scope)[0] is not Match.NONE:
                allowed |= getattr(route, "methods", set())
        if "GET" in allowed:
            allowed.add("HEAD")
        if allowed:
            allowed.add("OPTIONS")
        return allowed


def _merge_slashes(scope: Scope) -> Scope:
    merged = _SLASHES.sub("/", scope["path"])
    raw = scope.get("raw_path")
    if isinstance(raw, bytes):
        return {**scope, "path": merged, "raw_path": _RAW_SLASHES.sub(b"/", raw)}
    return {**scope, "path": merged}


def _presented_key(scope: Scope) -> str:
    """The key in ``Authorization: Bearer <key>``, else in ``api-key: <key>`` (Azure
    OpenAI's header, which its clients send instead); '' when neither has one."""
    return (
        _bearer_token(_header(scope, b"authorization"))
        or (_header(scope, b"api-key") or "").strip()
    )


def _bearer_token(authorization: str | None) -> str:
    """The key in ``Authorization: Bearer <key>``, or the whole value when it is one word
    (``Authorization: <key>``, no scheme); '' when absent, empty or another scheme's."""
    if not authorization:
        return ""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return authorization.strip() if not token else ""
    return token.strip()


class ApiKeys:
    """401 unless the request carries one of the keys (when keys are set); the health
    probes stay open."""

    def __init__(self, app: ASGIApp, *, api_keys: Iterable[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in api_keys]

    def _authorized(self, scope: Scope) -> bool:
        if not self.keys or route_path(scope) in PUBLIC_PATHS:
            return True
        token = _presented_key(scope).encode()
        # Compare against every key, always, so timing says nothing about which matched.
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = ServiceError(
            ErrorKind.UNAUTHORIZED,
            "Missing or wrong API key: send 'Authorization: Bearer <key>' (or, as Azure "
            "OpenAI clients do, 'api-key: <key>').",
        )
        await _reply(error, scope, receive, send)


def _as_json(scope: Scope) -> Scope:
    """Treat every POST body as JSON: curl -d and some clients send no JSON content type,
    or one FastAPI would not parse (``text/json``, ``application/x-ndjson``)."""
    content_type = _header(scope, b"content-type") or ""
    if content_type == "application/json" or _parsed_as_json(content_type):
        return scope
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    headers.append((b"content-type", b"application/json"))
    return {**scope, "headers": headers}


def _parsed_as_json(content_type: str) -> bool:
    """Whether FastAPI reads a body of this type as JSON (application/json, */*+json)."""
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


class BodyLimit:
    """413 for a body over MAX_REQUEST_BYTES: at once when Content-Length says so, else
    as soon as the body read so far (chunked, or lying about its length) passes it.
    Every POST body is read as JSON, its lists counted against ``item_limits`` before their
    items are built (``api/schemas.py``'s ``counted``).

    And a body still coming when the drain's time is up (``Runtime.refuse_waiting``:
    a slow upload, or a client stalled mid-body within READ_TIMEOUT_SECONDS) is no longer
    waited for: its request is answered 503 "shutting down" as every other one the grace
    cannot wait for (uvicorn had cancelled it at the end: a bare text 500 and a traceback
    in the log)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        item_limits: ItemLimits | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.item_limits = item_limits
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _reply(too_large(self.max_body), scope, receive, send)
            return
        if scope["method"] == "POST":
            scope = _as_json(scope)
        received = 0
        body_in = self.runtime is None  # then nothing refuses a body

        async def limited_receive() -> Message:
            nonlocal received, body_in
            if body_in:  # what comes now is the disconnect: never refused
                message = await receive()
            else:
                assert self.runtime is not None
                message = await _refusable(self.runtime, receive)
                body_in = message["type"] != "http.request" or not message.get("more_body")
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        counting = ITEM_LIMITS.set(self.item_limits)
        try:
            await self.app(scope, limited_receive, send)
        finally:
            ITEM_LIMITS.reset(counting)


async def _refusable(runtime: Runtime, receive: Receive) -> Message:
    """``receive()``, unless the drain's time is up before it returns: then BodyRefused
    (what ``answer_in_time`` does for a request's work, for the wait for its body)."""
    if runtime.refusing is not None:
        raise BodyRefused(runtime.refusing)
    task = asyncio.current_task()
    assert task is not None
    why: ServiceError | None = None

    def refuse(error: ServiceError) -> None:
        nonlocal why
        if why is None:
            why = error
            task.cancel()

    runtime.answering.add(refuse)
    try:
        return await receive()
    except asyncio.CancelledError:
        if why is None:
            raise  # the server's own cancellation: not ours to answer
        task.uncancel()
        raise BodyRefused(why) from None
    finally:
        runtime.answering.discard(refuse)


class CrashReply:
    """Answers what escaped the routes' error handlers (a 413 raised outside them, any
    crash) with the error envelope, unless the reply had already begun.

    Answering here, not in Starlette's ServerErrorMiddleware, keeps the connection: that
    one re-raises after replying, and uvicorn then drops the keep-alive connection, so
    the client's next request on it fails with a reset.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_response = False

        async def tracking_send(message: Message) -> None:
            nonlocal started_response
            if message["type"] == "http.response.start":
                started_response = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except BodyTooLarge as exc:
            if not started_response:
                await _reply(too_large(exc.limit), scope, receive, send)
        except BodyRefused as exc:
            if not started_response:
                await _reply(exc.error, scope, receive, send)
        except Exception as exc:
            if started_response:
                raise
            await crash_response(exc, route_path(scope))(scope, receive, send)
