"""Rerank at every path clients use: /v1/rerank, /rerank, /v2/rerank, /v1/v1/rerank.

/rerank is routed by ``api/tei.py``: a body with TEI's ``texts`` gets TEI's reply,
any other comes here.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from fake_openai_server.api.context import answer_in_time, runtime
from fake_openai_server.api.hot import hot
from fake_openai_server.api.openapi import ERROR_RESPONSES
from fake_openai_server.api.schemas import DocumentObject, RerankRequest, RerankResponse
from fake_openai_server.api.serialize import json_response
from fake_openai_server.errors import ErrorKind, ServiceError

router = APIRouter(tags=["rerank"])


def echo(doc: str | DocumentObject) -> dict[str, Any]:
    """A document as Cohere and Jina send it back: an object, with every field it came with
    (nulls included)."""
    return {"text": doc} if isinstance(doc, str) else doc.model_dump(exclude_unset=True)


def check_echoable(documents: Sequence[str | DocumentObject]) -> None:
    """Object documents come back whole, with every field the client gave them: refuse
    (before the model runs) one that a JSON reply cannot carry."""
    for index, doc in enumerate(documents):
        if isinstance(doc, str) or not doc.model_extra:
            continue
        try:
            # As deep as the reply holds it: {"results": [{"document": {...}}]}.
            orjson.dumps({"results": [{"document": doc.model_extra}]})
        except orjson.JSONEncodeError:
            raise ServiceError(
                ErrorKind.INVALID_REQUEST,
                f"documents[{index}] has a field that cannot be sent back in the reply (an "
                "integer beyond 64 bits, or nesting over 250 levels deep); remove it, or "
                "send 'return_documents': false.",
                param="documents",
            ) from None


async def _rerank(body: RerankRequest, request: Request, api_version: str) -> Response:
    service = runtime(request).require_rerank()
    texts = body.texts()
    # Voyage's name for top_n, when only it is given (errors then name it as sent).
    top_n, top_n_param = (body.top_k, "top_k") if body.top_n is None else (body.top_n, "top_n")
    return_documents = body.return_documents
    if return_documents is None:
        return_documents = api_version == "1" and not body.voyage
    if return_documents:
        check_echoable(body.documents)
    result = await answer_in_time(
        request,
        service.rerank(
            body.query,
            texts,
            model=body.model,
            top_n=top_n,
            raw_scores=body.raw_scores,
            truncate=body.truncation,
            document_tokens=body.max_tokens_per_doc,
            top_n_param=top_n_param,
        ),
    )
    results: list[dict[str, Any]] = []
    voyage: list[dict[str, Any]] = []  # the same, with Voyage's documents (strings as sent)
    for ranked in result.ranked:
        item: dict[str, Any] = {"index": ranked.index, "relevance_score": ranked.score}
        as_voyage = item
        if return_documents:
            doc = body.documents[ranked.index]
            item["document"] = echo(doc)
            if isinstance(doc, str):
                as_voyage = {**item, "document": doc}
        results.append(item)
        voyage.append(as_voyage)
    payload = {
        "id": str(uuid.uuid4()),
        "model": body.model or service.names.default,
        "results": results,
        "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
        "meta": {
            "api_version": {"version": api_version},
            "billed_units": {"search_units": 1},
            "tokens": {"input_tokens": result.tokens, "output_tokens": 0},
        },
    }
    if body.voyage:
        payload["results"] = voyage  # a Voyage request: its form throughout
    if api_version == "1":
        # Voyage's reply on Cohere v1's and Jina's path: Voyage clients that send no top_k
        # (LiteLLM's voyage provider without top_n, Continue's Voyage reranker) read data
        # (index, relevance_score, document), as the voyageai client does.
        payload.update({"object": "list", "data": voyage})
    return json_response(payload)


@router.post(
    "/v1/rerank",
    response_model=RerankResponse,
    responses=ERROR_RESPONSES,
    summary="Rerank documents (Cohere v1 / Jina compatible)",
)
@router.post("/v1/v1/rerank", include_in_schema=False)
@hot
async def rerank_v1(body: RerankRequest, request: Request) -> Response:
    return await _rerank(body, request, "1")


@router.post(
    "/v2/rerank",
    response_model=RerankResponse,
    responses=ERROR_RESPONSES,
    summary="Rerank documents (Cohere v2 compatible)",
)
@hot
async def rerank_v2(body: RerankRequest, request: Request) -> Response:
    return await _rerank(body, request, "2")
