"""Fast reply bodies: numpy straight to JSON or base64, no per-float Python objects."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from starlette.responses import Response

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def embeddings_body(
    vectors: npt.NDArray[Any], encoding_format: str | None, model: str, prompt_tokens: int
) -> bytes:
    # Quantized vectors (int8, uint8, packed bits) keep their one-byte type: as numbers in
    # JSON, as their own bytes in base64 (what Voyage's client decodes).
    quantized = vectors.dtype.itemsize == 1
    if encoding_format == "base64":
        encoded: list[Any] = base64_rows(vectors)
    else:
        encoded = list(np.ascontiguousarray(vectors, dtype=None if quantized else np.float32))
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": row}
                for i, row in enumerate(encoded)
            ],
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        },
        option=_OPTIONS,
    )


def base64_rows(vectors: npt.NDArray[Any]) -> list[str]:
    """Each row's bytes in base64: float32 little-endian, or a quantized type's own."""
    little = vectors if vectors.dtype.itemsize == 1 else vectors.astype("<f4", copy=False)
    return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]


def json_body(payload: Any) -> bytes:
    return orjson.dumps(payload, option=_OPTIONS)


def json_response(payload: Any) -> Response:
    return Response(json_body(payload), media_type="application/json")
