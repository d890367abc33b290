"""Quantized replies (int8, uint8, binary, ubinary) and the published int8/uint8 scale."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from fake_openai_server.api.openapi import KEY_RESPONSES
from fake_openai_server.api.serialize import json_body
from fake_openai_server.backends.base import FloatArray
from fake_openai_server.service.quantize import CALIBRATED, Calibrations, quantize

router = APIRouter(tags=["operations"])


def calibrations(request: Request) -> Calibrations:
    found: Calibrations = request.app.state.calibrations
    return found


async def as_type(request: Request, model: str, vectors: FloatArray, kind: str) -> Any:
    """``vectors`` of ``model`` as embedding type ``kind`` (a numpy array)."""
    scale = await calibrations(request).scale(model) if kind in CALIBRATED else None
    return quantize(vectors, kind, scale)


@router.get(
    "/info/quantization",
    responses=KEY_RESPONSES,
    summary="The calibrated scale behind int8 and uint8 embeddings",
)
async def quantization_scale(request: Request) -> Response:
    return Response(json_body(calibrations(request).published()), media_type="application/json")
