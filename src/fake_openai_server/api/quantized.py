"""Quantized replies (int8, uint8, binary, ubinary) and the published int8/uint8 scale."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from starlette.responses import Response

from fake_openai_server.api.context import answer_in_time
from fake_openai_server.api.openapi import KEY_RESPONSES
from fake_openai_server.api.serialize import json_response
from fake_openai_server.backends.base import FloatArray
from fake_openai_server.service.embeddings import EmbeddingResult
from fake_openai_server.service.quantize import CALIBRATED, Calibrations, Scale, quantize

T = TypeVar("T")

router = APIRouter(tags=["operations"])


def calibrations(request: Request) -> Calibrations:
    found: Calibrations = request.app.state.calibrations
    return found


async def embed_for(
    request: Request, model: str, kinds: Iterable[str], embedding: Awaitable[EmbeddingResult]
) -> tuple[EmbeddingResult, Scale | None]:
    """The request's ``embedding`` of ``model``, and the scale its embedding types
    (``kinds``) need: int8 and uint8 need the model's calibrated scale.

    Until it is ready (on a CPU, with ``WARMUP=false``, or a request soon after start-up)
    the request waits for the calibration beside its own embedding, both within one
    REQUEST_TIMEOUT (504) and no longer than its client stays (it had waited a
    REQUEST_TIMEOUT for each).
    """
    if not CALIBRATED.intersection(kinds):
        return await answer_in_time(request, embedding), None
    found = calibrations(request)
    scale = found.ready(model)
    if scale is not None:
        return await answer_in_time(request, embedding), scale

    async def both() -> tuple[EmbeddingResult, Scale]:
        async with asyncio.TaskGroup() as group:  # one failing cancels the other
            embedded = group.create_task(_awaited(embedding))
            scaled = group.create_task(found.scale(model))
        return embedded.result(), scaled.result()

    try:
        return await answer_in_time(request, both())
    except BaseExceptionGroup as failed:  # the first error, as the request would raise it
        raise failed.exceptions[0] from None


async def _awaited(work: Awaitable[T]) -> T:
    return await work


def as_type(vectors: FloatArray, kind: str, scale: Scale | None) -> Any:
    """``vectors`` as embedding type ``kind`` (a numpy array); int8/uint8 with ``scale``
    (from ``embed_for``)."""
    return quantize(vectors, kind, scale)


@router.get(
    "/info/quantization",
    responses=KEY_RESPONSES,
    summary="The calibrated scale behind int8 and uint8 embeddings",
)
async def quantization_scale(request: Request) -> Response:
    return json_response(calibrations(request).published())
