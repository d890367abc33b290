"""Quantized replies (int8, uint8, binary, ubinary) and the published int8/uint8 scale."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from fake_openai_server.api.context import answer_in_time
from fake_openai_server.api.openapi import ERROR_RESPONSES, KEY_RESPONSES
from fake_openai_server.api.serialize import json_response
from fake_openai_server.service.embeddings import EmbeddingResult
from fake_openai_server.service.quantize import CALIBRATED, Calibration, Calibrations, quantize

T = TypeVar("T")

router = APIRouter(tags=["operations"])


def calibrations(request: Request) -> Calibrations:
    found: Calibrations = request.app.state.calibrations
    return found


async def embed_for(
    request: Request, model: str, kinds: Iterable[str], embedding: Awaitable[EmbeddingResult]
) -> tuple[EmbeddingResult, Calibration | None]:
    """The request's ``embedding`` of ``model``, and the calibration its embedding types
    (``kinds``) need: int8 and uint8 need the model's.

    Until it is ready (on a CPU, with ``WARMUP=false``, or a request soon after start-up)
    the request waits for the calibration beside its own embedding, both within one
    REQUEST_TIMEOUT (504) and no longer than its client stays (it had waited a
    REQUEST_TIMEOUT for each).
    """
    if not CALIBRATED.intersection(kinds):
        return await answer_in_time(request, embedding), None
    found = calibrations(request)
    calibration = found.ready(model)
    if calibration is not None:
        return await answer_in_time(request, embedding), calibration

    async def both() -> tuple[EmbeddingResult, Calibration]:
        async with asyncio.TaskGroup() as group:  # one failing cancels the other
            embedded = group.create_task(_awaited(embedding))
            calibrated = group.create_task(found.calibration(model))
        return embedded.result(), calibrated.result()

    try:
        return await answer_in_time(request, both())
    except BaseExceptionGroup as failed:  # the first error, as the request would raise it
        raise failed.exceptions[0] from None


async def _awaited(work: Awaitable[T]) -> T:
    return await work


def as_type(result: EmbeddingResult, kind: str, calibration: Calibration | None) -> Any:
    """``result``'s vectors as embedding type ``kind`` (a numpy array); int8/uint8 on the
    scale of ``calibration`` (from ``embed_for``) for vectors cut and normalised as these."""
    vectors = result.vectors
    scale = None
    if calibration is not None and kind in CALIBRATED:
        scale = calibration.scale(vectors.shape[1], result.normalized)
    return quantize(vectors, kind, scale)


@router.get(
    "/info/quantization",
    responses={400: ERROR_RESPONSES[400], **KEY_RESPONSES},
    summary="The calibrated scale behind int8 and uint8 embeddings",
)
async def quantization_scale(
    request: Request,
    dimensions: Annotated[
        int | None, Query(ge=1, description="The scale of vectors cut to N dimensions")
    ] = None,
    normalized: Annotated[
        bool | None, Query(description="...of normalised vectors, or not (default: NORMALIZE)")
    ] = None,
) -> Response:
    return json_response(calibrations(request).published(dimensions, normalized))
