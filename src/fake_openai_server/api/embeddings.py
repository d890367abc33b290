"""POST /v1/embeddings (and /embeddings): the OpenAI embeddings API."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from fake_openai_server.api.deps import answer_in_time, runtime
from fake_openai_server.api.errors import ERROR_RESPONSES
from fake_openai_server.api.schemas import EmbeddingsRequest, EmbeddingsResponse
from fake_openai_server.api.serialize import embeddings_body
from fake_openai_server.errors import ErrorKind, ServiceError

router = APIRouter(tags=["embeddings"])


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingsResponse,
    responses=ERROR_RESPONSES,
    summary="Create embeddings (OpenAI-compatible)",
)
@router.post("/embeddings", include_in_schema=False)
async def create_embeddings(body: EmbeddingsRequest, request: Request) -> Response:
    service = runtime(request).require_embeddings()
    items = body.items()
    if not items:
        raise ServiceError(
            ErrorKind.INVALID_REQUEST, "input must not be an empty list.", param="input"
        )
    result = await answer_in_time(
        request,
        service.embed(
            items, model=body.model, input_type=body.input_type, dimensions=body.dimensions
        ),
    )
    model = body.model or service.names.default
    content = embeddings_body(result.vectors, body.encoding_format, model, result.prompt_tokens)
    return Response(content, media_type="application/json")
