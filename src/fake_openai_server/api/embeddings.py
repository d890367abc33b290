"""POST /v1/embeddings (and /embeddings): the OpenAI embeddings API.

The same route serves Voyage AI's client (it posts to ``{base_url}/embeddings`` with
``output_dtype``, ``output_dimension``, ``truncation``) and Jina's (``embedding_type``,
``task``, ``normalized``); Azure OpenAI's path (``/openai/deployments/{deployment}/
embeddings``) reaches it too.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from fake_openai_server.api.context import runtime
from fake_openai_server.api.hot import hot
from fake_openai_server.api.openapi import ERROR_RESPONSES
from fake_openai_server.api.quantized import as_type, embed_for
from fake_openai_server.api.schemas import EmbeddingsRequest, EmbeddingsResponse
from fake_openai_server.api.serialize import embeddings_body
from fake_openai_server.service.embeddings import normalize_input_type
from fake_openai_server.service.truncation import TruncateMode

router = APIRouter(tags=["embeddings"])


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingsResponse,
    responses=ERROR_RESPONSES,
    summary="Create embeddings (OpenAI-compatible)",
)
@router.post("/embeddings", include_in_schema=False)
@hot
async def create_embeddings(body: EmbeddingsRequest, request: Request) -> Response:
    service = runtime(request).require_embeddings()
    items = body.items()
    kind, encoding_format = body.output()
    truncate: TruncateMode | None = None
    if body.truncation is not None:
        truncate = "end" if body.truncation else "none"
    input_type = body.input_type
    if input_type is None and body.task is not None:  # Jina's name for it
        input_type = normalize_input_type(body.task, param="task")
    result, calibration = await embed_for(
        request,
        service.names.resolve(body.model),
        [kind],
        service.embed(
            items,
            model=body.model,
            input_type=input_type,
            dimensions=body.output_dimensions(),
            truncate=truncate,
            normalize=body.normalized,
        ),
    )
    vectors = result.vectors if kind == "float" else as_type(result, kind, calibration)
    model = body.model or service.names.default
    content = embeddings_body(vectors, encoding_format, model, result.prompt_tokens)
    return Response(content, media_type="application/json")


@router.post(
    "/openai/deployments/{deployment:path}/embeddings",
    response_model=EmbeddingsResponse,
    responses=ERROR_RESPONSES,
    summary="Create embeddings (Azure OpenAI-compatible: the deployment is the model)",
)
async def create_azure_embeddings(
    deployment: str, body: EmbeddingsRequest, request: Request
) -> Response:
    """Azure OpenAI's form of the same call (the openai SDK's ``AzureOpenAI``, LangChain's
    ``AzureOpenAIEmbeddings``): the deployment in the path names the model, whatever the
    body's ``model`` says, as on Azure; ``api-version`` is not looked at."""
    return await create_embeddings(body.model_copy(update={"model": deployment}), request)
