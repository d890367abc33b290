"""Quantized embeddings: int8, uint8, binary and ubinary, as Cohere, Voyage and Jina document them.

- ``binary`` / ``ubinary``: one bit per dimension (1 where the value is positive),
  packed eight to a byte, most significant bit first; ``ubinary`` is the byte
  (0..255), ``binary`` the byte minus 128 (-128..127). A vector of d dimensions
  becomes ceil(d / 8) numbers.
- ``uint8`` / ``int8``: each dimension is mapped linearly from its calibrated range
  [low, high] onto 256 levels (0..255, or -128..127 for int8), values outside the
  range clipped. The ranges come from the served model itself, embedding a fixed
  Japanese corpus (``calibration_corpus.py``) as queries and as documents, so that a
  dimension's 256 levels cover the values it really takes, instead of a fixed scale
  that would waste most levels on dimensions with a small spread.

The ranges are computed once per model (at start-up when WARMUP is on, else on the
first int8/uint8 request) and published at ``GET /info/quantization``: a client that
stores int8 vectors can map them back to floats with ``low + (q + 128) * step``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fake_openai_server.backends.base import FloatArray
from fake_openai_server.errors import ErrorKind, ServiceError
from fake_openai_server.service.calibration_corpus import CALIBRATION_CORPUS
from fake_openai_server.service.embeddings import EmbeddingsService

log = logging.getLogger(__name__)

EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary"]
EMBEDDING_TYPES: tuple[EmbeddingType, ...] = ("float", "int8", "uint8", "binary", "ubinary")
CALIBRATED: frozenset[str] = frozenset({"int8", "uint8"})
LEVELS = 256

# The prefixes (input types) the corpus is embedded with: the ranges must cover both
# the query and the document side of retrieval.
CALIBRATION_INPUT_TYPES = ("query", "document")

Embed = Callable[[Sequence[str]], Awaitable[FloatArray]]


@dataclass(frozen=True)
class Ranges:
    """Per-dimension ranges of a model's vectors over the calibration corpus."""

    low: FloatArray
    high: FloatArray
    texts: int

    @property
    def step(self) -> FloatArray:
        # A dimension that never varied gets a tiny step: its one value maps to level 0.
        spread = (self.high - self.low) / np.float32(LEVELS - 1)
        step: FloatArray = np.maximum(spread, np.float32(np.finfo(np.float32).tiny))
        return step

    def published(self) -> dict[str, Any]:
        return {
            "texts": self.texts,
            "dimension": int(self.low.shape[0]),
            "low": self.low,
            "high": self.high,
            "step": self.step,
        }


def levels(vectors: FloatArray, ranges: Ranges) -> npt.NDArray[np.int16]:
    """Each value's level 0..255 in its dimension's range (the first ``d`` dimensions)."""
    dims = vectors.shape[1]
    low, step = ranges.low[:dims], ranges.step[:dims]
    scaled = np.rint((vectors - low) / step)
    level: npt.NDArray[np.int16] = np.clip(scaled, 0, LEVELS - 1).astype(np.int16)
    return level


def quantize(vectors: FloatArray, kind: str, ranges: Ranges | None = None) -> npt.NDArray[Any]:
    """``vectors`` (n, d) as ``kind``: float32, int8, uint8, or packed bits (n, ceil(d/8))."""
    if kind == "float":
        return vectors
    if kind in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=1)
        if kind == "ubinary":
            return packed
        return (packed.astype(np.int16) - 128).astype(np.int8)
    if kind in CALIBRATED:
        if ranges is None:
            raise ValueError(f"{kind} needs calibrated ranges")
        level = levels(vectors, ranges)
        if kind == "uint8":
            return level.astype(np.uint8)
        return (level - 128).astype(np.int8)
    raise ValueError(f"unknown embedding type {kind!r}")


async def calibrate(embed: Embed, corpus: Sequence[str] = CALIBRATION_CORPUS) -> Ranges:
    """The per-dimension minimum and maximum of ``embed(corpus)``."""
    vectors = np.asarray(await embed(corpus), dtype=np.float32)
    return Ranges(vectors.min(axis=0), vectors.max(axis=0), int(vectors.shape[0]))


class Calibrations:
    """Each served model's ranges, computed once, awaited by the requests that need them.

    ``attach`` is the start-up hook: it is given one ``embed`` callable per model once
    the models are ready (see ``api/app.py``), and starts calibrating at once when
    ``start`` is true; otherwise the first int8/uint8 request for a model starts it.
    """

    def __init__(self, corpus: Sequence[str] = CALIBRATION_CORPUS) -> None:
        self.corpus = tuple(corpus)
        self._embedders: dict[str, Embed] = {}
        self._tasks: dict[str, asyncio.Task[Ranges]] = {}

    def attach(self, embedders: Mapping[str, Embed], *, start: bool) -> None:
        self._embedders = dict(embedders)
        if start:
            for name in self._embedders:
                self._task(name)

    def _task(self, model: str) -> asyncio.Task[Ranges]:
        task = self._tasks.get(model)
        if task is None:
            embed = self._embedders.get(model)
            if embed is None:
                raise ServiceError(
                    ErrorKind.NOT_READY,
                    "The int8/uint8 calibration cannot run before the model is ready; retry.",
                )
            task = asyncio.get_running_loop().create_task(
                calibrate(embed, self.corpus), name=f"calibrate {model}"
            )
            task.add_done_callback(_log_outcome(model))
            self._tasks[model] = task
        return task

    async def ranges(self, model: str) -> Ranges:
        task = self._task(model)
        try:
            # shield: a client that goes away must not cancel the calibration for others
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise ServiceError(
                    ErrorKind.NOT_READY, "The server is stopping; retry on another instance."
                ) from None
            raise
        except ServiceError as error:
            if error.kind is ErrorKind.OVERLOADED:
                del self._tasks[model]  # a busy queue is no reason to fail for good
            raise
        except Exception:
            raise ServiceError(
                ErrorKind.MODEL_FAILURE,
                "The int8/uint8 calibration of this model failed (see the server log); "
                "float, binary and ubinary embeddings still work.",
            ) from None

    def state(self, model: str) -> str:
        task = self._tasks.get(model)
        if task is None:
            return "not started"
        if not task.done():
            return "running"
        return "failed" if task.cancelled() or task.exception() else "ready"

    def summary(self) -> dict[str, Any]:
        """For /info: how the ranges are made and where to fetch them."""
        return {
            "types": list(EMBEDDING_TYPES[1:]),
            "int8_uint8_ranges": "per dimension: min and max over the calibration corpus",
            "calibration_texts": len(self.corpus) * len(CALIBRATION_INPUT_TYPES),
            "ranges_url": "/info/quantization",
            "models": {name: self.state(name) for name in self._embedders},
        }

    def published(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for name in self._embedders:
            task = self._tasks.get(name)
            entry: dict[str, Any] = {"state": self.state(name)}
            if entry["state"] == "ready" and task is not None:
                entry.update(task.result().published())
            models[name] = entry
        return {
            "method": "level = clip(round((value - low) / step), 0, 255); "
            "uint8 = level, int8 = level - 128; step = (high - low) / 255",
            "calibration_texts": len(self.corpus) * len(CALIBRATION_INPUT_TYPES),
            "models": models,
        }

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(BaseException):
                await task


def _log_outcome(model: str) -> Callable[[asyncio.Task[Ranges]], None]:
    def done(task: asyncio.Task[Ranges]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            log.info("int8/uint8 ranges of %s calibrated on %d texts", model, task.result().texts)
        elif not (isinstance(error, ServiceError) and error.kind is ErrorKind.OVERLOADED):
            log.error("int8/uint8 calibration of %s failed: %s", model, type(error).__name__)

    return done


def calibration_embedders(service: EmbeddingsService) -> dict[str, Embed]:
    """One ``embed`` per served model: the corpus as queries, then as documents, through
    the same service (engine, batching, prefixes) as every request."""

    def embedder(name: str) -> Embed:
        async def embed(texts: Sequence[str]) -> FloatArray:
            parts = [
                (await service.embed(list(texts), model=name, input_type=kind)).vectors
                for kind in CALIBRATION_INPUT_TYPES
            ]
            return np.concatenate(parts)

        return embed

    return {name: embedder(name) for name in service.models}
