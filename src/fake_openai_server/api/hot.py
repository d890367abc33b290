"""The routes every client calls, answered without FastAPI's per-request machinery.

For a one-text request FastAPI's routing, dependency solving and body parsing cost about
as much of the server process's CPU as everything else it does (reading the request,
tokenizing, batching, replying), and that process is what limits many clients on a large
GPU (``bench/results/calls-{before,after}-hot-routes.md``,
``ab-null-cpu-hot-routes.md``). So the endpoints marked ``@hot`` (OpenAI's embeddings,
Cohere's and Jina's embed and rerank, Ollama's embed and rerank, and TEI's /embed; not
the side routes, TEI's POST / and /rerank or Azure's path) are also reached this shorter
way: the body is parsed by pydantic's JSON parser straight into the route's request
model and the endpoint called with it, its exceptions answered by the app's own
handlers.

Nothing else changes. Only a body that parses is taken this way; any other (malformed
JSON, a wrong field, a missing input) goes on to FastAPI, which says what is wrong
exactly as before, and so do every other route, method and path. The endpoint is the
same function either way, and FastAPI still documents it (OpenAPI).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, get_type_hints

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fake_openai_server.api.errors import ClientGone, route_path

Endpoint = Callable[[Any, Request], Awaitable[Response]]
ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]
E = TypeVar("E", bound=Endpoint)

_MARK = "_fos_hot"


def hot(endpoint: E) -> E:
    """Also answer this endpoint through ``HotRoutes``; it must be
    ``async def name(body: SomeModel, request: Request) -> Response``."""
    setattr(endpoint, _MARK, True)
    return endpoint


@dataclass(frozen=True)
class HotRoute:
    model: type[BaseModel]
    endpoint: Endpoint


def hot_routes(routers: Iterable[APIRouter]) -> dict[str, HotRoute]:
    """The POST paths of the ``@hot`` endpoints in ``routers``, with their body model."""
    routes: dict[str, HotRoute] = {}
    for router in routers:
        for route in router.routes:
            if not isinstance(route, APIRoute) or not getattr(route.endpoint, _MARK, False):
                continue
            if route.methods != {"POST"}:
                raise TypeError(f"@hot {route.path} must be a POST route only")
            if route.dependencies:
                raise TypeError(f"@hot {route.path} cannot have dependencies (none would run)")
            routes[route.path] = HotRoute(_body_model(route.endpoint), route.endpoint)
    return routes


def _body_model(endpoint: Endpoint) -> type[BaseModel]:
    names = list(inspect.signature(endpoint).parameters)
    model = get_type_hints(endpoint).get("body")
    if names != ["body", "request"] or not (
        isinstance(model, type) and issubclass(model, BaseModel)
    ):
        raise TypeError(
            f"@hot {endpoint.__name__} must take (body: <a pydantic model>, request: Request)"
        )
    return model


class HotRoutes:
    """The ASGI middleware that answers the ``@hot`` routes (innermost: the server's own
    middleware, API keys and body limit included, runs before it)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Mapping[str, HotRoute],
        handlers: Mapping[Any, Callable[..., Any]],
    ) -> None:
        self.app = app
        self.routes = dict(routes)
        # The app's exception handlers, by exception class (FastAPI's own table, so that
        # an endpoint's error is answered here exactly as FastAPI would answer it).
        self.handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self.routes.get(route_path(scope))
        if route is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            raw = await _read_body(receive)
            body = parsed_body(route.model, raw)
            response = None if body is None else await route.endpoint(body, request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        if response is None:
            # FastAPI says what is wrong with the body, as it does for every route.
            await self.app(scope, _replay(raw, receive), send)
            return
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> ExceptionHandler | None:
        """The app's handler for ``exc`` (Starlette's rule: the nearest class in its MRO),
        not counting a catch-all for ``Exception``, which is not FastAPI's to answer."""
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            handler = self.handlers.get(cls)
            if handler is not None:
                return handler
        return None


def parsed_body(model: type[BaseModel], raw: bytes) -> BaseModel | None:
    """``raw`` as ``model`` by pydantic's JSON parser; None when it does not parse (the body
    then goes to FastAPI)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError:
        return None


async def _read_body(receive: Receive) -> bytes:
    """What Starlette's ``Request.body()`` does, without its async generator and
    ``aclosing`` (a dozen calls per request on the path this module exists to shorten);
    a client that leaves before its body is in gets the reply of one that left later."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(raw: bytes, receive: Receive) -> Receive:
    """``receive`` with the body already read given back first."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": raw, "more_body": False}

    return replay
