"""Quantized embeddings: int8, uint8, binary and ubinary, as Cohere, Voyage and Jina document them.

- ``binary`` / ``ubinary``: one bit per dimension (1 where the value is positive),
  packed eight to a byte, most significant bit first; ``ubinary`` is the byte
  (0..255), ``binary`` the byte minus 128 (-128..127). A vector of d dimensions
  becomes ceil(d / 8) numbers.
- ``int8``: ``round(value / step)`` clipped to -128..127, with one ``step`` for every
  dimension; ``uint8`` is the int8 value plus 128 (0..255).

The step is calibrated on the served model itself: it embeds a fixed Japanese corpus
(``calibration_corpus.py``) as queries and as documents, and ``step`` is the largest
absolute value seen, divided by 127. The corpus is embedded once per model (at start-up
on a GPU with WARMUP on, else on the first int8/uint8 request); each request's step is
that of the corpus's vectors as the request has its own, cut to its ``dimensions`` and
normalised if it is: a vector cut to d of D dimensions and normalised again has values
about sqrt(D / d) times larger, which one full-length step had clipped (at 256 of 1,024
dimensions, on simulated vectors: 2% of the values, in nearly every vector; recall@10
against float 0.95, against 0.99 with the cut's own step). The steps are published
at ``GET /info/quantization``; ``value ≈ int8 * step`` maps a stored vector back.

Why one step for all dimensions rather than a range per dimension (sentence-
transformers' calibration): vector databases compare the stored integers directly
(cosine, dot product). With one step and zero at zero, an int8 vector is the float
vector times a constant, up to rounding, so those comparisons rank as the floats do.
Per-dimension ranges use the 256 levels better but stretch every dimension to the same
width, which re-weights the dimensions: on a ruri-large-shaped stand-in, recall@10
against float was 0.74 for int8 with per-dimension ranges and 0.99 with one step
(``bench/quantization.py``; README). uint8 vectors should have 128 subtracted before a
cosine comparison (dot products of the uint8 values also rank well, as measured there).
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
INT8_MAX = 127

# The prefixes (input types) the corpus is embedded with: the scale must cover both
# the query and the document side of retrieval.
CALIBRATION_INPUT_TYPES = ("query", "document")

Embed = Callable[[Sequence[str]], Awaitable[FloatArray]]


@dataclass(frozen=True)
class Scale:
    """An int8/uint8 scale: the largest absolute value over the calibration corpus's
    vectors, cut to ``dimension`` and normalised if ``normalized``."""

    max_abs: float
    texts: int
    dimension: int
    normalized: bool = False

    @property
    def step(self) -> float:
        # A model whose corpus vectors are all zero cannot be served anyway (the service
        # refuses zero vectors); a tiny step keeps the division defined.
        return max(self.max_abs / INT8_MAX, float(np.finfo(np.float32).tiny))

    def published(self) -> dict[str, Any]:
        return {
            "texts": self.texts,
            "dimension": self.dimension,
            "normalized": self.normalized,
            "max_abs": self.max_abs,
            "step": self.step,
        }


class Calibration:
    """A model's calibration: the corpus's vectors as the model gives them (full length,
    not normalised), and the scale of each cut and normalisation, worked out on first use
    (at most two per dimension)."""

    def __init__(self, vectors: FloatArray) -> None:
        self.vectors = vectors
        self._scales: dict[tuple[int, bool], Scale] = {}

    @property
    def dimension(self) -> int:
        return int(self.vectors.shape[1])

    def scale(self, dimension: int, normalized: bool) -> Scale:
        """The scale of vectors cut to ``dimension`` and then, if ``normalized``, made unit
        length, as the embeddings service does."""
        key = (min(dimension, self.dimension), normalized)
        found = self._scales.get(key)
        if found is None:
            cut = self.vectors[:, : key[0]]
            if normalized:
                norms = np.linalg.norm(cut, axis=1, keepdims=True)
                cut = cut / np.maximum(norms, np.float32(1e-12))
            found = Scale(float(np.abs(cut).max()), len(cut), key[0], normalized)
            self._scales[key] = found
        return found


def int8_levels(vectors: FloatArray, scale: Scale) -> npt.NDArray[np.int16]:
    """round(value / step), clipped to the int8 range."""
    scaled = np.rint(vectors / np.float32(scale.step))
    level: npt.NDArray[np.int16] = np.clip(scaled, -128, INT8_MAX).astype(np.int16)
    return level


def quantize(vectors: FloatArray, kind: str, scale: Scale | None = None) -> npt.NDArray[Any]:
    """``vectors`` (n, d) as ``kind``: float32, int8, uint8, or packed bits (n, ceil(d/8))."""
    if kind == "float":
        return vectors
    if kind in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=1)
        if kind == "ubinary":
            return packed
        return (packed.astype(np.int16) - 128).astype(np.int8)
    if kind in CALIBRATED:
        if scale is None:
            raise ValueError(f"{kind} needs a calibrated step")
        level = int8_levels(vectors, scale)
        if kind == "int8":
            return level.astype(np.int8)
        return (level + 128).astype(np.uint8)
    raise ValueError(f"unknown embedding type {kind!r}")


async def calibrate(embed: Embed, corpus: Sequence[str] = CALIBRATION_CORPUS) -> Calibration:
    """The calibration of ``embed(corpus)`` (the model's own vectors)."""
    return Calibration(np.asarray(await embed(corpus), dtype=np.float32))


class Calibrations:
    """Each served model's scale, computed once, awaited by the requests that need them.

    ``attach`` is the start-up hook: it is given one ``embed`` callable per model once
    the models are ready (see ``api/app.py``), and starts calibrating at once when
    ``start`` is true; otherwise the first int8/uint8 request for a model starts it.
    """

    def __init__(self, corpus: Sequence[str] = CALIBRATION_CORPUS, normalize: bool = False) -> None:
        """``normalize``: the server's NORMALIZE, what a request that says nothing gets."""
        self.corpus = tuple(corpus)
        self.normalize = normalize
        self._embedders: dict[str, Embed] = {}
        self._tasks: dict[str, asyncio.Task[Calibration]] = {}

    def attach(self, embedders: Mapping[str, Embed], *, start: bool) -> None:
        self._embedders = dict(embedders)
        if start:
            for name in self._embedders:
                self._task(name)

    def _task(self, model: str) -> asyncio.Task[Calibration]:
        task = self._tasks.get(model)
        if task is not None and task.done() and (task.cancelled() or task.exception()):
            task = None  # failed earlier (at start-up, say): try again
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

    async def calibration(self, model: str) -> Calibration:
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
        except Exception as error:
            # A failed calibration (a full queue, a failed batch) is tried again by the
            # next request that needs it.
            if self._tasks.get(model) is task:
                del self._tasks[model]
            if isinstance(error, ServiceError):
                raise
            raise ServiceError(
                ErrorKind.MODEL_FAILURE,
                "The int8/uint8 calibration of this model failed (see the server log); "
                "float, binary and ubinary embeddings still work.",
            ) from None

    def ready(self, model: str) -> Calibration | None:
        """``model``'s calibration if it has finished well, else None."""
        task = self._tasks.get(model)
        if task is None or not task.done() or task.cancelled() or task.exception():
            return None
        return task.result()

    def state(self, model: str) -> str:
        task = self._tasks.get(model)
        if task is None:
            return "not started"
        if not task.done():
            return "running"
        return "failed" if task.cancelled() or task.exception() else "ready"

    def summary(self) -> dict[str, Any]:
        """For /info: how the scale is made and where to fetch it."""
        return {
            "types": list(EMBEDDING_TYPES[1:]),
            "int8": "round(value / step), clipped to -128..127; uint8 = int8 + 128",
            "step": "the largest absolute value over the calibration corpus's vectors, cut "
            "and normalised as the request's are, divided by 127",
            "calibration_texts": len(self.corpus) * len(CALIBRATION_INPUT_TYPES),
            "scale_url": "/info/quantization",
            "models": {name: self.state(name) for name in self._embedders},
        }

    def published(
        self, dimensions: int | None = None, normalized: bool | None = None
    ) -> dict[str, Any]:
        """Each model's scale for vectors cut to ``dimensions`` (None: full length) and
        normalised or not (None: as NORMALIZE has it)."""
        normalized = self.normalize if normalized is None else normalized
        models: dict[str, Any] = {}
        for name in self._embedders:
            entry: dict[str, Any] = {"state": self.state(name)}
            calibration = self.ready(name)
            if calibration is not None:
                dimension = dimensions or calibration.dimension
                entry.update(calibration.scale(dimension, normalized).published())
            models[name] = entry
        return {
            "method": "int8 = clip(round(value / step), -128, 127); uint8 = int8 + 128; "
            "step = max_abs / 127, max_abs being the largest absolute value of the model's "
            "vectors over the calibration corpus (as queries and as documents), cut to the "
            "request's dimensions and normalised if the request's vectors are (ask with "
            "?dimensions=N&normalized=true|false)",
            "calibration_texts": len(self.corpus) * len(CALIBRATION_INPUT_TYPES),
            "models": models,
        }

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(BaseException):
                await task


def _log_outcome(model: str) -> Callable[[asyncio.Task[Calibration]], None]:
    def done(task: asyncio.Task[Calibration]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            texts = len(task.result().vectors)
            log.info("int8/uint8 scale of %s calibrated on %d texts", model, texts)
        elif not (isinstance(error, ServiceError) and error.kind is ErrorKind.OVERLOADED):
            log.error("int8/uint8 calibration of %s failed: %s", model, type(error).__name__)

    return done


def calibration_embedders(service: EmbeddingsService) -> dict[str, Embed]:
    """One ``embed`` per served model: the corpus as queries, then as documents, through
    the same service (engine, batching, prefixes) as every request; the model's own
    vectors (each request's scale is worked out from them)."""

    def embedder(name: str) -> Embed:
        async def embed(texts: Sequence[str]) -> FloatArray:
            parts = [
                (
                    await service.embed(list(texts), model=name, input_type=kind, normalize=False)
                ).vectors
                for kind in CALIBRATION_INPUT_TYPES
            ]
            return np.concatenate(parts)

        return embed

    return {name: embedder(name) for name in service.models}
