"""Ollama's API: POST /api/embed, the older POST /api/embeddings, GET /api/tags,
GET /api/ps, GET /api/version, POST /api/show, POST /api/pull, GET / (its "Ollama is
running"), and POST /api/rerank for Dify's Ollama provider.

Clients: the ollama Python/JS clients, Open WebUI's default embedding engine,
Dify's Ollama provider (``{"input": [...], "model", "truncate": true, "options"}`` to
/api/embed, reading ``embeddings``), LangChain's OllamaEmbeddings. Model names may
carry Ollama's ``:latest`` tag. Errors are Ollama's ``{"error": message}``.

As in Ollama, /api/embed returns L2-normalised vectors (cut to ``dimensions`` first)
and /api/embeddings the model's own; an empty ``input`` / ``prompt`` only checks that
the model exists and returns no vectors (clients use it to load a model).

/api/pull is for tools that pull a model before they use it (the ollama client's
``pull()``, Open WebUI's model manager, ``ollama pull``): a served model is already here,
and nothing else can be downloaded (see ``pull``).
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse, Response

from fake_openai_server.api.compat import error_responses
from fake_openai_server.api.compat_schemas import (
    OllamaEmbeddingsRequest,
    OllamaEmbeddingsResponse,
    OllamaEmbedRequest,
    OllamaEmbedResponse,
    OllamaError,
    OllamaProgress,
    OllamaPullRequest,
    OllamaRerankRequest,
    OllamaRerankResponse,
    OllamaRunning,
    OllamaShowRequest,
    OllamaShowResponse,
    OllamaTags,
    OllamaVersion,
)
from fake_openai_server.api.context import answer_in_time, runtime
from fake_openai_server.api.hot import hot
from fake_openai_server.api.openapi import KEY_RESPONSES
from fake_openai_server.api.serialize import json_body, json_response
from fake_openai_server.backends.base import ModelInfo
from fake_openai_server.errors import ErrorKind, ServiceError, excerpt
from fake_openai_server.families import family_for
from fake_openai_server.runtime import Runtime
from fake_openai_server.service.truncation import TruncateMode

# The Ollama API level these routes follow: /api/embed's dimensions came in 0.11.11
# (ollama/ollama#12242).
OLLAMA_VERSION = "0.11.11"
# When a loaded model would be unloaded (/api/ps): never, as Ollama's keep_alive -1.
NEVER = datetime(9999, 12, 31, tzinfo=UTC).isoformat()
# What Ollama's pull of a model its registry does not have ends in (server/images.go
# wraps the registry's 404). Its CLI looks for this text to tell that failure from
# others (cmd/cloud_suggest.go), so the refusal here starts with it.
PULL_NOT_FOUND = "pull model manifest: file does not exist"
# The progress lines of a pull that needs nothing: Ollama's first and last (it goes on
# to check and rewrite the model's files; there are none here to check).
PULLED = b"".join(
    json_body({"status": status}) + b"\n" for status in ("pulling manifest", "success")
)

TAGS: list[Any] = ["ollama"]
router = APIRouter(tags=TAGS)
embed_router = APIRouter(tags=TAGS)
rerank_router = APIRouter(tags=TAGS)

ERRORS = error_responses(OllamaError)
TEI_ERROR_SCHEMA = {"$ref": "#/components/schemas/TeiError"}
PROGRESS_SCHEMA = {"$ref": "#/components/schemas/OllamaProgress"}
KEY_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": OllamaError, "description": KEY_RESPONSES[401]["description"]}
}


def model_name(requested: str | None) -> str | None:
    """Ollama names carry a tag; ``name:latest`` is ``name``."""
    return requested.removesuffix(":latest") if requested else None


def _truncate(truncate: bool | None) -> TruncateMode | None:
    """Ollama's ``truncate``; None (absent) leaves it to the server's TRUNCATE."""
    return None if truncate is None else "end" if truncate else "none"


@embed_router.post(
    "/api/embed",
    response_model=OllamaEmbedResponse,
    responses=ERRORS,
    summary="Embed (Ollama)",
)
@hot
async def embed(body: OllamaEmbedRequest, request: Request) -> Response:
    started = time.perf_counter_ns()
    rt = runtime(request)
    service = rt.require_embeddings()
    name = service.names.resolve(model_name(body.model))
    # As Ollama: a cut only to fewer dimensions than the model has; any other value
    # (0, negative, the whole width or more) leaves the vectors whole.
    width = service.models[name].info.dimension or 0
    dimensions = body.dimensions if body.dimensions and 0 < body.dimensions < width else None
    if body.input in (None, "", []):  # only checks the model, as Ollama does
        vectors: list[Any] = []
        tokens = 0
    else:
        texts = [body.input] if isinstance(body.input, str) else body.input
        result = await answer_in_time(
            request,
            service.embed(
                texts,
                model=name,
                dimensions=dimensions,
                truncate=_truncate(body.truncate),
                normalize=True,
            ),
        )
        vectors, tokens = list(result.vectors), result.prompt_tokens
    return json_response(
        {
            "model": body.model or name,
            "embeddings": vectors,
            "total_duration": time.perf_counter_ns() - started,
            "load_duration": 0,
            "prompt_eval_count": tokens,
        }
    )


@embed_router.post(
    "/api/embeddings",
    response_model=OllamaEmbeddingsResponse,
    responses=ERRORS,
    summary="Embed one prompt (Ollama, deprecated by Ollama in favour of /api/embed)",
)
@hot
async def embeddings(body: OllamaEmbeddingsRequest, request: Request) -> Response:
    rt = runtime(request)
    service = rt.require_embeddings()
    name = service.names.resolve(model_name(body.model))
    if body.prompt == "":
        return json_response({"embedding": []})
    # The model's own vector, as Ollama's /api/embeddings gives it, whatever NORMALIZE says.
    embedding = service.embed(
        [body.prompt], model=name, normalize=False, param="prompt", indexed=False
    )
    result = await answer_in_time(request, embedding)
    return json_response({"embedding": result.vectors[0]})


@rerank_router.post(
    "/api/rerank",
    response_model=OllamaRerankResponse,
    responses=ERRORS,
    summary="Rerank (the shape Dify's Ollama provider sends; not in Ollama itself)",
)
@hot
async def rerank(body: OllamaRerankRequest, request: Request) -> Response:
    rt = runtime(request)
    service = rt.require_rerank()
    result = await answer_in_time(
        request,
        service.rerank(body.query, body.documents, model=model_name(body.model), top_n=body.top_n),
    )
    return json_response(
        {
            "model": body.model or service.names.default,
            "results": [{"index": r.index, "relevance_score": r.score} for r in result.ranked],
        }
    )


def _served(rt: Runtime) -> list[tuple[str, ModelInfo, bool]]:
    """(name, info, is an embedding model) for each served model."""
    found = []
    for service, embeds in ((rt.embeddings, True), (rt.rerank, False)):
        if service is not None:
            found += [(name, rt.models[name], embeds) for name in service.names.model_ids]
    return found


def _architecture(name: str, embeds: bool) -> str:
    family = family_for(name).name
    if family == "ruri":
        return "bert"
    if family == "ruri-v3" or (not embeds and "ruri-v3" in name):
        return "modernbert"
    return "transformer"


def _details(name: str, info: ModelInfo, embeds: bool) -> dict[str, Any]:
    architecture = _architecture(name, embeds)
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": architecture,
        "families": [architecture],
        "parameter_size": "",
        "quantization_level": info.dtype.upper(),
    }


def _modified_at(request: Request) -> str:
    return datetime.fromtimestamp(request.app.state.started, UTC).isoformat()


def _listed(name: str, info: ModelInfo, embeds: bool) -> dict[str, Any]:
    """A served model as /api/tags and /api/ps list it (its size unknown: 0)."""
    return {
        "name": f"{name}:latest",
        "model": f"{name}:latest",
        "size": 0,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": _details(name, info, embeds),
    }


@router.get("/api/tags", response_model=OllamaTags, responses=KEY_ERRORS, summary="Models (Ollama)")
async def tags(request: Request) -> Response:
    rt = runtime(request)
    rt.require_ready()
    modified_at = _modified_at(request)
    models = [
        {**_listed(name, info, embeds), "modified_at": modified_at}
        for name, info, embeds in _served(rt)
    ]
    return json_response({"models": models})


@router.get(
    "/api/ps",
    response_model=OllamaRunning,
    responses=KEY_ERRORS,
    summary="Models loaded (Ollama)",
)
async def running(request: Request) -> Response:
    """Every served model, as loaded: they stay in memory while the server runs (tools
    check here that a model is ready before they call it)."""
    rt = runtime(request)
    rt.require_ready()
    models = [
        {
            **_listed(name, info, embeds),
            "expires_at": NEVER,
            "size_vram": 0,
            "context_length": info.max_length,
        }
        for name, info, embeds in _served(rt)
    ]
    return json_response({"models": models})


@router.get(
    "/",
    response_class=PlainTextResponse,
    # The root's errors are TEI's, whose POST / shares the path (api/errors.py): JSON,
    # where the route's own reply is text.
    responses={
        401: {
            "description": KEY_RESPONSES[401]["description"],
            "content": {"application/json": {"schema": TEI_ERROR_SCHEMA}},
        }
    },
    summary="Ollama's liveness text",
)
async def ollama_is_running() -> PlainTextResponse:
    """What Ollama answers at its root (its CLI and some extensions probe it, HEAD or GET)."""
    return PlainTextResponse("Ollama is running")


@router.get(
    "/api/version",
    response_model=OllamaVersion,
    responses=KEY_ERRORS,
    summary="The Ollama API version these routes follow",
)
async def version() -> Response:
    return json_response({"version": OLLAMA_VERSION})


@router.post(
    "/api/show", response_model=OllamaShowResponse, responses=ERRORS, summary="A model (Ollama)"
)
async def show(body: OllamaShowRequest, request: Request) -> Response:
    rt = runtime(request)
    rt.require_ready()
    served = {name: (info, embeds) for name, info, embeds in _served(rt)}
    requested = model_name(body.model or body.name)
    name = rt.resolve_any(requested) if requested else next(iter(served))  # absent: the first
    info, embeds = served[name]
    architecture = _architecture(name, embeds)
    model_info: dict[str, Any] = {
        "general.architecture": architecture,
        "general.basename": name,
        f"{architecture}.context_length": info.max_length,
    }
    if info.dimension is not None:
        model_info[f"{architecture}.embedding_length"] = info.dimension
    return json_response(
        {
            "modelfile": f"# served by fake-openai-server\nFROM {name}\n",
            "parameters": f"num_ctx {info.max_length}",
            "template": "",
            "details": _details(name, info, embeds),
            "model_info": model_info,
            "capabilities": ["embedding"] if embeds else [],
            "modified_at": _modified_at(request),
        }
    )


@router.post(
    "/api/pull",
    response_model=OllamaProgress,
    responses={
        **ERRORS,
        200: {
            "description": "The model is served: NDJSON progress lines ending in "
            '{"status": "success"}, or (stream false) that line alone',
            "content": {"application/x-ndjson": {"schema": PROGRESS_SCHEMA}},
        },
    },
    summary="Pull a model (Ollama): a served one is already here",
)
async def pull(body: OllamaPullRequest, request: Request) -> Response:
    """Ollama's pull, for the models served: there is nothing to download, so it
    succeeds at once, ``{"status": "success"}`` alone with stream false, else NDJSON
    lines beginning with ``pulling manifest`` as Ollama's do. No other model can be
    downloaded: a 404, its message beginning as Ollama's for a model its registry lacks.
    (Ollama gives that failure as a 500 with stream false and as an error line in a 200
    stream; here it is a 404 before any line, as an unknown model is on every API.)"""
    rt = runtime(request)
    rt.require_ready()
    requested = model_name(body.model or body.name)
    if not requested:  # Ollama's words; /api/show alone takes an absent model as the first
        raise ServiceError(
            ErrorKind.INVALID_REQUEST,
            "invalid model name: say which model to pull ('model'). "
            f"Served models: {', '.join(rt.model_names())}.",
            param="model",
        )
    try:
        rt.resolve_any(requested)
    except ServiceError:
        raise ServiceError(
            ErrorKind.MODEL_NOT_FOUND,
            f"{PULL_NOT_FOUND}: '{excerpt(requested, 80)}' is not a model this server "
            "serves, and it cannot download models. "
            f"Served models: {', '.join(rt.model_names())}.",
            param="model",
        ) from None
    if body.stream is False:
        return json_response({"status": "success"})
    return Response(PULLED, media_type="application/x-ndjson")
