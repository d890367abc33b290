"""Helpers shared by the routes of the other APIs (TEI, Ollama, Cohere)."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from fake_openai_server.api.openapi import ERROR_RESPONSES

M = TypeVar("M", bound=BaseModel)


def error_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The statuses of ``ERROR_RESPONSES``, documented with an API's own error body."""
    return {
        status: {"model": model, "description": doc["description"]}
        for status, doc in ERROR_RESPONSES.items()
    }


def validate(model: type[M], payload: Any) -> M:
    """Validate a body parsed by hand (routes that choose the shape from the body),
    failing the way FastAPI's own validation does, so the same handler words it."""
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_url=False)]
        ) from None
