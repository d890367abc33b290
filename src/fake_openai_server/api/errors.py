"""Every failure becomes a reply here, from one table: what a route raises, what
FastAPI raises, what the middleware meets (a key missing, a body too large, a crash).

``{"error": {"message", "type", "param", "code"}}`` with all four keys. Jina-
style clients read ``detail`` on failure, so it carries the message too (and so do
Voyage's, which hit the same /v1 routes).

The routes of other APIs answer in the envelope their clients parse (the *dialect*),
with the same status codes and messages:

- text-embeddings-inference (/embed, /similarity, /tokenize, /decode, POST / and
  /invocations, /rerank with ``texts``):
  ``{"error": message, "error_type": "Validation" | ...}``, TEI's own shape.
- Ollama (/api/...): ``{"error": message}``; the ollama client reads ``error`` as a string.
- Cohere embed (/v1/embed, /v2/embed): ``{"id", "message"}``, Cohere's shape.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Scope

from fake_openai_server.errors import ErrorKind, ServiceError, excerpt

log = logging.getLogger(__name__)

# kind → (status, type, code)
ERROR_TABLE: dict[ErrorKind, tuple[int, str, str | None]] = {
    ErrorKind.INVALID_REQUEST: (400, "invalid_request_error", None),
    ErrorKind.UNAUTHORIZED: (401, "invalid_request_error", "invalid_api_key"),
    ErrorKind.MODEL_NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    ErrorKind.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    ErrorKind.METHOD_NOT_ALLOWED: (405, "invalid_request_error", "method_not_allowed"),
    ErrorKind.PAYLOAD_TOO_LARGE: (413, "invalid_request_error", "request_too_large"),
    ErrorKind.OVERLOADED: (429, "rate_limit_error", "server_overloaded"),
    ErrorKind.MODEL_FAILURE: (500, "server_error", "model_failure"),
    ErrorKind.INTERNAL: (500, "server_error", None),
    ErrorKind.NOT_READY: (503, "server_error", "model_not_ready"),
    ErrorKind.TIMEOUT: (504, "server_error", "timeout"),
}

RETRY_AFTER_SECONDS = {ErrorKind.OVERLOADED: "1", ErrorKind.NOT_READY: "5"}

# Starlette's HTTPException statuses that have a kind of their own.
HTTP_KINDS = {
    404: ErrorKind.NOT_FOUND,
    405: ErrorKind.METHOD_NOT_ALLOWED,
    413: ErrorKind.PAYLOAD_TOO_LARGE,
}

CLIENT_CLOSED = 499  # nginx's code for "client closed request"; nobody reads it

# FastAPI's reply to a body that its JSON parser refused for more than its syntax (nested
# over ~1,000 levels, an integer of over 4,300 digits; bytes that are not UTF-8, or
# compressed), and what this server says instead.
FASTAPI_BODY_ERROR = "There was an error parsing the body"
UNREADABLE_BODY = (
    "The request body could not be read as JSON: it is nested too deeply or holds a number "
    "with too many digits."
)


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


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
        self.limit = limit


class BodyRefused(HTTPException):
    """Raised from ``receive`` when the drain's time is up (``Runtime.refuse_waiting``)
    while a body is still coming: the request gets ``error`` (503 "shutting down"), not
    uvicorn's cancellation at the end of the grace (a bare text 500 and a traceback).
    An HTTPException for the reason ``BodyTooLarge`` is one."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(503, error.message)
        self.error = error


# The last guard against echoing input: no message is longer, whatever it quotes.
MESSAGE_LIMIT = 600


Dialect = Literal["openai", "tei", "ollama", "cohere"]

# TEI's ErrorType names, by kind (TEI itself has no 401/404 bodies: it answers bare codes).
TEI_ERROR_TYPES: dict[ErrorKind, str] = {
    ErrorKind.UNAUTHORIZED: "Unauthorized",
    ErrorKind.OVERLOADED: "Overloaded",
    ErrorKind.TIMEOUT: "Overloaded",  # TEI has no timeout; a 504 here is a queue too long
    ErrorKind.NOT_READY: "Unhealthy",
    ErrorKind.MODEL_FAILURE: "Backend",
    ErrorKind.INTERNAL: "Backend",
}

TEI_PATHS = frozenset({"/", "/invocations", "/embed", "/similarity", "/tokenize", "/decode"})
COHERE_EMBED_PATHS = frozenset({"/v1/embed", "/v2/embed"})


def dialect_for(path: str, chosen: str | None = None) -> Dialect:
    """The error envelope for a path; ``chosen`` is what a route set for its request
    (``/rerank`` answers in TEI's envelope only when it was sent TEI's body)."""
    if chosen in ("openai", "tei", "ollama", "cohere"):
        return chosen  # type: ignore[return-value]
    if path.startswith("/api/"):
        return "ollama"
    if path in TEI_PATHS:
        return "tei"
    if path in COHERE_EMBED_PATHS:
        return "cohere"
    return "openai"


def route_path(scope: Scope) -> str:
    """The path the routes answer: ``path`` without the ``root_path`` in front of it (uvicorn
    ``--root-path`` puts it there), the way Starlette's router reads it."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :]
    return path


def request_dialect(request: Request) -> Dialect:
    return dialect_for(route_path(request.scope), getattr(request.state, "error_dialect", None))


def error_body(error: ServiceError, dialect: Dialect = "openai") -> dict[str, Any]:
    _, error_type, code = ERROR_TABLE[error.kind]
    message = excerpt(error.message, MESSAGE_LIMIT)
    if dialect == "tei":
        return {"error": message, "error_type": TEI_ERROR_TYPES.get(error.kind, "Validation")}
    if dialect == "ollama":
        return {"error": message}
    if dialect == "cohere":
        return {"id": str(uuid.uuid4()), "message": message}
    param = None if error.param is None else excerpt(error.param, 80)
    return {
        "error": {"message": message, "type": error_type, "param": param, "code": code},
        "detail": message,
    }


def error_response(
    error: ServiceError, headers: dict[str, str] | None = None, dialect: Dialect = "openai"
) -> Response:
    status = ERROR_TABLE[error.kind][0]
    body = error_body(error, dialect)
    all_headers = dict(headers or {})
    if error.kind in RETRY_AFTER_SECONDS:
        all_headers["Retry-After"] = RETRY_AFTER_SECONDS[error.kind]
    return Response(
        orjson.dumps(body),
        status_code=status,
        media_type="application/json",
        headers=all_headers,
    )


_INPUT_SHAPES = {
    "input": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "documents": "a list of strings or of objects with a 'text' field",
    "inputs": "a string or a list of strings",
    "texts": "a list of strings",
    "ids": "a list of token ids or a list of token-id lists",
}


# Where one field name means another shape: Cohere v2's inputs are content objects.
_INPUT_SHAPES_AT = {
    ("/v2/embed", "inputs"): "a list of objects, each with a 'content' list of text parts",
    ("/similarity", "inputs"): (
        "an object with 'source_sentence' (a string) and 'sentences' (a list of strings)"
    ),
}


# Fields that are objects of named fields: an error inside one names its path.
_OBJECTS = {("/similarity", "inputs")}


def validation_message(errors: list[dict[str, Any]], route: str = "") -> tuple[str, str | None]:
    """One readable sentence for a request-validation failure on ``route`` (its path),
    and the field it names."""
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if not loc:
        return "The request body must be a JSON object.", None
    field, path = loc[0], ".".join(loc)
    if first.get("type") == "missing":
        return f"'{path}' is required.", field
    if len(loc) > 1 and (route, field) in _OBJECTS:  # a field inside it: named as sent
        return f"Invalid '{path}': {first.get('msg', 'invalid value')}.", field
    shape = _INPUT_SHAPES_AT.get((route, field)) or _INPUT_SHAPES.get(field)
    if shape is not None:
        return f"Invalid '{field}': expected {shape}.", field
    return f"Invalid '{path}': {first.get('msg', 'invalid value')}.", field


def _unreadable(request: Request, cause: BaseException | None) -> str:
    """Why a body FastAPI's JSON parser refused could not be read, as far as is known."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return (
            f"The request body is compressed (Content-Encoding: {excerpt(encoding, 20)}), "
            "which this server does not read; send it uncompressed."
        )
    if isinstance(cause, UnicodeDecodeError):
        return (
            "The request body is not UTF-8: send the JSON encoded as UTF-8 (Shift_JIS, "
            "EUC-JP and other encodings are not read)."
        )
    return UNREADABLE_BODY


def crash_response(exc: Exception, path: str) -> Response:
    """The 500 for an exception nothing else answered; never echoes it (it may carry
    paths, internals or user text)."""
    log.error("unhandled %s", type(exc).__name__, exc_info=exc)
    error = ServiceError(ErrorKind.INTERNAL, "Internal server error.")
    return error_response(error, dialect=dialect_for(path))


def install_error_handlers(app: FastAPI) -> None:
    """The replies to what routes and FastAPI raise (the middleware answers the rest)."""

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> Response:
        return error_response(exc, dialect=request_dialect(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        # A route that chose the body's shape from the body says which route's it read.
        route = getattr(request.state, "read_as", request.url.path)
        message, param = validation_message(list(exc.errors()), route)
        error = ServiceError(ErrorKind.INVALID_REQUEST, message, param)
        return error_response(error, dialect=request_dialect(request))

    @app.exception_handler(ClientGone)
    async def _client_gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request: Request, exc: BodyTooLarge) -> Response:
        return error_response(too_large(exc.limit), dialect=request_dialect(request))

    @app.exception_handler(BodyRefused)
    async def _body_refused(request: Request, exc: BodyRefused) -> Response:
        return error_response(exc.error, dialect=request_dialect(request))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        path = excerpt(request.url.path, 80)
        kind = HTTP_KINDS.get(exc.status_code)
        if kind is ErrorKind.NOT_FOUND:
            unrouted = getattr(request.app.state, "unrouted", None)
            message = (
                unrouted.message(request.method, request.scope)
                if unrouted is not None
                else f"No route {request.method} {path}."
            )
        elif kind is ErrorKind.METHOD_NOT_ALLOWED:
            message = f"Method {request.method} is not allowed on {path}."
        elif exc.detail == FASTAPI_BODY_ERROR:
            if isinstance(exc.__cause__, ClientDisconnect):  # gone mid-body, as on fast routes
                return Response(status_code=CLIENT_CLOSED)
            kind, message = ErrorKind.INVALID_REQUEST, _unreadable(request, exc.__cause__)
        elif exc.status_code < 500:
            kind, message = kind or ErrorKind.INVALID_REQUEST, excerpt(str(exc.detail), 200)
        else:
            kind, message = ErrorKind.INTERNAL, "Internal server error."
        headers = dict(exc.headers or {})
        response = error_response(ServiceError(kind, message), headers, request_dialect(request))
        response.status_code = exc.status_code if exc.status_code >= 400 else 400
        return response
