"""The closed set of failures the server reports, independent of HTTP.

The service and engine raise :class:`ServiceError`; the API layer maps each
kind to a status code and the OpenAI error envelope in one table
(``api/errors.py``).
"""

from __future__ import annotations

from enum import Enum


class ErrorKind(Enum):
    INVALID_REQUEST = "invalid_request"
    MODEL_NOT_FOUND = "model_not_found"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    OVERLOADED = "overloaded"
    NOT_READY = "not_ready"
    MODEL_FAILURE = "model_failure"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class ServiceError(Exception):
    """A failure with a message written for the API's user."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param


def excerpt(text: str, limit: int = 40) -> str:
    """A short, safe excerpt of user input for an error message (a lone surrogate, which
    no reply can carry, is written as its escape)."""
    short = text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"
    return short.encode("utf-8", "backslashreplace").decode("utf-8")
