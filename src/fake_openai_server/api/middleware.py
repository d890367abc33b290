"""One ASGI middleware for what every request goes through, in this order:

request id → metrics → API key → body size limit → the route.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Iterable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fake_openai_server.api.errors import dialect_for, error_response
from fake_openai_server.errors import ErrorKind, ServiceError, excerpt
from fake_openai_server.metrics import Metrics

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/ready"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def too_large(limit: int) -> ServiceError:
    return ServiceError(
        ErrorKind.PAYLOAD_TOO_LARGE,
        f"The request body is over the limit MAX_REQUEST_BYTES={limit}.",
    )


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body grows past the limit while being read.

    An HTTPException, because FastAPI turns any other exception raised while it reads
    the body into "400 There was an error parsing the body"; this one stays a 413.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large(limit).message)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _as_json(scope: Scope) -> Scope:
    """Treat every POST body as JSON: curl -d and some clients send no JSON content type."""
    content_type = _header(scope, b"content-type") or ""
    if "json" in content_type:
        return scope
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    headers.append((b"content-type", b"application/json"))
    return {**scope, "headers": headers}


def _bearer_token(authorization: str | None) -> str:
    """The key in ``Authorization: Bearer <key>``; '' when absent or empty."""
    if not authorization:
        return ""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return authorization.strip() if not token else ""
    return token.strip()


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        api_keys: Iterable[str],
        max_body_bytes: int,
        routes: Iterable[str],
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.keys = [key.encode() for key in api_keys]
        self.max_body = max_body_bytes
        self.routes = frozenset(routes)

    def _authorized(self, scope: Scope) -> bool:
        if not self.keys or scope["path"] in PUBLIC_PATHS:
            return True
        token = _bearer_token(_header(scope, b"authorization")).encode()
        # Compare against every key, always, so timing says nothing about which matched.
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        sent_id = _header(scope, b"x-request-id")
        request_id = sent_id if sent_id and _REQUEST_ID.match(sent_id) else uuid.uuid4().hex
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        async def reply(error: ServiceError) -> None:
            response = error_response(error, dialect=dialect_for(scope["path"]))
            await response(scope, receive, send_with_id)

        in_progress = self.metrics.in_progress.labels(route)
        in_progress.inc()
        try:
            if not self._authorized(scope):
                await reply(
                    ServiceError(
                        ErrorKind.UNAUTHORIZED,
                        "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                    )
                )
                return
            length = _header(scope, b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await reply(self._too_large())
                return
            if scope["method"] == "POST":
                scope = _as_json(scope)
            await self._call_limited(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            in_progress.dec()
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            # The access log, at debug level: never a body, header or key.
            log.debug(
                "%s %s %d %.1fms request_id=%s",
                scope["method"],
                excerpt(scope["path"], 100),
                status,
                seconds * 1000,
                request_id,
            )

    def _too_large(self) -> ServiceError:
        return too_large(self.max_body)

    async def _call_limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app, cutting off a body (chunked or lying about its length) past the limit."""
        received = 0
        started_response = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started_response
            if message["type"] == "http.response.start":
                started_response = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started_response:
                response = error_response(self._too_large(), dialect=dialect_for(scope["path"]))
                await response(scope, receive, send)
        except Exception as exc:
            # Answer here instead of letting Starlette's ServerErrorMiddleware do it: that
            # one re-raises after replying, and uvicorn then drops the keep-alive
            # connection, so the client's next request on it fails with a reset.
            if started_response:
                raise
            log.error("unhandled %s", type(exc).__name__, exc_info=exc)
            error = ServiceError(ErrorKind.INTERNAL, "Internal server error.")
            response = error_response(error, dialect=dialect_for(scope["path"]))
            await response(scope, receive, send)
