"""Fast reply bodies: numpy straight to JSON or base64, no per-float Python objects."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson

from fake_openai_server.backends.base import FloatArray

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def embeddings_body(
    vectors: FloatArray, encoding_format: str | None, model: str, prompt_tokens: int
) -> bytes:
    if encoding_format == "base64":
        little = vectors.astype("<f4", copy=False)
        encoded: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    else:
        encoded = list(np.ascontiguousarray(vectors, dtype=np.float32))
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


def json_body(payload: Any) -> bytes:
    return orjson.dumps(payload, option=_OPTIONS)
