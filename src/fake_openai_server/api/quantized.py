"""Quantized replies (int8, uint8, binary, ubinary) and the published int8/uint8 scale."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from fake_openai_server.api.context import answer_in_time
from fake_openai_server.api.openapi import KEY_RESPONSES
from fake_openai_server.api.serialize import json_body
from fake_openai_server.backends.base import FloatArray
from fake_openai_server.service.quantize import CALIBRATED, Calibrations, quantize

router = APIRouter(tags=["operations"])


def calibrations(request: Request) -> Calibrations:
    found: Calibrations = request.app.state.calibrations
    return found


async def as_type(request: Request, model: str, vectors: FloatArray, kind: str) -> Any:
    """``vectors`` of ``model`` as embedding type ``kind`` (a numpy array).

    int8 and uint8 need the model's calibrated scale. Until it is ready (``WARMUP=false``,
    or a request soon after start-up) the request waits for the calibration as for its
    own embedding: within REQUEST_TIMEOUT (504) and no longer than its client stays.
    """
    scale = None
    if kind in CALIBRATED:
        found = calibrations(request)
        scale = found.ready(model) or await answer_in_time(request, found.scale(model))
    return quantize(vectors, kind, scale)


@router.get(
    "/info/quantization",
    responses=KEY_RESPONSES,
    summary="The calibrated scale behind int8 and uint8 embeddings",
)
async def quantization_scale(request: Request) -> Response:
    return Response(json_body(calibrations(request).published()), media_type="application/json")
