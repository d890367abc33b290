"""text-embeddings-inference's API: POST /embed, /similarity, /rerank (with ``texts``),
/tokenize, /decode, POST / and its SageMaker twin POST /invocations (GET /ping, their
health check, is /ready: api/system.py); its /info fields are merged into ours
(``tei_info``).

Clients: huggingface_hub's ``InferenceClient`` (``feature_extraction`` posts
``{"inputs", "normalize", "prompt_name", "truncate", "truncation_direction"}`` to the
URL it was given: the bare server URL means POST /), LangChain's
``HuggingFaceEndpointEmbeddings`` (the same client), Dify's TEI provider (GET /info,
POST /v1/embeddings, POST /rerank with ``{"query", "texts", "return_text": true}``),
RAGFlow and Haystack. Errors are TEI's ``{"error", "error_type"}``.
"""

from __future__ import annotations

import asyncio
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from starlette.responses import Response

from fake_openai_server.api import rerank
from fake_openai_server.api.compat import error_responses, validate
from fake_openai_server.api.compat_schemas import (
    TeiDecodeRequest,
    TeiEmbedRequest,
    TeiError,
    TeiRerankRequest,
    TeiSimilarityRequest,
    TeiTextOptions,
    TeiToken,
    TeiTokenizeRequest,
)
from fake_openai_server.api.context import answer_in_time, runtime
from fake_openai_server.api.hot import hot
from fake_openai_server.api.schemas import RerankRequest
from fake_openai_server.api.serialize import json_body, json_response
from fake_openai_server.errors import ErrorKind, ServiceError, excerpt
from fake_openai_server.families import INPUT_TYPE_ALIASES, family_for
from fake_openai_server.runtime import Runtime
from fake_openai_server.service.common import check_texts
from fake_openai_server.service.truncation import TruncateMode

TAGS: list[str | Enum] = ["text-embeddings-inference"]
router = APIRouter(tags=TAGS)  # on every server
embed_router = APIRouter(tags=TAGS)  # where embeddings are served
rerank_router = APIRouter(tags=TAGS)  # where a reranker is served

ERRORS = error_responses(TeiError)


def truncation(
    truncate: bool | None, direction: str, server_truncates: bool
) -> TruncateMode | None:
    """TEI's ``truncate`` (absent: the server's TRUNCATE, TEI's ``--auto-truncate``)
    and ``truncation_direction`` as the service's mode; None where the server's
    TRUNCATE=false decides (its refusals then name the setting)."""
    if truncate is False:
        return "none"
    if truncate is None and not server_truncates:
        return None
    return "start" if direction.lower() == "left" else "end"


def prompt_input_type(prompt_name: str | None) -> str | None:
    """TEI's ``prompt_name`` names a sentence-transformers prompt; ruri defines none, so
    the names of the input types (query, document, passage...) choose its prefixes."""
    if prompt_name is None or prompt_name.lower() in INPUT_TYPE_ALIASES:
        return prompt_name
    allowed = ", ".join(sorted(INPUT_TYPE_ALIASES))
    raise ServiceError(
        ErrorKind.INVALID_REQUEST,
        f"prompt_name must be one of: {allowed} (it selects the model's prefix).",
        param="prompt_name",
    )


@embed_router.post(
    "/embed",
    response_model=list[list[float]],
    responses=ERRORS,
    summary="Embed (text-embeddings-inference)",
)
@hot
async def embed(body: TeiEmbedRequest, request: Request) -> Response:
    rt = runtime(request)
    service = rt.require_embeddings()
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    result = await answer_in_time(
        request,
        service.embed(
            texts,
            model=body.model,
            input_type=prompt_input_type(body.prompt_name),
            dimensions=body.dimensions,
            truncate=truncation(body.truncate, body.truncation_direction, rt.settings.truncate),
            normalize=body.normalize,
            param="inputs",
        ),
    )
    return json_response(list(result.vectors))


async def tei_rerank(body: TeiRerankRequest, request: Request) -> Response:
    rt = runtime(request)
    service = rt.require_rerank()
    if body.truncation_direction.lower() == "left":
        raise ServiceError(
            ErrorKind.INVALID_REQUEST,
            "truncation_direction 'left' is not supported by /rerank: an over-long pair "
            "is cut at the end of the text.",
            param="truncation_direction",
        )
    result = await answer_in_time(
        request,
        service.rerank(
            body.query,
            body.texts,
            model=body.model,
            raw_scores=body.raw_scores,
            truncate=body.truncate,  # absent: the server's TRUNCATE
            documents_param="texts",
        ),
    )
    ranks: list[dict[str, Any]] = []
    for ranked in result.ranked:
        rank: dict[str, Any] = {"index": ranked.index, "score": ranked.score}
        if body.return_text:
            rank["text"] = body.texts[ranked.index]
        ranks.append(rank)
    return json_response(ranks)


def _is_tei_rerank(payload: Any) -> bool:
    return isinstance(payload, dict) and "texts" in payload and "documents" not in payload


@rerank_router.post("/rerank", include_in_schema=False)
async def rerank_either(request: Request, payload: Annotated[Any, Body()] = None) -> Response:
    """TEI's body (``texts``) gets TEI's reply; any other is the Cohere/Jina rerank."""
    if _is_tei_rerank(payload):
        request.state.error_dialect = "tei"
        return await tei_rerank(validate(TeiRerankRequest, payload), request)
    return await rerank.rerank_v1(validate(RerankRequest, payload), request)


@embed_router.post(
    "/similarity",
    response_model=list[float],
    responses=ERRORS,
    summary="Cosine similarity of sentences to a source sentence (text-embeddings-inference)",
)
async def similarity(body: TeiSimilarityRequest, request: Request) -> Response:
    """huggingface_hub's ``sentence_similarity``: each sentence's cosine similarity to
    the source sentence, in the sentences' order (TEI embeds them all in one batch)."""
    rt = runtime(request)
    service = rt.require_embeddings()
    source, sentences = body.inputs.source_sentence, body.inputs.sentences
    if not sentences:
        raise ServiceError(
            ErrorKind.INVALID_REQUEST,
            "inputs.sentences must not be an empty list.",
            param="inputs.sentences",
        )
    # Named as sent: the service sees one list, the source sentence first.
    if len(sentences) + 1 > rt.settings.max_inputs:
        raise ServiceError(
            ErrorKind.INVALID_REQUEST,
            f"inputs.sentences has {len(sentences)} items; with inputs.source_sentence that "
            f"is {len(sentences) + 1}, over the limit MAX_INPUTS={rt.settings.max_inputs}.",
            param="inputs.sentences",
        )
    max_chars = rt.settings.max_input_chars
    check_texts([source], "inputs.source_sentence", max_chars, indexed=False)
    check_texts(sentences, "inputs.sentences", max_chars)
    parameters = body.parameters or TeiTextOptions()
    result = await answer_in_time(
        request,
        service.embed(
            [source, *sentences],
            model=body.model,
            input_type=prompt_input_type(parameters.prompt_name),
            truncate=truncation(
                parameters.truncate, parameters.truncation_direction, rt.settings.truncate
            ),
            normalize=True,
            param="inputs",
        ),
    )
    vectors = result.vectors
    return json_response((vectors[1:] @ vectors[0]).tolist())


def _is_similarity(payload: Any) -> bool:
    return isinstance(payload, dict) and isinstance(payload.get("inputs"), dict)


def _refuse_the_other_services_body(request: Request, payload: Any) -> None:
    """POST / is a reranker's rerank and an embedder's embed, as on TEI: the other's body
    (an embedding client given the reranker's URL, or the other way round) is told where
    to go, not that a field of this service's body is missing."""
    if not isinstance(payload, dict):
        return
    settings = runtime(request).settings
    embed_body = "inputs" in payload and "query" not in payload and "texts" not in payload
    rerank_body = _is_tei_rerank(payload) and "inputs" not in payload
    if (embed_body and not settings.serves_embeddings) or (
        rerank_body and not settings.serves_rerank
    ):
        what = "an embedding request (inputs)" if embed_body else "a rerank request (texts)"
        elsewhere = request.app.state.unrouted.elsewhere
        raise ServiceError(
            ErrorKind.INVALID_REQUEST,
            f"POST {excerpt(request.url.path, 40)} got {what}, but {elsewhere}",
            param="inputs" if embed_body else "texts",
        )


@router.post("/", include_in_schema=False)
@router.post("/invocations", include_in_schema=False)  # SageMaker's name for it
async def root(request: Request, payload: Annotated[Any, Body()] = None) -> Response:
    """TEI answers POST / with the model's task: embed, or rerank for a reranker.
    A sentence-similarity body (``inputs`` an object) gets /similarity's answer, which
    TEI gives at / when started with TASK=sentence-similarity."""
    settings = runtime(request).settings
    _refuse_the_other_services_body(request, payload)
    if not settings.serves_embeddings or (settings.serves_rerank and _is_tei_rerank(payload)):
        return await tei_rerank(validate(TeiRerankRequest, payload), request)
    if _is_similarity(payload):
        request.state.read_as = "/similarity"
        return await similarity(validate(TeiSimilarityRequest, payload), request)
    return await embed(validate(TeiEmbedRequest, payload), request)


@router.post(
    "/tokenize",
    response_model=list[list[TeiToken]],
    responses=ERRORS,
    summary="Tokenize with the model's tokenizer (text-embeddings-inference)",
)
async def tokenize(body: TeiTokenizeRequest, request: Request) -> Response:
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    tokenizing = (
        runtime(request)
        .require_tokens()
        .tokenize(
            texts,
            model=body.model,
            prompt_name=prompt_input_type(body.prompt_name),
            add_special_tokens=body.add_special_tokens,
        )
    )
    result = await answer_in_time(request, tokenizing)
    # Up to MAX_REQUEST_TOKENS objects: built and serialized off the event loop.
    content = await asyncio.to_thread(
        lambda: json_body([[token.__dict__ for token in row] for row in result])
    )
    return Response(content, media_type="application/json")


@router.post(
    "/decode",
    response_model=list[str],
    responses=ERRORS,
    summary="Decode token ids (text-embeddings-inference)",
)
async def decode(body: TeiDecodeRequest, request: Request) -> Response:
    rows = [body.ids] if body.ids and isinstance(body.ids[0], int) else body.ids
    decoding = (
        runtime(request)
        .require_tokens()
        .decode(
            rows,  # type: ignore[arg-type]
            model=body.model,
            skip_special_tokens=body.skip_special_tokens,
        )
    )
    return json_response(await answer_in_time(request, decoding))


def tei_info(rt: Runtime) -> dict[str, Any]:
    """TEI's /info fields (Dify's TEI provider reads ``model_type``, ``max_input_length``
    and ``max_client_batch_size``). ``model_type`` has one key per served kind, the
    embedding model first: Dify looks only at the first key."""
    s = rt.settings
    model_type: dict[str, Any] = {}
    first = None
    if rt.embeddings is not None:
        first = rt.embeddings.names.default
        ruri = family_for(first).name in ("ruri", "ruri-v3")
        model_type["embedding"] = {"pooling": "mean" if ruri else None}
    if rt.rerank is not None:
        first = first or rt.rerank.names.default
        model_type["reranker"] = {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    info = rt.models.get(first) if first else None
    return {
        "model_id": first,
        "model_sha": info.revision if info else None,
        "model_dtype": info.dtype if info else None,
        "served_model_name": first,
        "model_type": model_type,
        "max_input_length": info.max_length if info else None,
        "max_batch_tokens": s.max_batch_tokens,
        "max_batch_requests": s.max_batch_size,
        "max_client_batch_size": s.max_inputs,
        "auto_truncate": s.truncate,
        # Tokenizing at once: the tokenizer processes, or the threads where there are none
        "tokenization_workers": rt.tokenizers.parallel(),
    }
