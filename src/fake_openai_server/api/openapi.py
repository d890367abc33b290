"""The OpenAPI document: the error replies every route documents, and what FastAPI's
own document gets wrong about this server."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from fake_openai_server.api.schemas import ErrorResponse

# Documented for every route that takes a body.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in [
        (400, "Invalid request"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (413, "Request body too large"),
        (429, "Queue full: retry after the Retry-After header"),
        (500, "Model failure"),
        (503, "Model not ready"),
        (504, "Not answered within REQUEST_TIMEOUT"),
    ]
}

# Documented for the routes without a body that still need a key when keys are set.
KEY_RESPONSES: dict[int | str, dict[str, Any]] = {401: ERROR_RESPONSES[401]}


def document_truthfully(app: FastAPI, keys_required: bool, public_paths: frozenset[str]) -> None:
    """Drop the 422 FastAPI documents for every route with a body: this server answers
    400 in the OpenAI error envelope instead (``api/errors.py``). When API keys are set,
    document the bearer scheme, or Azure OpenAI's ``api-key`` header, on every route that
    needs one (all but ``public_paths``)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
                if keys_required and path not in public_paths:
                    operation["security"] = [{"apiKey": []}, {"azureApiKey": []}]
        if keys_required:
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["apiKey"] = {"type": "http", "scheme": "bearer"}
            schemes["azureApiKey"] = {"type": "apiKey", "in": "header", "name": "api-key"}
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
