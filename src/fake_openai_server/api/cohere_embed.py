"""Cohere's embed API: POST /v1/embed and POST /v2/embed.

Clients: the cohere SDK (``Client.embed`` posts ``v1/embed``, ``ClientV2.embed``
``v2/embed``, both relative to the base URL, so ``base_url="http://host:port"``),
LangChain's CohereEmbeddings, n8n. ``input_type`` picks the ruri prefix
(search_query → query, search_document → document, classification, clustering);
``truncate`` is END (cut the end), START (cut the start, keeping the prefix) or NONE
(400 for an over-long input); absent, the server's TRUNCATE decides, as everywhere.

Replies: v1 without ``embedding_types`` is ``response_type: "embeddings_floats"`` with
a list of float vectors; otherwise (and always on v2) ``"embeddings_by_type"`` with one
list per requested type. Errors are Cohere's ``{"id", "message"}``.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from fake_openai_server.api.compat import error_responses
from fake_openai_server.api.compat_schemas import (
    CohereEmbedRequest,
    CohereEmbedResponse,
    CohereError,
)
from fake_openai_server.api.context import runtime
from fake_openai_server.api.hot import hot
from fake_openai_server.api.quantized import as_type, embed_for
from fake_openai_server.api.serialize import base64_rows, json_response
from fake_openai_server.errors import ErrorKind, ServiceError
from fake_openai_server.service.truncation import TruncateMode

router = APIRouter(tags=["cohere"])
ERRORS = error_responses(CohereError)

TRUNCATE: dict[str, TruncateMode] = {"END": "end", "START": "start", "NONE": "none"}


def _invalid(message: str, param: str) -> ServiceError:
    return ServiceError(ErrorKind.INVALID_REQUEST, message, param=param)


def texts_of(body: CohereEmbedRequest) -> list[str]:
    """``texts``, or v2's ``inputs`` with the text parts of each joined by a newline."""
    if body.texts is not None and body.inputs is not None:
        raise _invalid("Send either texts or inputs, not both.", "texts")
    if body.texts is not None:
        return list(body.texts)
    if body.inputs is None:
        raise _invalid("'texts' (or v2's 'inputs') is required: a list of strings.", "texts")
    texts = []
    for index, item in enumerate(body.inputs):
        parts = []
        for part in item.content:
            if part.type != "text" or part.text is None:
                raise _invalid(
                    f"inputs[{index}] has a part of type '{part.type[:40]}' without text: "
                    "this server embeds text only.",
                    "inputs",
                )
            parts.append(part.text)
        texts.append("\n".join(parts))
    return texts


async def _embed(body: CohereEmbedRequest, request: Request, api_version: str) -> Response:
    rt = runtime(request)
    service = rt.require_embeddings()
    name = service.names.resolve(body.model)
    texts = texts_of(body)
    max_length = service.models[name].info.max_length
    if body.max_tokens is not None and body.max_tokens < max_length:
        raise _invalid(
            f"max_tokens below this model's maximum ({max_length}) is not supported; leave it out.",
            "max_tokens",
        )
    result, calibration = await embed_for(
        request,
        name,
        body.embedding_types or [],
        service.embed(
            texts,
            model=name,
            input_type=body.input_type,
            dimensions=body.output_dimension,
            truncate=TRUNCATE[body.truncate] if body.truncate else None,
            param="texts" if body.texts is not None else "inputs",
        ),
    )
    vectors = result.vectors
    embeddings: Any
    if api_version == "1" and body.embedding_types is None:
        response_type, embeddings = "embeddings_floats", list(vectors)
    else:
        response_type, embeddings = "embeddings_by_type", {}
        for kind in dict.fromkeys(body.embedding_types or ["float"]):
            if kind == "base64":
                embeddings[kind] = base64_rows(vectors)
            else:
                embeddings[kind] = list(as_type(result, kind, calibration))
    payload = {
        "id": str(uuid.uuid4()),
        "response_type": response_type,
        "embeddings": embeddings,
        "texts": texts,
        "meta": {
            "api_version": {"version": api_version},
            "billed_units": {"input_tokens": result.prompt_tokens},
        },
    }
    return json_response(payload)


@router.post(
    "/v1/embed",
    response_model=CohereEmbedResponse,
    responses=ERRORS,
    summary="Embed (Cohere v1)",
)
@hot
async def embed_v1(body: CohereEmbedRequest, request: Request) -> Response:
    return await _embed(body, request, "1")


@router.post(
    "/v2/embed",
    response_model=CohereEmbedResponse,
    responses=ERRORS,
    summary="Embed (Cohere v2)",
)
@hot
async def embed_v2(body: CohereEmbedRequest, request: Request) -> Response:
    return await _embed(body, request, "2")
