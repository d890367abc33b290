"""Public probes (/health, /ready and its SageMaker name /ping) and operator routes
(/v1/models, /info, /metrics)."""

from __future__ import annotations

from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse, Response

from fake_openai_server.api.context import runtime
from fake_openai_server.api.openapi import ERROR_RESPONSES, KEY_RESPONSES
from fake_openai_server.api.schemas import Health, ModelDetail, ModelList, Readiness
from fake_openai_server.api.serialize import json_body, json_response
from fake_openai_server.api.tei import tei_info
from fake_openai_server.metrics import CONTENT_TYPE

router = APIRouter()


def package_version() -> str:
    try:
        return version("fake-openai-server")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


@router.get("/health", response_model=Health, tags=["probes"], summary="The process is alive")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=Readiness,
    tags=["probes"],
    summary="200 once the model is loaded and warmed and while its batches run; 503 otherwise",
    responses={
        503: {"model": Readiness, "description": "Loading, restarting, failed, failing or stopping"}
    },
)
@router.get("/ping", include_in_schema=False)  # SageMaker's and TEI's: traffic once 200
async def ready(request: Request) -> Response:
    status, detail = runtime(request).readiness()
    body: dict[str, Any] = {"status": status}
    if detail is not None:
        body["detail"] = detail
    return Response(
        json_body(body),
        status_code=200 if status == "ready" else 503,
        media_type="application/json",
    )


@router.get(
    "/v1/models",
    response_model=ModelList,
    responses=KEY_RESPONSES,
    tags=["models"],
    summary="Served models",
)
@router.get("/models", include_in_schema=False)
async def list_models(request: Request) -> Response:
    created = request.app.state.started
    data = [_model_card(name, created) for name in runtime(request).model_names()]
    return json_response({"object": "list", "data": data})


@router.get(
    "/v1/models/{model:path}",
    response_model=ModelDetail,
    responses=ERROR_RESPONSES,
    tags=["models"],
    summary="One served model (the openai SDK's models.retrieve)",
)
@router.get("/models/{model:path}", include_in_schema=False)
async def retrieve_model(model: str, request: Request) -> Response:
    """A model id may hold a slash (``cl-nagoya/ruri-large``): the rest of the path is it.
    Any name a request's ``model`` may give is found (``ruri-large`` too).

    Besides OpenAI's fields, Xinference's ``model_type``, ``model_ability`` and
    ``context_length``: Dify's Xinference provider reads this route (with a short name:
    its model uid may not hold a slash) and adds only a model whose type it knows.
    """
    rt = runtime(request)
    name = rt.resolve_any(model)
    embeds = rt.embeddings is not None and name in rt.embeddings.names.model_ids
    kind, ability = ("embedding", "embed") if embeds else ("rerank", "rerank")
    card = _model_card(model, request.app.state.started)
    card.update(model_type=kind, model_ability=[ability], context_length=rt.models[name].max_length)
    return json_response(card)


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "fake-openai-server"}


@router.get(
    "/info",
    responses=KEY_RESPONSES,
    tags=["operations"],
    summary="Models, precision, limits and engine stats",
)
async def info(request: Request) -> Response:
    rt = runtime(request)
    s = rt.settings
    # TEI's fields first (Dify's TEI provider reads model_type, max_input_length and
    # max_client_batch_size); where a name is in both, ours wins: only "version", which
    # is this server's version in both.
    body = {
        **tei_info(rt),
        "version": package_version(),
        "service_type": s.service_type,
        "state": rt.readiness()[0],
        "models": {
            name: {
                "revision": m.revision,
                "max_length": m.max_length,
                "dimension": m.dimension,
                "device": m.device,
                "dtype": m.dtype,
                "dtype_reason": m.precision_reason,
                "cuda_graphs": m.cuda_graphs,
                "cpu_threads": m.cpu_threads,
                "tokenizer": rt.tokenizer_kinds.get(name, ""),
            }
            for name, m in rt.models.items()
        },
        "limits": asdict(rt.limits),
        "engine": rt.stats(),
    }
    if s.serves_embeddings:
        body["quantization"] = request.app.state.calibrations.summary()
    return json_response(body)


@router.get(
    "/metrics",
    tags=["operations"],
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        # Spelled out: with a plain-text route, a "model" would be documented as text/plain.
        401: {
            "description": KEY_RESPONSES[401]["description"],
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
            },
        },
    },
)
async def metrics(request: Request) -> Response:
    return Response(runtime(request).metrics.render(), media_type=CONTENT_TYPE)
